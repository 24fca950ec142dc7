"""The Anthropic-compatible adapter against a fake Messages API running as its own
process (``tests/support/fake_anthropic.py``): the request mapping, plain and streamed
answers, tool use both ways, prompt-cache breakpoints passed through and the cache
reads they earn, and provider faults mapped to Sluice codes.

Not covered by the fake: Anthropic's real tokenizer and cache minimums (a real endpoint
caches only prefixes above 1,024 tokens), extended thinking, server tools."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from sluice.catalog import ProviderConfig
from sluice.common.v1 import chat_pb2
from sluice.devtools.embedded import free_port, wait_for_port
from sluice.errors import ErrorCode
from sluice.inference.v1 import inference_pb2

from services.inference_worker.adapters.providers import build_provider
from services.inference_worker.adapters.providers.anthropic import (
    AnthropicProvider,
    request_to_json,
)
from services.inference_worker.domain.upstream import UpstreamFailure
from tests.support.fake_anthropic import ANSWER, KEY, TOOL_INPUT
from tests.support.stack import REPO

EPHEMERAL = '{"type":"ephemeral"}'


@pytest.fixture(scope="module")
def fake_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("fake-anthropic") / "fake.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_anthropic", "--port", str(port)],
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", port, 20, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
async def claude(
    fake_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AnthropicProvider]:
    monkeypatch.setenv("FAKE_ANTHROPIC_KEY", KEY)
    provider = build_provider(
        ProviderConfig(
            name="anthropic", kind="anthropic", base_url=fake_url, api_key_env="FAKE_ANTHROPIC_KEY"
        )
    )
    assert isinstance(provider, AnthropicProvider)
    yield provider
    await provider.close()


async def last_request(fake_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        bodies: list[dict[str, Any]] = (await http.get(fake_url + "/_fake/requests")).json()
    return bodies[-1]


def ask(text: str, *, stream: bool = False, max_tokens: int = 64) -> chat_pb2.ChatRequest:
    request = chat_pb2.ChatRequest(
        model="claude-test",
        messages=[
            chat_pb2.Message(role="system", text="Be brief."),
            chat_pb2.Message(role="user", text=text),
        ],
        stream=stream,
    )
    request.sampling.max_tokens = max_tokens
    return request


class Collect:
    def __init__(self) -> None:
        self.deltas: list[inference_pb2.Delta] = []

    async def __call__(self, delta: inference_pb2.Delta) -> None:
        self.deltas.append(delta)


def test_the_request_mapping() -> None:
    request = chat_pb2.ChatRequest(model="m", user="u-1")
    request.messages.extend(
        [
            chat_pb2.Message(role="system", text="sys", cache_control_json=EPHEMERAL),
            chat_pb2.Message(
                role="user",
                parts=[
                    chat_pb2.ContentPart(type="text", text="look"),
                    chat_pb2.ContentPart(
                        type="image_url",
                        image_url="data:image/png;base64,AAAA",
                        cache_control_json=EPHEMERAL,
                    ),
                ],
            ),
            chat_pb2.Message(
                role="assistant",
                tool_calls=[chat_pb2.ToolCall(id="t1", name="f", arguments='{"a": 1}')],
            ),
            chat_pb2.Message(role="tool", tool_call_id="t1", text="42"),
            chat_pb2.Message(role="user", text="and?"),
        ]
    )
    request.tools.append(
        chat_pb2.Tool(name="f", parameters_json='{"type":"object"}', cache_control_json=EPHEMERAL)
    )
    request.tool_choice_json = '"required"'
    request.parallel_tool_calls = False
    request.sampling.temperature = 1.5
    request.sampling.stop.append("END")
    request.extra_json = '{"top_k": 5}'
    body = request_to_json(request, "claude-up", stream=True)
    assert body["model"] == "claude-up" and body["stream"] is True
    assert body["max_tokens"] == 4096
    assert body["system"] == [
        {"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}
    ]
    assert body["messages"][0]["content"][1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
        "cache_control": {"type": "ephemeral"},
    }
    assert body["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}],
    }
    # The tool result and the next user text are one user turn (roles alternate).
    assert body["messages"][2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "42"},
            {"type": "text", "text": "and?"},
        ],
    }
    assert body["tools"][0]["cache_control"] == {"type": "ephemeral"}
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["temperature"] == 1.0 and body["stop_sequences"] == ["END"]
    assert body["top_k"] == 5 and body["metadata"] == {"user_id": "u-1"}


async def test_a_plain_answer_with_usage(claude: AnthropicProvider, fake_url: str) -> None:
    answer = await claude.chat(ask("hi"), "claude-up")
    choice = answer.choices[0]
    assert choice.content == ANSWER and choice.finish_reason == "stop"
    assert answer.usage_reported and answer.usage.output_tokens == len(ANSWER.split())
    assert answer.response_id.startswith("msg_")
    sent = await last_request(fake_url)
    assert sent["system"] == [{"type": "text", "text": "Be brief."}]
    truncated = await claude.chat(ask("hi", max_tokens=2), "claude-up")
    assert truncated.choices[0].finish_reason == "length"


async def test_a_streamed_answer(claude: AnthropicProvider) -> None:
    sink = Collect()
    answer = await claude.chat(ask("hi", stream=True), "claude-up", on_delta=sink)
    assert "".join(d.content for d in sink.deltas) == ANSWER == answer.choices[0].content
    assert sink.deltas[0].role == "assistant"
    assert sink.deltas[-1].finish_reason == "stop"
    assert answer.usage.output_tokens == len(ANSWER.split())
    assert answer.usage.input_tokens > 0 and answer.ttft_s is not None


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_use_both_ways(claude: AnthropicProvider, stream: bool) -> None:
    request = ask("weather?", stream=stream)
    request.tools.append(chat_pb2.Tool(name="weather", parameters_json='{"type":"object"}'))
    request.tool_choice_json = '"required"'
    sink = Collect()
    answer = await claude.chat(request, "claude-up", on_delta=sink if stream else None)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.tool_calls
    assert call.name == "weather" and call.id.startswith("toolu_")
    assert json.loads(call.arguments) == TOOL_INPUT
    # The call and its result go back as tool_use and tool_result.
    follow = ask("weather?")
    follow.messages.append(chat_pb2.Message(role="assistant", tool_calls=[call]))
    follow.messages.append(chat_pb2.Message(role="tool", tool_call_id=call.id, text="sunny"))
    again = await claude.chat(follow, "claude-up")
    assert again.choices[0].content == ANSWER


async def test_cache_control_is_passed_and_reads_are_reported(
    claude: AnthropicProvider, fake_url: str
) -> None:
    long_system = "You answer questions about a long manual. " * 40
    request = ask("question one")
    request.messages[0].text = long_system
    request.messages[0].cache_control_json = EPHEMERAL
    first = await claude.chat(request, "claude-up")
    sent = await last_request(fake_url)
    assert sent["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert first.usage.cached_input_tokens == 0
    request.messages[1].text = "question two"
    second = await claude.chat(request, "claude-up")
    # The prefix was written by the first call and read by the second; the prompt
    # counts cached tokens too, as OpenAI's prompt_tokens does.
    assert second.usage.cached_input_tokens > 100
    assert second.usage.input_tokens > second.usage.cached_input_tokens
    assert second.usage.input_tokens == first.usage.input_tokens


@pytest.mark.parametrize(
    ("fault", "code"),
    [("429", ErrorCode.UPSTREAM_RATE_LIMITED), ("529", ErrorCode.UPSTREAM_UNAVAILABLE)],
)
async def test_faults_map_to_codes(claude: AnthropicProvider, fault: str, code: ErrorCode) -> None:
    with pytest.raises(UpstreamFailure) as caught:
        await claude.chat(ask(f"[fault:{fault}]"), "claude-up")
    assert caught.value.code is code
    assert not caught.value.permanent


async def test_a_cut_stream_is_interrupted_with_partial_usage(claude: AnthropicProvider) -> None:
    sink = Collect()
    with pytest.raises(UpstreamFailure) as caught:
        await claude.chat(ask("[fault:cut]", stream=True), "claude-up", on_delta=sink)
    assert caught.value.code is ErrorCode.UPSTREAM_STREAM_INTERRUPTED
    assert caught.value.relayed and caught.value.usage.output_tokens >= 0
    assert sink.deltas


async def test_a_wrong_key_is_a_permanent_upstream_error(fake_url: str) -> None:
    provider = AnthropicProvider(
        ProviderConfig(name="anthropic", kind="anthropic", base_url=fake_url)
    )
    try:
        with pytest.raises(UpstreamFailure) as caught:
            await provider.chat(ask("hi"), "claude-up")
    finally:
        await provider.close()
    assert caught.value.code is ErrorCode.UPSTREAM_ERROR and caught.value.permanent
    assert KEY not in caught.value.error.detail
