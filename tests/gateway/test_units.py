"""Pure pieces of the gateway: normalisation, problem+json, SSE chunks, rate-limit
headers, cache policy and the stream-event reader."""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
import pytest
from sluice import canonical
from sluice.common.v1 import chat_pb2
from sluice.errors import PROBLEM_TYPE_BASE, ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2
from sluice.limiter.v1 import limiter_pb2

from services.gateway.domain.admission import cache_policy
from services.gateway.domain.dialects.common import RequestMeta, final_sluice
from services.gateway.domain.dialects.openai.request import parse_body, to_chat_request
from services.gateway.domain.dialects.openai.response import SseRelay, completion_body
from services.gateway.domain.dialects.ratelimit import go_duration, rate_limit_headers
from services.gateway.domain.problems import GatewayError, problem_headers, render_problem
from services.gateway.domain.relay.inbox import Inbox
from services.gateway.domain.relay.reader import DeadlineExceeded, EventReader
from services.gateway.handlers.http.routes import route_label
from services.gateway.settings import CacheMode


def normalise(body: dict[str, Any]) -> chat_pb2.ChatRequest:
    return to_chat_request(parse_body(json.dumps(body).encode()))


# --- normalisation ----------------------------------------------------------------


def test_unknown_top_level_fields_pass_through_sorted():
    req = normalise(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "zeta": {"b": 1, "a": 2},
            "reasoning_effort": "low",
        }
    )
    assert req.extra_json == '{"reasoning_effort":"low","zeta":{"a":2,"b":1}}'
    assert json.loads(req.extra_json)["zeta"] == {"a": 2, "b": 1}


def test_no_extra_fields_leaves_extra_json_empty():
    assert (
        normalise({"model": "m", "messages": [{"role": "user", "content": "x"}]}).extra_json == ""
    )


def test_roles_content_parts_and_tool_messages():
    req = normalise(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "developer", "content": "dev"},
                {
                    "role": "user",
                    "name": "ann",
                    "content": [
                        {"type": "text", "text": "look"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://x/y.png", "detail": "low"},
                        },
                        {"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a":1}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "42"},
            ],
        }
    )
    system, developer, user, assistant, tool = req.messages
    assert system.role == "system" and system.text == "be brief"
    assert developer.role == "developer"
    assert user.name == "ann" and not user.HasField("text")
    text, image, audio = user.parts
    assert (text.type, text.text) == ("text", "look")
    assert (image.type, image.image_url, image.image_detail) == (
        "image_url",
        "https://x/y.png",
        "low",
    )
    assert audio.type == "input_audio"
    assert json.loads(audio.raw_json)["input_audio"]["format"] == "wav"
    assert not assistant.HasField("text")
    call = assistant.tool_calls[0]
    assert (call.id, call.name, call.arguments) == ("call_1", "f", '{"a":1}')
    assert tool.tool_call_id == "call_1" and tool.text == "42"


def test_sampling_tools_and_response_format():
    req = normalise(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 10,
            "max_completion_tokens": 20,
            "temperature": 0,
            "top_p": 0.5,
            "n": 2,
            "stop": "END",
            "seed": 7,
            "presence_penalty": 0.1,
            "frequency_penalty": -0.1,
            "logprobs": True,
            "top_logprobs": 3,
            "user": "u1",
            "metadata": {"k": "v"},
            "stream": True,
            "stream_options": {"include_usage": True},
            "parallel_tool_calls": False,
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "description": "weather",
                        "parameters": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}},
                        },
                        "strict": True,
                    },
                }
            ],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True},
            },
        }
    )
    s = req.sampling
    # max_completion_tokens is the newer name and wins.
    assert s.max_tokens == 20
    assert s.HasField("temperature") and s.temperature == 0
    assert (s.top_p, s.n, list(s.stop), s.seed) == (0.5, 2, ["END"], 7)
    assert s.logprobs and s.top_logprobs == 3
    assert s.presence_penalty == pytest.approx(0.1)
    assert req.stream and req.include_usage
    assert req.user == "u1" and dict(req.metadata) == {"k": "v"}
    assert req.HasField("parallel_tool_calls") and not req.parallel_tool_calls
    tool = req.tools[0]
    assert tool.name == "get_weather" and tool.strict
    assert json.loads(tool.parameters_json)["properties"]["city"]["type"] == "string"
    assert json.loads(req.tool_choice_json)["function"]["name"] == "get_weather"
    rf = req.response_format
    assert (rf.type, rf.schema_name, rf.strict) == ("json_schema", "w", True)
    assert json.loads(rf.schema_json) == {"type": "object"}


