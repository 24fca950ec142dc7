"""The Anthropic Messages API: the translation both ways as pure functions, then the
route on the real app and NATS (the test plays limiter, cache and worker), driven by the
official ``anthropic`` SDK and by raw HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2
from sluice.limiter.v1 import limiter_pb2

from services.gateway.domain.dialects.anthropic.request import (
    DEFAULT_VERSION,
    anthropic_to_chat_request,
    check_version,
    parse_messages_body,
)
from services.gateway.domain.dialects.anthropic.response import (
    MessageStreamRelay,
    message_body,
    render_error,
)
from services.gateway.domain.dialects.common import RequestMeta, final_sluice
from services.gateway.domain.dialects.ratelimit import anthropic_rate_limit_headers, rfc3339_after
from tests.gateway.harness import BASE_URL, POLICIES, Gateway, answer, build_gateway

SECRET = "zebra-violet-prompt-marker"
MESSAGES = "/v1/messages"
VERSION = {"anthropic-version": DEFAULT_VERSION}


def translate(body: dict[str, Any]) -> chat_pb2.ChatRequest:
    return anthropic_to_chat_request(parse_messages_body(json.dumps(body).encode()))


def rejected(body: dict[str, Any]) -> SluiceError:
    with pytest.raises(SluiceError) as info:
        translate(body)
    assert SECRET not in str(info.value.detail)
    return info.value


def base(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "sim-fast",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": SECRET}],
    }
    body.update(kw)
    return body


# --- request translation ------------------------------------------------------------


def test_system_messages_sampling_and_metadata():
    req = translate(
        base(
            system="be brief",
            stop_sequences=["\n\nHuman:", "END"],
            temperature=0.2,
            top_p=0.9,
            top_k=40,
            stream=True,
            metadata={"user_id": "u-42", "other": "ignored"},
            thinking={"type": "enabled", "budget_tokens": 1024},
        )
    )
    assert [m.role for m in req.messages] == ["system", "user"]
    assert req.messages[0].text == "be brief" and req.messages[1].text == SECRET
    s = req.sampling
    assert s.max_tokens == 64 and list(s.stop) == ["\n\nHuman:", "END"]
    assert s.temperature == pytest.approx(0.2) and s.top_p == pytest.approx(0.9)
    assert not s.HasField("n")
    # top_k has no sampling field; it rides along like an OpenAI pass-through member,
    # while Anthropic-only members (thinking) stay out of what reaches the provider.
    assert req.extra_json == '{"top_k":40}'
    assert req.stream and not req.include_usage
    assert req.user == "u-42"


def test_system_blocks_and_text_blocks_keep_their_boundaries():
    req = translate(
        base(
            system=[
                {"type": "text", "text": "one", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "two"},
            ],
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "only"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}],
                },
            ],
        )
    )
    system, single, assistant, double = req.messages
    assert [(p.type, p.text) for p in system.parts] == [("text", "one"), ("text", "two")]
    assert single.text == "only" and not single.parts
    assert assistant.role == "assistant" and assistant.text == "a"
    assert [p.text for p in double.parts] == ["x", "y"] and not double.HasField("text")


def test_tool_round_trip_maps_to_tool_calls_and_tool_messages():
    req = translate(
        base(
            tools=[
                {
                    "name": "get_weather",
                    "description": "Weather by city",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                }
            ],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
            messages=[
                {"role": "user", "content": "weather in Oslo and Bergen?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hm", "signature": "sig"},
                        {"type": "text", "text": "Checking."},
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "get_weather",
                            "input": {"city": "Oslo"},
                        },
                        {
                            "type": "tool_use",
                            "id": "toolu_2",
                            "name": "get_weather",
                            "input": {"city": "Bergen"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "4 C"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_2",
                            "content": [{"type": "text", "text": "6 C"}],
                            "is_error": False,
                        },
                        {"type": "text", "text": "And tomorrow?"},
                    ],
                },
            ],
        )
    )
    roles = [m.role for m in req.messages]
    assert roles == ["user", "assistant", "tool", "tool", "user"]
    assistant = req.messages[1]
    assert assistant.text == "Checking."
    assert [(c.index, c.id, c.type, c.name) for c in assistant.tool_calls] == [
        (0, "toolu_1", "function", "get_weather"),
        (1, "toolu_2", "function", "get_weather"),
    ]
    assert json.loads(assistant.tool_calls[0].arguments) == {"city": "Oslo"}
    first, second = req.messages[2], req.messages[3]
    assert (first.tool_call_id, first.text) == ("toolu_1", "4 C")
    assert (second.tool_call_id, second.text) == ("toolu_2", "6 C")
    assert req.messages[4].text == "And tomorrow?"
    tool = req.tools[0]
    assert (tool.type, tool.name, tool.description) == (
        "function",
        "get_weather",
        "Weather by city",
    )
    assert json.loads(tool.parameters_json)["properties"]["city"] == {"type": "string"}
    assert req.tool_choice_json == '"required"'
    assert req.HasField("parallel_tool_calls") and not req.parallel_tool_calls


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
    ],
)
def test_tool_choice(choice, expected):
    req = translate(base(tool_choice=choice))
    assert json.loads(req.tool_choice_json) == expected
    assert not req.HasField("parallel_tool_calls")


def test_assistant_turn_with_only_tool_calls_has_no_text():
    req = translate(
        base(
            messages=[
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
                },
            ]
        )
    )
    assert not req.messages[1].HasField("text")
    assert req.messages[1].tool_calls[0].arguments == "{}"


def test_images_become_image_url_parts():
    req = translate(
        base(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
                        },
                        {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
                        {"type": "text", "text": "what is this?"},
                    ],
                }
            ]
        )
    )
    parts = req.messages[0].parts
    assert [(p.type, p.image_url) for p in parts[:2]] == [
        ("image_url", "data:image/png;base64,iVBO"),
        ("image_url", "https://x.test/a.png"),
    ]
    assert (parts[2].type, parts[2].text) == ("text", "what is this?")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (base(max_tokens=None), "max_tokens"),
        ({"model": "sim-fast", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        (base(max_tokens=0), "max_tokens"),
        (base(temperature=1.5), "temperature"),
        (base(messages=[]), "messages"),
        (base(messages=[{"role": "system", "content": SECRET}]), "messages.0.role"),
        (base(tool_choice={"type": "tool"}), "tool_choice"),
        (
            base(messages=[{"role": "user", "content": [{"type": "document", "x": SECRET}]}]),
            "messages.0.content.0.type",
        ),
        (
            base(messages=[{"role": "user", "content": [{"type": "text"}]}]),
            "messages.0.content.0.text",
        ),
        (
            base(
                messages=[
                    {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}
                ]
            ),
            "messages.0.content.0.type",
        ),
        (
            base(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                    }
                ]
            ),
            "messages.0.content.0.source.type",
        ),
        (
            base(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "base64", "data": "x"}}],
                    }
                ]
            ),
            "messages.0.content.0.source",
        ),
        (base(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "tools.0.type"),
        (base(tools=[{"name": "f"}]), "tools.0.input_schema"),
        (base(system=[{"type": "image", "source": {}}]), "system.0.type"),
    ],
)
def test_invalid_requests_name_the_param(body, param):
    err = rejected(body)
    assert err.code is ErrorCode.INVALID_REQUEST
    assert err.param == param, err


def test_bad_json_and_non_objects():
    with pytest.raises(SluiceError) as info:
        parse_messages_body(b'{"model": ')
    assert info.value.code is ErrorCode.INVALID_JSON
    with pytest.raises(SluiceError) as info:
        parse_messages_body(b"[1]")
    assert info.value.code is ErrorCode.INVALID_REQUEST


def test_anthropic_version_header():
    assert check_version(None) == DEFAULT_VERSION
    assert check_version("2026-10-21") == "2026-10-21"
    with pytest.raises(SluiceError) as info:
        check_version("latest")
    assert info.value.param == "anthropic-version"


# --- answers --------------------------------------------------------------------------


def meta() -> RequestMeta:
    m = RequestMeta("req_abc", "f" * 32, "sim-fast", cache="miss")
    m.prompt_tokens = 11
    return m


def final_answer(**kw: Any) -> inference_pb2.Final:
    fields: dict[str, Any] = dict(
        choices=[chat_pb2.Choice(index=0, content="Hello there", finish_reason="stop")],
        usage=chat_pb2.Usage(input_tokens=10, output_tokens=3, cached_input_tokens=2),
        model_served="sim-fast",
        provider="simulator",
        cost_usd=0.000123,
        timing=chat_pb2.Timing(queue_wait_us=1500, upstream_ttft_us=2000, upstream_total_us=5000),
    )
    fields.update(kw)
    return inference_pb2.Final(**fields)


def test_message_body_is_anthropic_shaped_with_sluice():
    body = orjson.loads(message_body(meta(), final_answer(), cache_hit=False))
    assert body["id"] == "msg_abc"
    assert (body["type"], body["role"], body["model"]) == ("message", "assistant", "sim-fast")
    assert body["content"] == [{"type": "text", "text": "Hello there"}]
    assert (body["stop_reason"], body["stop_sequence"]) == ("end_turn", None)
    assert body["usage"] == {
        "input_tokens": 8,
        "output_tokens": 3,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 2,
    }
    s = body["sluice"]
    assert (s["request_id"], s["model_served"], s["provider"], s["cache"]) == (
        "req_abc",
        "sim-fast",
        "simulator",
        "miss",
    )
    assert s["cost_usd"] == 0.000123 and s["latency_ms"]["queue"] == 1.5
    cached = orjson.loads(message_body(meta(), final_answer(), cache_hit=True))
    assert cached["sluice"]["cost_usd"] == 0


@pytest.mark.parametrize(
    ("choice", "reason"),
    [
        (chat_pb2.Choice(content="x", finish_reason="length"), "max_tokens"),
        (chat_pb2.Choice(content="x", finish_reason="content_filter"), "refusal"),
        (chat_pb2.Choice(refusal="no", finish_reason="stop"), "refusal"),
        (chat_pb2.Choice(content="x", finish_reason=""), "end_turn"),
        (
            chat_pb2.Choice(finish_reason="stop", tool_calls=[chat_pb2.ToolCall(id="c", name="f")]),
            "tool_use",
        ),
    ],
)
def test_stop_reasons(choice, reason):
    body = orjson.loads(message_body(meta(), final_answer(choices=[choice]), cache_hit=False))
    assert body["stop_reason"] == reason


def test_tool_use_blocks():
    final = final_answer(
        choices=[
            chat_pb2.Choice(
                content="Let me look.",
                finish_reason="tool_calls",
                tool_calls=[
                    chat_pb2.ToolCall(index=0, id="call_1", name="f", arguments='{"a": 1}'),
                    chat_pb2.ToolCall(index=1, name="g", arguments=""),
                    chat_pb2.ToolCall(index=2, id="call_3", name="h", arguments="{not json"),
                ],
            )
        ]
    )
    body = orjson.loads(message_body(meta(), final, cache_hit=False))
    assert body["stop_reason"] == "tool_use"
    assert body["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
        # No id from the provider: the client still needs one for its tool_result.
        {"type": "tool_use", "id": "toolu_abc_1", "name": "g", "input": {}},
        # A model's malformed arguments are passed on, not dropped.
        {"type": "tool_use", "id": "call_3", "name": "h", "input": "{not json"},
    ]


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in raw.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith("retry:")]
        if not lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines if not line.startswith("id: "))
        data = json.loads(fields["data"])
        assert data["type"] == fields["event"] or fields["event"] == "error"
        events.append((fields["event"], data))
    return events


def test_stream_event_sequence_for_text_then_tool_call():
    relay = MessageStreamRelay(meta(), include_usage=False)
    out = relay.delta(1, inference_pb2.Delta(role="assistant"))
    out += relay.delta(2, inference_pb2.Delta(content="Hel"))
    out += relay.delta(3, inference_pb2.Delta(content="lo"))
    out += relay.delta(
        4,
        inference_pb2.Delta(
            tool_calls=[chat_pb2.ToolCall(index=0, id="call_9", name="get_weather")]
        ),
    )
    out += relay.delta(
        5, inference_pb2.Delta(tool_calls=[chat_pb2.ToolCall(index=0, arguments='{"city":')])
    )
    out += relay.delta(
        6,
        inference_pb2.Delta(
            tool_calls=[chat_pb2.ToolCall(index=0, arguments='"Oslo"}')],
            finish_reason="tool_calls",
        ),
    )
    out += relay.final(7, final_answer(choices=[]), {"cache": "miss"})
    events = sse_events(out)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["id"] == "msg_abc" and start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 11 and start["usage"]["output_tokens"] == 0
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert [e[1]["delta"] for e in events[2:4]] == [
        {"type": "text_delta", "text": "Hel"},
        {"type": "text_delta", "text": "lo"},
    ]
    assert events[4][1] == {"type": "content_block_stop", "index": 0}
    assert events[5][1]["index"] == 1
    assert events[5][1]["content_block"] == {
        "type": "tool_use",
        "id": "call_9",
        "name": "get_weather",
        "input": {},
    }
    partial = "".join(e[1]["delta"]["partial_json"] for e in events[6:8])
    assert json.loads(partial) == {"city": "Oslo"}
    assert all(e[1]["index"] == 1 for e in events[6:9])
    delta = events[9][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 3 and delta["usage"]["input_tokens"] == 8
    assert delta["sluice"] == {"cache": "miss"}


def test_stream_heartbeat_leads_with_message_start_then_pings():
    relay = MessageStreamRelay(meta(), include_usage=False)
    first, second = relay.heartbeat(), relay.heartbeat()
    assert [n for n, _ in sse_events(first)] == ["message_start", "ping"]
    assert sse_events(second) == [("ping", {"type": "ping"})]
    out = relay.delta(1, inference_pb2.Delta(content="x", finish_reason="length"))
    out += relay.final(2, final_answer(choices=[]), {})
    events = sse_events(out)
    assert events[0][0] == "content_block_start"
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"


def test_stream_final_carries_the_answer_when_nothing_was_streamed():
    relay = MessageStreamRelay(meta(), include_usage=False)
    events = sse_events(relay.final(1, final_answer(), {}))
    assert [n for n, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[2][1]["delta"]["text"] == "Hello there"
    assert events[4][1]["delta"]["stop_reason"] == "end_turn"


def test_stream_replay_of_a_cached_answer():
    relay = MessageStreamRelay(meta(), include_usage=False)
    events = sse_events(relay.replay(final_answer(), {"cache": "hit"}))
    assert events[0][1]["message"]["usage"]["input_tokens"] == 8
    assert events[0][1]["message"]["usage"]["cache_read_input_tokens"] == 2
    assert events[2][1]["delta"]["text"] == "Hello there"
    assert events[-2][1]["sluice"] == {"cache": "hit"}
    assert events[-1][0] == "message_stop"


def test_error_body_shape_and_stream_error_event():
    err = SluiceError(ErrorCode.MODEL_NOT_FOUND, "The model 'x' is not served here.", param="model")
    raw = render_error(err, instance="/v1/messages#req_1", request_id="req_1", trace_id="a" * 32)
    body = orjson.loads(raw)
    assert body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"
    assert body["error"]["message"].startswith("The model 'x' is not served here.")
    assert body["error"]["param"] == "model"
    assert (body["request_id"], body["code"], body["trace_id"]) == (
        "req_1",
        "model_not_found",
        "a" * 32,
    )
    assert (body["status"], body["title"], body["instance"]) == (
        404,
        "Unknown model",
        "/v1/messages#req_1",
    )
    assert body["detail"] == body["error"]["message"]
    relay = MessageStreamRelay(meta(), include_usage=False)
    # The event carries the stream's id (resumable like chat completions' streams).
    rid = meta().request_id.encode()
    assert relay.failure(3, raw) == b"event: error\ndata: " + raw + b"\nid: " + rid + b":3\n\n"


def test_anthropic_rate_limit_headers():
    now = time.mktime(time.strptime("2025-01-01 12:00:00", "%Y-%m-%d %H:%M:%S")) - time.timezone
    assert rfc3339_after(2500, now) == "2025-01-01T12:00:03Z"
    headers = anthropic_rate_limit_headers(POLICIES)
    assert headers["anthropic-ratelimit-tokens-limit"] == "100000"
    assert headers["anthropic-ratelimit-tokens-remaining"] == "99000"
    assert headers["anthropic-ratelimit-requests-limit"] == "600"
    assert headers["anthropic-ratelimit-requests-remaining"] == "599"
    for name in ("tokens", "requests"):
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", headers[f"anthropic-ratelimit-{name}-reset"]
        )
    assert headers["ratelimit-policy"] == '"tpm";q=100000;w=60, "rpm";q=600;w=60'
    assert not any(k.startswith("x-ratelimit") for k in headers)
    assert anthropic_rate_limit_headers([]) == {}


# --- the route, through the official SDK ------------------------------------------------


def sdk(gw: Gateway, api_key: str | None = None) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=BASE_URL,
        api_key=api_key or gw.secret,
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.edge)),
    )


async def emit_text(work, fake, pieces: list[str], finish: str = "stop") -> None:
    seq = 0
    for seq, text in enumerate(pieces, start=1):
        await fake.emit(
            work, inference_pb2.StreamEvent(sequence=seq, delta=inference_pb2.Delta(content=text))
        )
    await fake.emit(
        work,
        inference_pb2.StreamEvent(
            sequence=seq + 1, delta=inference_pb2.Delta(finish_reason=finish)
        ),
    )
    await fake.emit(
        work, inference_pb2.StreamEvent(sequence=seq + 2, final=answer("".join(pieces), choices=[]))
    )


async def test_sdk_non_streaming_message(gw: Gateway):
    raw = await sdk(gw).messages.with_raw_response.create(
        model="sim-fast",
        max_tokens=16,
        system="be brief",
        messages=[{"role": "user", "content": SECRET}],
        metadata={"user_id": "u-1"},
        # This SDK version has no sampling keywords; older clients send them as members.
        extra_body={"temperature": 0.5},
    )
    message = await raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "sim-fast"
    assert message.content[0].type == "text" and message.content[0].text == "Hello there"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 3)
    assert message.usage.cache_read_input_tokens == 0
    rid = raw.headers["x-request-id"]
    assert message.id == "msg_" + rid.removeprefix("req_")
    assert message._request_id == rid
    sluice = (message.model_extra or {})["sluice"]
    assert sluice["request_id"] == rid and sluice["provider"] == "simulator"
    assert sluice["trace_id"] == raw.headers["traceparent"].split("-")[1]
    assert raw.headers["x-sluice-cache"] == "bypass"
    assert raw.headers["anthropic-ratelimit-tokens-remaining"] == "99000"
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "600"
    assert "x-ratelimit-remaining-tokens" not in raw.headers
    # The same data path as chat completions: reserve, then the work item.
    reserve = gw.fake.reserves[-1]
    assert reserve.max_output_tokens == 16 and reserve.input_tokens > 5
    work = gw.fake.work[-1]
    assert work.request_id == rid and work.reservation_id == "p0.res-1"
    request = work.request
    assert [m.role for m in request.messages] == ["system", "user"]
    assert request.sampling.max_tokens == 16 and request.user == "u-1"
    assert request.sampling.temperature == 0.5
    assert not request.stream


async def test_sdk_streaming_message(gw: Gateway):
    async def scenario(work, fake):
        await emit_text(work, fake, ["Hel", "lo", " world"])

    gw.fake.scenario = scenario
    client = sdk(gw)
    async with client.messages.stream(
        model="sim-fast", max_tokens=32, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Hello world"
    assert final.content[0].type == "text" and final.content[0].text == "Hello world"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 3 and final.usage.input_tokens == 12
    assert gw.fake.work[-1].request.stream

    # The raw events: the sluice object rides on message_delta, and create(stream=True)
    # gives the same event types.
    events = await client.messages.create(
        model="sim-fast", max_tokens=32, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    got = [e async for e in events]
    types = [e.type for e in got]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    delta = got[-2]
    assert delta.type == "message_delta"
    assert (delta.model_extra or {})["sluice"]["model_served"] == "sim-fast"


async def test_raw_stream_headers_and_framing(gw: Gateway):
    async def scenario(work, fake):
        await emit_text(work, fake, ["a", "b"])

    gw.fake.scenario = scenario
    async with gw.authed() as http:
        resp = await http.post(MESSAGES, json=base(stream=True), headers=VERSION)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["request-id"] == resp.headers["x-request-id"]
    assert resp.headers["anthropic-ratelimit-tokens-limit"] == "100000"
    # Each worker event's group ends with its id: the deltas 1 and 2 and the final 4
    # (message_delta and message_stop, the id on the last); the finish-only delta 3
    # renders no event of its own.
    ids = re.findall(r"\nid: ([^\n]+)\n", resp.text)
    rid = resp.headers["request-id"]
    assert ids == [f"{rid}:{n}" for n in (1, 2, 4)]
    events = sse_events(resp.content)
    assert [n for n, _ in events][:2] == ["message_start", "content_block_start"]
    assert events[-1][0] == "message_stop"
    assert events[0][1]["message"]["usage"]["input_tokens"] > 5
    assert events[-2][1]["sluice"]["latency_ms"]["ttft"] > 0


async def test_sdk_tool_use_stream(gw: Gateway):
    async def scenario(work, fake):
        call = chat_pb2.ToolCall(index=0, id="call_9", type="function", name="get_weather")
        more = chat_pb2.ToolCall(index=0, arguments='{"city":"Oslo"}')
        events = [
            inference_pb2.Delta(content="Let me check."),
            inference_pb2.Delta(tool_calls=[call]),
            inference_pb2.Delta(tool_calls=[more], finish_reason="tool_calls"),
        ]
        for seq, delta in enumerate(events, start=1):
            await fake.emit(work, inference_pb2.StreamEvent(sequence=seq, delta=delta))
        await fake.emit(work, inference_pb2.StreamEvent(sequence=4, final=answer(choices=[])))

    gw.fake.scenario = scenario
    async with sdk(gw).messages.stream(
        model="sim-fast",
        max_tokens=64,
        messages=[{"role": "user", "content": "weather?"}],
        tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
        tool_choice={"type": "auto"},
    ) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    text, tool = final.content
    assert text.type == "text" and text.text == "Let me check."
    assert tool.type == "tool_use" and (tool.id, tool.name) == ("call_9", "get_weather")
    assert tool.input == {"city": "Oslo"}
    request = gw.fake.work[-1].request
    assert request.tools[0].name == "get_weather" and request.tool_choice_json == '"auto"'


async def test_idle_stream_pings_after_message_start(bus, tmp_path):
    gw = await build_gateway(bus, tmp_path, sse_heartbeat_seconds=0.1)

    async def slow(work, fake):
        await asyncio.sleep(0.35)
        await emit_text(work, fake, ["late"])

    gw.fake.scenario = slow
    try:
        async with gw.authed() as http:
            resp = await http.post(MESSAGES, json=base(stream=True), headers=VERSION)
        names = [n for n, _ in sse_events(resp.content)]
        assert names[0] == "message_start" and "ping" in names
        assert names.index("ping") < names.index("content_block_start")
        assert names[-1] == "message_stop"
    finally:
        await gw.close()


async def test_mid_stream_failure_is_an_error_event(gw: Gateway):
    async def scenario(work, fake):
        await fake.emit(
            work, inference_pb2.StreamEvent(sequence=1, delta=inference_pb2.Delta(content="par"))
        )
        problem = chat_pb2.Problem(
            code="upstream_stream_interrupted", message="provider hung up", http_status=502
        )
        await fake.emit(
            work,
            inference_pb2.StreamEvent(
                sequence=2,
                failure=inference_pb2.Failure(
                    problem=problem, partial_usage=chat_pb2.Usage(input_tokens=12, output_tokens=1)
                ),
            ),
        )

    gw.fake.scenario = scenario
    async with gw.authed() as http:
        resp = await http.post(MESSAGES, json=base(stream=True), headers=VERSION)
    assert resp.status_code == 200
    name, body = sse_events(resp.content)[-1]
    assert name == "error" and body["type"] == "error"
    assert body["error"]["type"] == "api_error"
    assert body["code"] == "upstream_stream_interrupted" and body["status"] == 502
    assert body["details"]["partial_usage"]["output_tokens"] == 1
    assert body["request_id"] == resp.headers["x-request-id"]
    assert "message_stop" not in resp.text

    with pytest.raises(anthropic.APIStatusError) as info:
        async with sdk(gw).messages.stream(
            model="sim-fast", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        ) as stream:
            async for _ in stream:
                pass
    assert info.value.type == "api_error"


async def test_cache_hit_answers_both_ways(gw: Gateway):
    gw.fake.cache_answer = answer("From the cache")
    client = sdk(gw)
    deterministic = {"temperature": 0}
    raw = await client.messages.with_raw_response.create(
        model="sim-fast",
        max_tokens=8,
        messages=[{"role": "user", "content": "x"}],
        extra_body=deterministic,
    )
    message = await raw.parse()
    assert raw.headers["x-sluice-cache"] == "hit"
    assert message.content[0].type == "text" and message.content[0].text == "From the cache"
    assert (message.model_extra or {})["sluice"]["cost_usd"] == 0
    async with client.messages.stream(
        model="sim-fast",
        max_tokens=8,
        messages=[{"role": "user", "content": "x"}],
        extra_body=deterministic,
    ) as stream:
        final = await stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == "From the cache"
    assert not gw.fake.work


# --- errors on the route ----------------------------------------------------------------


def assert_anthropic_error(resp, status: int, error_type: str, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = resp.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type and body["error"]["message"]
    assert body["code"] == code and body["status"] == status
    assert re.fullmatch(r"[0-9a-f]{32}", body["trace_id"]), body["trace_id"]
    assert body["request_id"] == resp.headers["x-request-id"] == resp.headers["request-id"]
    assert body["instance"].startswith(MESSAGES)
    assert SECRET not in resp.text and "Traceback" not in resp.text
    return body


BAD = [
    ("malformed json", b'{"model": "sim-fast", "messages": [', 400, "invalid_json"),
    (
        "wrong types",
        json.dumps(base(messages="hi " + SECRET)).encode(),
        400,
        "invalid_request",
    ),
    (
        "missing max_tokens",
        json.dumps(
            {"model": "sim-fast", "messages": [{"role": "user", "content": SECRET}]}
        ).encode(),
        400,
        "invalid_request",
    ),
    (
        "file image",
        json.dumps(
            base(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                    }
                ]
            )
        ).encode(),
        400,
        "invalid_request",
    ),
    ("not an object", b'"just a string"', 400, "invalid_request"),
    ("unknown model", json.dumps(base(model="nope")).encode(), 404, "model_not_found"),
    (
        "max_tokens over the model limit",
        json.dumps(base(max_tokens=10**6)).encode(),
        400,
        "context_length_exceeded",
    ),
]


@pytest.mark.parametrize(("case", "raw", "status", "code"), BAD, ids=[c[0] for c in BAD])
async def test_bad_input_gets_the_anthropic_error_shape(gw: Gateway, case, raw, status, code):
    error_type = "not_found_error" if status == 404 else "invalid_request_error"
    async with gw.authed() as http:
        resp = await http.post(
            MESSAGES, content=raw, headers={"content-type": "application/json", **VERSION}
        )
    assert_anthropic_error(resp, status, error_type, code)
    assert not gw.fake.reserves


async def test_missing_max_tokens_names_the_param(gw: Gateway):
    async with gw.authed() as http:
        resp = await http.post(
            MESSAGES, json={"model": "sim-fast", "messages": [{"role": "user", "content": "x"}]}
        )
    body = assert_anthropic_error(resp, 400, "invalid_request_error", "invalid_request")
    assert body["error"]["param"] == "max_tokens"
    assert "max_tokens" in body["error"]["message"]


@pytest.mark.parametrize(
    ("headers", "status", "error_type", "code"),
    [
        ({"anthropic-version": "latest"}, 400, "invalid_request_error", "invalid_request"),
        ({"content-type": "text/plain"}, 415, "invalid_request_error", "unsupported_media_type"),
    ],
)
async def test_bad_headers(gw: Gateway, headers, status, error_type, code):
    async with gw.authed() as http:
        resp = await http.post(MESSAGES, content=json.dumps(base()).encode(), headers=headers)
    assert_anthropic_error(resp, status, error_type, code)


async def test_missing_version_defaults(gw: Gateway):
    async with gw.http(**{"x-api-key": gw.secret}) as http:
        resp = await http.post(MESSAGES, json=base())
    assert resp.status_code == 200, resp.text
    assert resp.json()["type"] == "message"


@pytest.mark.parametrize(
    "headers", [{}, {"x-api-key": "sk-wrong"}, {"authorization": "Bearer sk-wrong"}]
)
async def test_missing_or_wrong_key_is_401(gw: Gateway, headers):
    async with gw.http(**headers, **VERSION) as http:
        resp = await http.post(MESSAGES, json=base())
    assert_anthropic_error(resp, 401, "authentication_error", "unauthorized")
    assert "sk-wrong" not in resp.text


async def test_body_over_the_limit_is_413(bus, tmp_path):
    gw = await build_gateway(bus, tmp_path, max_body_bytes=1024)
    try:
        async with gw.authed() as http:
            resp = await http.post(
                MESSAGES,
                json=base(messages=[{"role": "user", "content": SECRET + "a" * 4096}]),
                headers=VERSION,
            )
        assert_anthropic_error(resp, 413, "request_too_large", "payload_too_large")
        with pytest.raises(anthropic.ContentTooLargeError):
            await sdk(gw).messages.create(
                model="sim-fast", max_tokens=8, messages=[{"role": "user", "content": "a" * 4096}]
            )
    finally:
        await gw.close()


async def test_sdk_error_classes(gw: Gateway):
    with pytest.raises(anthropic.NotFoundError) as missing:
        await sdk(gw).messages.create(
            model="nope", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    assert missing.value.type == "not_found_error"
    assert missing.value.request_id and missing.value.request_id.startswith("req_")
    with pytest.raises(anthropic.AuthenticationError):
        await sdk(gw, api_key="sk-wrong").messages.create(
            model="sim-fast", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(anthropic.BadRequestError) as bad:
        await sdk(gw).messages.create(
            model="sim-fast",
            max_tokens=8,
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    assert bad.value.type == "invalid_request_error"


async def test_failure_before_any_token_is_a_real_http_error(gw: Gateway):
    async def scenario(work, fake):
        problem = chat_pb2.Problem(
            code="upstream_unavailable",
            message="No provider answered.",
            http_status=503,
            retry_after_ms=2000,
        )
        await fake.emit(
            work,
            inference_pb2.StreamEvent(sequence=1, failure=inference_pb2.Failure(problem=problem)),
        )

    gw.fake.scenario = scenario
    async with gw.authed() as http:
        for stream in (False, True):
            resp = await http.post(MESSAGES, json=base(stream=stream), headers=VERSION)
            assert_anthropic_error(resp, 503, "overloaded_error", "upstream_unavailable")
            assert resp.headers["retry-after"] == "2"
            assert resp.headers["anthropic-ratelimit-requests-limit"] == "600"


async def test_rate_limited_gets_429_with_anthropic_headers(gw: Gateway):
    gw.fake.reserve = limiter_pb2.ReserveResponse(
        allowed=False,
        denied_by="tpm",
        retry_after_ms=2500,
        policies=[
            limiter_pb2.PolicyState(
                name="tpm", quota=1000, remaining=0, window_seconds=60, reset_ms=2500
            ),
            POLICIES[1],
        ],
    )
    async with gw.authed() as http:
        resp = await http.post(MESSAGES, json=base(), headers=VERSION)
    assert_anthropic_error(resp, 429, "rate_limit_error", "rate_limited")
    assert resp.headers["retry-after"] == "3"
    assert resp.headers["anthropic-ratelimit-tokens-limit"] == "1000"
    assert resp.headers["anthropic-ratelimit-tokens-remaining"] == "0"
    reset = resp.headers["anthropic-ratelimit-tokens-reset"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", reset)
    assert resp.headers["ratelimit"] == '"tpm";r=0;t=3'
    assert not gw.fake.work
    with pytest.raises(anthropic.RateLimitError):
        await sdk(gw).messages.create(
            model="sim-fast", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )


async def test_wrong_method_and_unknown_subroute(gw: Gateway):
    async with gw.authed() as http:
        wrong = await http.get(MESSAGES)
        missing = await http.post(MESSAGES + "/count_tokens", json=base())
    assert_anthropic_error(wrong, 405, "invalid_request_error", "method_not_allowed")
    assert "POST" in wrong.headers["allow"]
    assert_anthropic_error(missing, 404, "not_found_error", "not_found")


async def test_openapi_lists_the_route(gw: Gateway):
    async with gw.http() as http:
        docs = await http.get("/docs/openapi.json")
    operation = docs.json()["paths"]["/v1/messages"]["post"]
    assert operation["operationId"] == "createMessage"
    assert "Anthropic" in operation["summary"] and "anthropic-version" in operation["description"]


async def test_final_sluice_matches_the_openai_route(gw: Gateway):
    # The same answer through both front doors carries the same sluice members.
    async with gw.authed() as http:
        chat = await http.post(
            "/v1/chat/completions",
            json={"model": "sim-fast", "messages": [{"role": "user", "content": "x"}]},
        )
        message = await http.post(MESSAGES, json=base(), headers=VERSION)
    assert set(chat.json()["sluice"]) == set(message.json()["sluice"])
    m = meta()
    assert set(final_sluice(m, final_answer(), cache_hit=False)) == set(message.json()["sluice"])


def test_cache_control_breakpoints_are_kept():
    ephemeral = {"type": "ephemeral"}
    body = parse_messages_body(
        orjson.dumps(
            {
                "model": "sim-fast",
                "max_tokens": 8,
                "system": [{"type": "text", "text": "manual", "cache_control": ephemeral}],
                "tools": [
                    {
                        "name": "f",
                        "input_schema": {"type": "object"},
                        "cache_control": {"type": "ephemeral", "ttl": "1h"},
                    }
                ],
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "a"},
                            {"type": "text", "text": "b", "cache_control": ephemeral},
                        ],
                    },
                    {
                        "role": "assistant",
                        "content": [
                            {
                                "type": "tool_use",
                                "id": "t1",
                                "name": "f",
                                "input": {},
                                "cache_control": ephemeral,
                            }
                        ],
                    },
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t1",
                                "content": "ok",
                                "cache_control": ephemeral,
                            }
                        ],
                    },
                ],
            }
        )
    )
    req = anthropic_to_chat_request(body)
    marker = '{"type":"ephemeral"}'
    system, user, assistant, tool = req.messages
    assert system.text == "manual" and system.cache_control_json == marker
    assert [p.cache_control_json for p in user.parts] == ["", marker]
    assert assistant.cache_control_json == marker
    assert tool.role == "tool" and tool.cache_control_json == marker
    assert req.tools[0].cache_control_json == '{"ttl":"1h","type":"ephemeral"}'
    with pytest.raises(SluiceError):
        # An unknown breakpoint type is a 400 naming the block.
        anthropic_to_chat_request(
            parse_messages_body(
                orjson.dumps(
                    {
                        "model": "m",
                        "max_tokens": 8,
                        "messages": [
                            {
                                "role": "user",
                                "content": [
                                    {
                                        "type": "text",
                                        "text": "a",
                                        "cache_control": {"type": "forever"},
                                    }
                                ],
                            }
                        ],
                    }
                )
            )
        )
