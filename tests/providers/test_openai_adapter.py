"""The OpenAI-compatible adapter against the simulated provider: both call shapes,
usage, tool calls, and every fault mapped to its Sluice error code."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from sluice import tokens
from sluice.common.v1 import chat_pb2
from sluice.devtools.embedded import free_port
from sluice.devtools.simulator import Simulator
from sluice.errors import ErrorCode
from sluice.inference.v1 import inference_pb2

from services.inference_worker.adapters.providers import wire
from services.inference_worker.domain.upstream import UpstreamFailure

SECRET = "zebra-violet-prompt-marker"


def chat(
    *,
    stream: bool = False,
    sim: dict[str, Any] | None = None,
    text: str = "Say hello",
    max_tokens: int | None = None,
    **fields: Any,
) -> chat_pb2.ChatRequest:
    request = chat_pb2.ChatRequest(
        model="sim-fast",
        messages=[
            chat_pb2.Message(role="system", text="You are terse."),
            chat_pb2.Message(role="user", text=text),
        ],
        stream=stream,
        **fields,
    )
    if max_tokens is not None:
        request.sampling.max_tokens = max_tokens
    if sim is not None:
        request.extra_json = json.dumps({"sim": sim})
    return request


class Collector:
    def __init__(self) -> None:
        self.deltas: list[inference_pb2.Delta] = []

    async def __call__(self, delta: inference_pb2.Delta) -> None:
        self.deltas.append(delta)

    @property
    def text(self) -> str:
        return "".join(d.content for d in self.deltas)


async def test_non_stream_answer_with_usage(make_provider) -> None:
    provider = make_provider()
    request = chat(sim={"output_tokens": 7})
    answer = await provider.chat(request, "sim-fast")
    assert len(answer.choices) == 1
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    assert len(choice.content.split()) == 7
    assert answer.usage.output_tokens == 7
    assert answer.usage.input_tokens == tokens.count_chat(request)
    assert answer.usage_reported
    assert answer.response_id.startswith("chatcmpl-")
    assert answer.model == "sim-fast"


async def test_stream_relays_each_delta_and_reports_usage(make_provider) -> None:
    provider = make_provider()
    sink = Collector()
    answer = await provider.chat(
        chat(stream=True, sim={"output_tokens": 5}), "sim-fast", on_delta=sink
    )
    # Five content deltas (the role merged into the first) and one finish delta.
    assert [bool(d.content) for d in sink.deltas] == [True] * 5 + [False]
    assert sink.deltas[0].role == "assistant"
    assert sink.deltas[-1].finish_reason == "stop"
    assert answer.usage.output_tokens == 5
    assert answer.choices[0].content == sink.text
    assert answer.ttft_s is not None and answer.ttft_s <= answer.total_s


async def test_missing_usage_is_counted_locally(make_provider) -> None:
    provider = make_provider()
    request = chat(stream=True, sim={"output_tokens": 6, "omit_usage": True})
    sink = Collector()
    answer = await provider.chat(request, "sim-fast", on_delta=sink)
    assert not answer.usage_reported
    assert answer.usage.input_tokens == tokens.count_chat(request)
    assert answer.usage.output_tokens == tokens.count_text(sink.text)
    plain = await provider.chat(chat(sim={"output_tokens": 6, "omit_usage": True}), "sim-fast")
    assert not plain.usage_reported
    assert plain.usage.output_tokens == tokens.count_text(plain.choices[0].content)


async def test_usage_details_cached_and_reasoning(make_provider) -> None:
    provider = make_provider()
    answer = await provider.chat(
        chat(sim={"output_tokens": 8, "cached_tokens": 4, "reasoning_tokens": 3}), "sim-fast"
    )
    assert answer.usage.cached_input_tokens == 4
    assert answer.usage.reasoning_tokens == 3


def weather_tools() -> list[chat_pb2.Tool]:
    return [
        chat_pb2.Tool(
            type="function",
            name="get_weather",
            description="Weather of a city",
            parameters_json=json.dumps(
                {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                }
            ),
        )
    ]


async def test_tool_calls_stream_and_non_stream(make_provider) -> None:
    provider = make_provider()
    answer = await provider.chat(
        chat(tools=weather_tools(), tool_choice_json='"required"'), "sim-fast"
    )
    call = answer.choices[0].tool_calls[0]
    assert answer.choices[0].finish_reason == "tool_calls"
    assert call.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "sim", "days": 1}

    sink = Collector()
    streamed = await provider.chat(
        chat(stream=True, tools=weather_tools(), tool_choice_json='"required"'),
        "sim-fast",
        on_delta=sink,
    )
    pieces = [c for d in sink.deltas for c in d.tool_calls]
    assert len(pieces) > 1, "arguments arrive in several deltas"
    assert pieces[0].name == "get_weather"
    merged = streamed.choices[0].tool_calls
    assert len(merged) == 1 and json.loads(merged[0].arguments) == {"city": "sim", "days": 1}
    assert streamed.choices[0].finish_reason == "tool_calls"
    assert streamed.usage.output_tokens == len(pieces)


async def test_refusal_and_truncation(make_provider) -> None:
    provider = make_provider()
    refused = await provider.chat(chat(sim={"fault": "refusal"}), "sim-fast")
    assert refused.choices[0].refusal and not refused.choices[0].content
    sink = Collector()
    streamed = await provider.chat(
        chat(stream=True, sim={"fault": "refusal"}), "sim-fast", on_delta=sink
    )
    assert streamed.choices[0].refusal == refused.choices[0].refusal
    truncated = await provider.chat(chat(sim={"fault": "truncate"}), "sim-fast")
    assert truncated.choices[0].finish_reason == "length"
    limited = await provider.chat(chat(sim={"output_tokens": 10}, max_tokens=3), "sim-fast")
    assert limited.choices[0].finish_reason == "length"
    assert limited.usage.output_tokens == 3


async def test_content_filter_finish_is_carried(make_provider) -> None:
    provider = make_provider()
    filtered = await provider.chat(chat(sim={"fault": "content_filter"}), "sim-fast")
    assert filtered.choices[0].finish_reason == "content_filter"
    sink = Collector()
    streamed = await provider.chat(
        chat(stream=True, sim={"fault": "content_filter"}), "sim-fast", on_delta=sink
    )
    assert streamed.choices[0].finish_reason == "content_filter"
    assert sink.deltas[-1].finish_reason == "content_filter"


@pytest.mark.parametrize("stream", [False, True])
async def test_logprobs_are_carried_through(make_provider, stream: bool) -> None:
    provider = make_provider()
    request = chat(stream=stream, sim={"output_tokens": 5, "logprob": -0.25})
    request.sampling.logprobs = True
    request.sampling.top_logprobs = 1
    sink = Collector()
    answer = await provider.chat(request, "sim-fast", on_delta=sink if stream else None)
    choice = answer.choices[0]
    tokens_seen = list(choice.logprobs.content)
    assert len(tokens_seen) == 5
    assert "".join(t.token for t in tokens_seen) == choice.content
    assert all(t.logprob == -0.25 for t in tokens_seen)
    assert tokens_seen[0].bytes == tokens_seen[0].token.encode()
    assert tokens_seen[0].top_logprobs[0].token == tokens_seen[0].token
    if stream:
        # Each delta carries its own tokens' log probabilities.
        assert all(d.logprobs.content for d in sink.deltas if d.content)
        assert sum(len(d.logprobs.content) for d in sink.deltas) == 5
    # Not asked: none.
    plain = await provider.chat(chat(stream=False, sim={"output_tokens": 3}), "sim-fast")
    assert not plain.choices[0].HasField("logprobs")


async def test_replies_answer_in_turn(make_provider) -> None:
    provider = make_provider()
    sim = {"id": uuid.uuid4().hex, "replies": ["first answer", '{"ok": true}']}
    first = await provider.chat(chat(sim=sim), "sim-fast")
    assert first.choices[0].content == "first answer"
    sink = Collector()
    second = await provider.chat(chat(stream=True, sim=sim), "sim-fast", on_delta=sink)
    assert second.choices[0].content == '{"ok": true}' == sink.text


@pytest.mark.parametrize(
    ("fault", "code", "status"),
    [
        ("429", ErrorCode.UPSTREAM_RATE_LIMITED, 429),
        ("500", ErrorCode.UPSTREAM_ERROR, 500),
        ("503", ErrorCode.UPSTREAM_UNAVAILABLE, 503),
        ("context_length", ErrorCode.CONTEXT_LENGTH_EXCEEDED, 400),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_http_faults_map_to_codes(
    make_provider, fault: str, code: ErrorCode, status: int, stream: bool
) -> None:
    provider = make_provider()
    sink = Collector()
    with pytest.raises(UpstreamFailure) as info:
        await provider.chat(
            chat(stream=stream, sim={"fault": fault, "retry_after_ms": 1500}, text=SECRET),
            "sim-fast",
            on_delta=sink if stream else None,
        )
    failure = info.value
    assert failure.code is code
    assert failure.upstream_status == status
    assert not failure.relayed and sink.deltas == []
    assert failure.usage.output_tokens == 0
    assert SECRET not in failure.error.detail
    if fault == "429":
        assert failure.error.retry_after_ms == 1500
        assert failure.retry_same
    if fault == "context_length":
        assert not failure.retry_same and failure.try_fallback


async def test_connect_timeout_maps_to_upstream_timeout(make_provider) -> None:
    provider = make_provider(timeout_seconds=0.3)
    started = time.monotonic()
    with pytest.raises(UpstreamFailure) as info:
        await provider.chat(chat(sim={"fault": "connect_timeout", "hold_ms": 5000}), "sim-fast")
    assert info.value.code is ErrorCode.UPSTREAM_TIMEOUT
    assert time.monotonic() - started < 2


async def test_deadline_bounds_the_call(make_provider) -> None:
    provider = make_provider()
    with pytest.raises(UpstreamFailure) as info:
        await provider.chat(
            chat(sim={"ttft_ms": 3000}), "sim-fast", deadline=time.monotonic() + 0.2
        )
    assert info.value.code is ErrorCode.UPSTREAM_TIMEOUT


async def test_connection_refused_is_unavailable(make_provider) -> None:
    provider = make_provider(
        base_url=f"http://127.0.0.1:{free_port()}/v1", connect_timeout_seconds=1.0
    )
    with pytest.raises(UpstreamFailure) as info:
        await provider.chat(chat(), "sim-fast")
    assert info.value.code is ErrorCode.UPSTREAM_UNAVAILABLE
    assert info.value.retry_same


async def test_cut_stream_is_interrupted_with_partial_usage(make_provider) -> None:
    provider = make_provider()
    sink = Collector()
    request = chat(stream=True, sim={"fault": "cut", "cut_after": 4, "output_tokens": 10})
    with pytest.raises(UpstreamFailure) as info:
        await provider.chat(request, "sim-fast", on_delta=sink)
    failure = info.value
    assert failure.code is ErrorCode.UPSTREAM_STREAM_INTERRUPTED
    assert failure.relayed and not failure.retry_same and not failure.try_fallback
    assert len(sink.deltas) == 4
    assert failure.usage.output_tokens == tokens.count_text(sink.text)
    assert failure.usage.input_tokens == tokens.count_chat(request)


async def test_stall_longer_than_read_timeout_interrupts(make_provider) -> None:
    provider = make_provider(timeout_seconds=0.3)
    sink = Collector()
    with pytest.raises(UpstreamFailure) as info:
        await provider.chat(
            chat(stream=True, sim={"fault": "stall", "stall_after": 2, "stall_ms": 3000}),
            "sim-fast",
            on_delta=sink,
        )
    assert info.value.code is ErrorCode.UPSTREAM_STREAM_INTERRUPTED
    assert info.value.error.details["cause"] == "timeout"
    assert len(sink.deltas) == 2


async def test_short_stall_is_tolerated(make_provider) -> None:
    provider = make_provider(timeout_seconds=2)
    sink = Collector()
    answer = await provider.chat(
        chat(
            stream=True,
            sim={"fault": "stall", "stall_after": 2, "stall_ms": 200, "output_tokens": 4},
        ),
        "sim-fast",
        on_delta=sink,
    )
    assert answer.usage.output_tokens == 4


async def test_fail_times_fails_only_first_attempts(make_provider, simulator: Simulator) -> None:
    provider = make_provider()
    sim_id = uuid.uuid4().hex
    request = chat(sim={"fault": "503", "fail_times": 2, "id": sim_id})
    for _ in range(2):
        with pytest.raises(UpstreamFailure):
            await provider.chat(request, "sim-fast")
    answer = await provider.chat(request, "sim-fast")
    assert answer.choices[0].content
    assert simulator.stats.by_id[sim_id] == 3


async def test_invalid_request_message_is_sanitised(make_provider) -> None:
    provider = make_provider()
    with pytest.raises(UpstreamFailure) as info:
        await provider.chat(chat(sim={"fault": "bogus"}, text=SECRET), "sim-fast")
    assert info.value.code is ErrorCode.INVALID_REQUEST
    assert "bogus" not in info.value.error.detail  # the quoted value is redacted
    assert not info.value.retry_same and not info.value.try_fallback


def test_request_conversion_covers_every_field() -> None:
    request = chat_pb2.ChatRequest(
        model="alias",
        messages=[
            chat_pb2.Message(
                role="user",
                parts=[
                    chat_pb2.ContentPart(type="text", text="look"),
                    chat_pb2.ContentPart(
                        type="image_url", image_url="http://x/i.png", image_detail="low"
                    ),
                    chat_pb2.ContentPart(raw_json=b'{"type":"input_audio","input_audio":{}}'),
                ],
            ),
            chat_pb2.Message(
                role="assistant",
                tool_calls=[chat_pb2.ToolCall(id="c1", type="function", name="f", arguments="{}")],
            ),
            chat_pb2.Message(role="tool", text="42", tool_call_id="c1"),
        ],
        tools=weather_tools(),
        tool_choice_json='{"type":"function","function":{"name":"get_weather"}}',
        response_format=chat_pb2.ResponseFormat(
            type="json_schema", schema_name="s", schema_json='{"type":"object"}', strict=True
        ),
        extra_json='{"sim":{"ttft_ms":1},"model":"ignored","logit_bias":{"1":2}}',
        parallel_tool_calls=False,
        user="u1",
    )
    s = request.sampling
    s.temperature, s.top_p, s.max_tokens, s.n, s.seed = 0.5, 0.9, 12, 2, 7
    s.stop.extend(["\n"])
    body = wire.request_to_json(request, "upstream", stream=True)
    assert body["model"] == "upstream"
    assert body["sim"] == {"ttft_ms": 1} and body["logit_bias"] == {"1": 2}
    assert body["messages"][0]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "http://x/i.png", "detail": "low"},
    }
    assert body["messages"][0]["content"][2]["type"] == "input_audio"
    assert body["messages"][1]["content"] is None
    assert body["messages"][1]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert body["messages"][2]["tool_call_id"] == "c1"
    assert body["tools"][0]["function"]["parameters"]["properties"]["city"] == {"type": "string"}
    assert body["tool_choice"]["function"]["name"] == "get_weather"
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "s", "schema": {"type": "object"}, "strict": True},
    }
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["n"], body["seed"]) == (
        0.5,
        0.9,
        12,
        2,
        7,
    )
    assert body["stop"] == ["\n"] and body["parallel_tool_calls"] is False
    assert body["stream_options"] == {"include_usage": True}
    assert "stream_options" not in wire.request_to_json(request, "u", stream=False)


def test_retry_after_forms() -> None:
    assert wire.retry_after_ms({"retry-after-ms": "250"}) == 250
    assert wire.retry_after_ms({"retry-after": "2"}) == 2000
    assert wire.retry_after_ms({}) is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25_000 <= (wire.retry_after_ms({"retry-after": future}) or 0) <= 31_000