def test_stop_list_and_json_object_format():
    req = normalise(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "stop": ["a", "b"],
            "response_format": {"type": "json_object"},
            "tool_choice": "auto",
        }
    )
    assert list(req.sampling.stop) == ["a", "b"]
    assert req.response_format.type == "json_object"
    assert req.tool_choice_json == '"auto"'
    assert not req.sampling.HasField("temperature")


def test_include_usage_only_counts_when_streaming():
    req = normalise(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "stream_options": {"include_usage": True},
        }
    )
    assert not req.include_usage


def test_equal_requests_share_a_cache_key_whatever_the_key_order():
    a = normalise(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "extra": {"p": 1, "q": 2},
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"b": 1, "a": 2}}}
            ],
        }
    )
    b = normalise(
        {
            "tools": [
                {"function": {"parameters": {"a": 2, "b": 1}, "name": "f"}, "type": "function"}
            ],
            "extra": {"q": 2, "p": 1},
            "messages": [{"content": "x", "role": "user"}],
            "model": "m",
        }
    )
    assert canonical.cache_key(a, "t") == canonical.cache_key(b, "t")
    assert canonical.cache_key(a, "t") != canonical.cache_key(a, "other-team")


@pytest.mark.parametrize(
    ("raw", "code", "loc"),
    [
        (b'{"model": "m", "messages": [', ErrorCode.INVALID_JSON, None),
        (b"[1, 2]", ErrorCode.INVALID_REQUEST, None),
        (b'{"model": "m", "messages": "secret prompt"}', ErrorCode.INVALID_REQUEST, "messages"),
        (b'{"model": "m"}', ErrorCode.INVALID_REQUEST, "messages"),
        (
            b'{"model": "m", "messages": [{"role": "wizard", "content": "secret prompt"}]}',
            ErrorCode.INVALID_REQUEST,
            "messages.0.role",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
            ErrorCode.INVALID_REQUEST,
            "temperature",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
            ErrorCode.INVALID_REQUEST,
            "max_tokens",
        ),
    ],
)
def test_bad_bodies_name_the_field_and_never_echo_input(raw, code, loc):
    with pytest.raises(SluiceError) as info:
        parse_body(raw)
    err = info.value
    assert err.code == code
    rendered = render_problem(err, instance="/x", request_id="req_1", trace_id="0" * 32)
    assert b"secret prompt" not in rendered
    if loc is not None:
        assert loc in [e["loc"] for e in err.details["errors"]]


def test_text_part_without_text_is_invalid():
    with pytest.raises(SluiceError) as info:
        normalise(
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
        )
    assert info.value.param == "messages.0.content.0.text"


def test_json_schema_format_requires_its_schema():
    with pytest.raises(SluiceError) as info:
        normalise(
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema"},
            }
        )
    assert info.value.param == "response_format.json_schema"


# --- problem+json -------------------------------------------------------------------


def test_problem_has_rfc9457_members_and_an_openai_error():
    err = SluiceError(
        ErrorCode.MODEL_NOT_FOUND, "The model 'nope' is not served here.", param="model"
    )
    body = orjson.loads(
        render_problem(
            err, instance="/v1/chat/completions#req_1", request_id="req_1", trace_id="ab" * 16
        )
    )
    assert body["type"] == PROBLEM_TYPE_BASE + "model_not_found"
    assert body["status"] == 404 and body["title"] == "Unknown model"
    assert "GET /v1/models" in body["detail"]
    assert body["instance"] == "/v1/chat/completions#req_1"
    assert body["code"] == "model_not_found" and body["trace_id"] == "ab" * 16
    assert body["request_id"] == "req_1"
    assert body["error"] == {
        "message": body["detail"],
        "type": "invalid_request_error",
        "code": "model_not_found",
        "param": "model",
    }


def test_problem_headers_carry_retry_after_and_rate_limit_headers():
    err = GatewayError(
        ErrorCode.RATE_LIMITED, "used up", retry_after_ms=1500, headers={"ratelimit": "x"}
    )
    headers = problem_headers(err)
    assert headers["retry-after"] == "2" and headers["retry-after-ms"] == "1500"
    assert headers["ratelimit"] == "x"
    assert "x-should-retry" not in headers
    assert problem_headers(SluiceError(ErrorCode.INVALID_REQUEST, "x"))["x-should-retry"] == "false"


def test_worker_problem_keeps_its_status_and_code():
    problem = chat_pb2.Problem(
        code="upstream_unavailable", message="no provider", http_status=503, retry_after_ms=2000
    )
    err = SluiceError.from_proto(problem)
    assert err.status == 503 and err.code == ErrorCode.UPSTREAM_UNAVAILABLE


# --- rate-limit headers -------------------------------------------------------------


def test_rate_limit_headers_follow_the_ietf_draft_and_openai():
    policies = [
        limiter_pb2.PolicyState(
            name="tpm", quota=100000, remaining=2500, window_seconds=60, reset_ms=17200
        ),
        limiter_pb2.PolicyState(
            name="rpm", quota=600, remaining=599, window_seconds=60, reset_ms=100
        ),
    ]
    h = rate_limit_headers(policies)
    assert h["ratelimit-policy"] == '"tpm";q=100000;w=60, "rpm";q=600;w=60'
    assert h["ratelimit"] == '"tpm";r=2500;t=18'
    assert h["x-ratelimit-limit-tokens"] == "100000"
    assert h["x-ratelimit-remaining-tokens"] == "2500"
    assert h["x-ratelimit-reset-tokens"] == "17.2s"
    assert h["x-ratelimit-limit-requests"] == "600"
    assert h["x-ratelimit-remaining-requests"] == "599"
    assert h["x-ratelimit-reset-requests"] == "100ms"
    denied = rate_limit_headers(policies, denied_by="rpm")
    assert denied["ratelimit"] == '"rpm";r=599;t=1'
    assert rate_limit_headers([]) == {}


@pytest.mark.parametrize(
    ("ms", "text"),
    [(0, "0s"), (20, "20ms"), (1000, "1s"), (1500, "1.5s"), (360000, "6m0s"), (3723000, "1h2m3s")],
)
def test_go_durations(ms, text):
    assert go_duration(ms) == text


# --- cache policy --------------------------------------------------------------------


def sampling(**kw) -> chat_pb2.SamplingParams:
    return chat_pb2.SamplingParams(**kw)


def test_cache_policy():
    det = CacheMode.DETERMINISTIC
    assert cache_policy(det, sampling(temperature=0), "") == cache_policy(
        CacheMode.ALWAYS, sampling(), ""
    )
    assert cache_policy(det, sampling(temperature=0), "").lookup
    assert cache_policy(det, sampling(seed=3, temperature=1), "").store
    assert not cache_policy(det, sampling(temperature=0.7), "").lookup
    assert not cache_policy(det, sampling(), "").lookup
    no_cache = cache_policy(det, sampling(temperature=0), "No-Cache")
    assert not no_cache.lookup and no_cache.store
    no_store = cache_policy(det, sampling(temperature=0), "max-age=0, no-store")
    assert no_store.lookup and not no_store.store
    off = cache_policy(CacheMode.OFF, sampling(temperature=0), "")
    assert not off.lookup and not off.store


# --- responses and SSE ---------------------------------------------------------------


def final_answer(**kw) -> inference_pb2.Final:
    base: dict[str, Any] = dict(
        choices=[chat_pb2.Choice(index=0, content="Hello there", finish_reason="stop")],
        usage=chat_pb2.Usage(
            input_tokens=10, output_tokens=3, cached_input_tokens=2, reasoning_tokens=1
        ),
        model_served="sim-fast",
        provider="simulator",
        response_id="resp-1",
        created_unix=1700000000,
        cost_usd=0.000123,
        timing=chat_pb2.Timing(queue_wait_us=1500, upstream_ttft_us=2000, upstream_total_us=5000),
    )
    base.update(kw)
    return inference_pb2.Final(**base)


def meta() -> RequestMeta:
    return RequestMeta("req_abc", "f" * 32, "sim-fast", cache="miss")


def test_completion_body_is_openai_shaped_with_sluice():
    body = orjson.loads(completion_body(meta(), final_answer(), cache_hit=False))
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-abc"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello there",
        "refusal": None,
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 2},
        "completion_tokens_details": {"reasoning_tokens": 1},
    }
    s = body["sluice"]
    assert s["request_id"] == "req_abc" and s["trace_id"] == "f" * 32
    assert (s["model_requested"], s["model_served"], s["provider"], s["cache"]) == (
        "sim-fast",
        "sim-fast",
        "simulator",
        "miss",
    )
    assert s["cost_usd"] == 0.000123
    assert s["usage"] == {
        "input_tokens": 10,
        "output_tokens": 3,
        "cached_input_tokens": 2,
        "reasoning_tokens": 1,
    }
    lat = s["latency_ms"]
    assert set(lat) == {"queue", "cache", "ttft", "upstream", "total", "overhead"}
    assert lat["queue"] == 1.5 and lat["upstream"] == 5.0 and lat["ttft"] == 3.5


def test_cached_completion_costs_nothing():
    body = orjson.loads(completion_body(meta(), final_answer(), cache_hit=True))
    assert body["sluice"]["cost_usd"] == 0


def test_tool_call_completion_has_null_content():
    final = final_answer(
        choices=[
            chat_pb2.Choice(
                index=0,
                finish_reason="tool_calls",
                tool_calls=[
                    chat_pb2.ToolCall(id="call_1", type="function", name="f", arguments="{}")
                ],
            )
        ]
    )
    message = orjson.loads(completion_body(meta(), final, cache_hit=False))["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ]


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        event: dict[str, Any] = {}
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            event[field] = value
        events.append(event)
    return events


def test_sse_relay_streams_deltas_then_finish_usage_and_done():
    relay = SseRelay(meta(), include_usage=True)
    out = relay.delta(1, inference_pb2.Delta(content="Hel"))
    out += relay.delta(2, inference_pb2.Delta(content="lo", finish_reason="stop"))
    m = meta()
    out += relay.final(3, final_answer(), final_sluice(m, final_answer(), cache_hit=False))
    events = parse_sse(out)
    assert events[-1] == {"data": "[DONE]"}
    chunks = [json.loads(e["data"]) for e in events[:-1]]
    assert [e["id"] for e in events[:-1]] == ["req_abc:1", "req_abc:2", "req_abc:3"]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert chunks[1]["choices"][0]["delta"] == {"content": "lo"}
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"
    # The final carried the same choice: its content is not repeated.
    assert chunks[2]["choices"] == [] and chunks[2]["usage"]["completion_tokens"] == 3
    assert chunks[2]["sluice"]["model_served"] == "sim-fast"
    assert all("sluice" not in c for c in chunks[:-1])


def test_sse_relay_adds_finish_from_final_and_sluice_without_usage():
    relay = SseRelay(meta(), include_usage=False)
    out = relay.delta(1, inference_pb2.Delta(content="Hi"))
    out += relay.final(2, final_answer(), {"k": 1})
    chunks = [json.loads(e["data"]) for e in parse_sse(out)[:-1]]
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["sluice"] == {"k": 1}
    assert "usage" not in chunks[-1]


def test_sse_relay_tool_call_deltas():
    relay = SseRelay(meta(), include_usage=False)
    first = relay.delta(
        1,
        inference_pb2.Delta(
            tool_calls=[
                chat_pb2.ToolCall(index=0, id="call_1", type="function", name="f", arguments="")
            ]
        ),
    )
    second = relay.delta(
        2, inference_pb2.Delta(tool_calls=[chat_pb2.ToolCall(index=0, arguments='{"a":')])
    )
    d1 = json.loads(parse_sse(first)[0]["data"])["choices"][0]["delta"]
    d2 = json.loads(parse_sse(second)[0]["data"])["choices"][0]["delta"]
    assert d1 == {
        "role": "assistant",
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"arguments": "", "name": "f"},
            }
        ],
    }
    assert d2 == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}


def test_sse_replay_of_a_cached_answer():
    relay = SseRelay(meta(), include_usage=True)
    events = parse_sse(relay.replay(final_answer(), {"cache": "hit"}))
    chunks = [json.loads(e["data"]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hello there"}
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["prompt_tokens"] == 10 and chunks[-1]["sluice"] == {"cache": "hit"}
    assert events[-1] == {"data": "[DONE]"}


def test_sse_failure_event_has_no_done():
    relay = SseRelay(meta(), include_usage=False)
    out = relay.failure(4, b'{"code":"upstream_stream_interrupted"}')
    assert out == b'id: req_abc:4\nevent: error\ndata: {"code":"upstream_stream_interrupted"}\n\n'


# --- event reader ----------------------------------------------------------------------


def msg(event: inference_pb2.StreamEvent) -> bytes:
    return event.SerializeToString()


async def test_event_reader_drops_duplicates_and_stale_deltas():
    inbox = Inbox()
    for seq, text in [(1, "a"), (2, "b"), (2, "b"), (1, "a"), (3, "c")]:
        inbox.put(
            msg(inference_pb2.StreamEvent(sequence=seq, delta=inference_pb2.Delta(content=text)))
        )
    inbox.put(msg(inference_pb2.StreamEvent(sequence=1, final=final_answer())))
    inbox.put(msg(inference_pb2.StreamEvent(sequence=5, final=final_answer())))
    reader = EventReader(inbox, time.monotonic() + 5)
    got = []
    while True:
        event = await reader.next(0.05)
        if event is None:
            break
        got.append(event)
    assert [e.delta.content for e in got if e.HasField("delta")] == ["a", "b", "c"]
    # A restarted worker's terminal event counts even with a low sequence; only one does.
    assert sum(e.HasField("final") for e in got) == 1


async def test_event_reader_deadline():
    reader = EventReader(Inbox(), time.monotonic() + 0.05)
    assert await reader.next(0.01) is None
    with pytest.raises(DeadlineExceeded):
        for _ in range(20):
            await reader.next(0.02)


def test_problem_detail_ends_its_sentence_before_the_fix() -> None:
    spec_fix = SluiceError(ErrorCode.UPSTREAM_UNAVAILABLE, "x").spec.fix
    bare = SluiceError(ErrorCode.UPSTREAM_UNAVAILABLE, "cannot reach provider openai")
    body = orjson.loads(render_problem(bare, instance="/i", request_id="r", trace_id="t"))
    assert body["detail"] == f"cannot reach provider openai. {spec_fix}"
    ended = SluiceError(ErrorCode.UPSTREAM_UNAVAILABLE, "The provider is down.")
    body = orjson.loads(render_problem(ended, instance="/i", request_id="r", trace_id="t"))
    assert body["detail"] == f"The provider is down. {spec_fix}"


def test_validation_errors_name_fields_not_union_members() -> None:
    with pytest.raises(SluiceError) as caught:
        parse_body(b'{"model": "m", "messages": [{"role": "user", "content": 5}]}')
    err = caught.value
    assert err.param == "messages.0.content"
    assert err.detail == "Invalid field(s): messages.0.content."
    assert {e["loc"] for e in err.details["errors"]} == {"messages.0.content"}


def test_route_labels_name_the_route_not_the_path() -> None:
    assert route_label("/v1/chat/completions") == "/v1/chat/completions"
    assert route_label("/v1/jobs") == "/v1/jobs"
    assert route_label("/v1/jobs/job_0123") == "/v1/jobs/{id}"
    assert route_label("/v1/jobs/job_0123/events") == "/v1/jobs/{id}/events"
    assert route_label("/v1/jobs/job_0123/cancel") == "/v1/jobs/{id}/cancel"
    assert route_label("/v1/streams/req_1") == "/v1/streams/{id}"
    assert route_label("/docs/asyncapi") == "/docs"
    for stray in (
        "/v1/jobs/a/b",
        "/v1/jobs/",
        "/v1/streams/a/b",
        "/wp-admin",
        "/v1/jobs/x/eventsx",
    ):
        assert route_label(stray) == "unmatched", stray
