"""The adapter against the real llama.cpp server serving the real Qwen model."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from sluice.catalog import ProviderConfig
from sluice.common.v1 import chat_pb2
from sluice.devtools.embedded import EmbeddedNats, free_port
from sluice.devtools.localmodel import (
    MODEL_ALIAS,
    MODEL_SIZE,
    ensure_model,
    start_llama_server,
    wait_llama_ready,
)
from sluice.inference.v1 import inference_pb2
from sluice.topology import ALL_SERVICES, ServiceName

from services.gateway.domain.verdict import AnswerTally, Checks, assess
from services.inference_worker.adapters.providers.openai_compat import OpenAICompatProvider
from tests.support.stack import REPO, Stack

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="session")
def llama_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Reused across runs (gitignored): assembling and verifying the model once is enough.
    model = ensure_model(REPO / ".sluice" / "models")
    assert model.stat().st_size == MODEL_SIZE
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "llama-server.log"
    proc = start_llama_server(model, port, log_file=log, ctx_size=4096)
    try:
        wait_llama_ready(port, 120, proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def qwen(llama_url: str) -> AsyncIterator[OpenAICompatProvider]:
    provider = OpenAICompatProvider(
        ProviderConfig(name="local-llama", kind="openai", base_url=llama_url, timeout_seconds=120)
    )
    yield provider
    await provider.close()


def ask(text: str, *, max_tokens: int, stream: bool = False) -> chat_pb2.ChatRequest:
    request = chat_pb2.ChatRequest(
        model="qwen2.5-coder-0.5b",
        messages=[chat_pb2.Message(role="user", text=text)],
        stream=stream,
    )
    request.sampling.max_tokens = max_tokens
    request.sampling.temperature = 0
    return request


async def test_sensible_non_stream_answer(qwen: OpenAICompatProvider) -> None:
    answer = await qwen.chat(
        ask("What is the capital of France? Answer in one word.", max_tokens=16), MODEL_ALIAS
    )
    assert "paris" in answer.choices[0].content.lower()
    assert answer.usage_reported and answer.usage.input_tokens > 5
    assert 0 < answer.usage.output_tokens <= 16


async def test_stream_with_usage(qwen: OpenAICompatProvider) -> None:
    deltas: list[inference_pb2.Delta] = []

    async def collect(delta: inference_pb2.Delta) -> None:
        deltas.append(delta)

    answer = await qwen.chat(
        ask("Write a Python function that adds two numbers.", max_tokens=24, stream=True),
        MODEL_ALIAS,
        on_delta=collect,
    )
    assert len(deltas) > 3, "tokens arrive as separate deltas"
    assert answer.usage_reported
    assert answer.usage.output_tokens == 24
    assert answer.choices[0].finish_reason == "length"
    assert "def" in answer.choices[0].content
    assert answer.ttft_s is not None and answer.ttft_s < answer.total_s
    print(f"qwen: {answer.usage.output_tokens / (answer.total_s - answer.ttft_s):.1f} tokens/s")


async def test_json_schema_response_format_is_honoured(qwen: OpenAICompatProvider) -> None:
    request = ask("Give the name and age of a fictional person.", max_tokens=48)
    request.response_format.type = "json_schema"
    request.response_format.schema_name = "person"
    request.response_format.schema_json = json.dumps(
        {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": False,
        }
    )
    answer = await qwen.chat(request, MODEL_ALIAS)
    data = json.loads(answer.choices[0].content)
    assert set(data) == {"name", "age"}
    assert isinstance(data["name"], str) and isinstance(data["age"], int)


@pytest.mark.parametrize("stream", [False, True])
async def test_logprobs_come_back_and_give_a_confidence(
    qwen: OpenAICompatProvider, stream: bool
) -> None:
    request = ask("What is the capital of France? Answer in one word.", max_tokens=8)
    request.stream = stream
    request.sampling.logprobs = True
    request.sampling.top_logprobs = 2
    deltas: list[inference_pb2.Delta] = []

    async def collect(delta: inference_pb2.Delta) -> None:
        deltas.append(delta)

    answer = await qwen.chat(request, MODEL_ALIAS, on_delta=collect if stream else None)
    choice = answer.choices[0]
    content = list(choice.logprobs.content)
    assert content, "llama.cpp returns logprobs when asked"
    # One per generated token; the end-of-generation token may come without one.
    assert answer.usage.output_tokens - 1 <= len(content) <= answer.usage.output_tokens
    assert all(t.logprob <= 0 for t in content)
    assert all(1 <= len(t.top_logprobs) <= 2 for t in content)
    # At temperature 0 the chosen token is the most likely one.
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob, abs=1e-4)
    if stream:
        assert sum(len(d.logprobs.content) for d in deltas) == len(content)
    tally = AnswerTally()
    tally.set_choices(answer.choices)
    verdict = assess(tally, Checks(review_threshold=0.0))
    assert verdict.confidence is not None and 0 < verdict.confidence <= 1
    assert "paris" in choice.content.lower()
    # A capital asked in one word: the model is sure of it.
    assert verdict.confidence > 0.5
    print(f"qwen confidence ({'stream' if stream else 'plain'}): {verdict.confidence:.3f}")


# --- through every service ------------------------------------------------------------

STACK_KEY = "sk-sluice-local-model-stack-0123456789"


@pytest.fixture(scope="module")
async def stack_url(llama_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    root = tmp_path_factory.mktemp("model-stack")
    nats = EmbeddedNats.start(root / "nats", log_file=root / "nats.log")
    stack = Stack(
        nats_url=nats.url,
        state_dir=root / "state",
        extra_env={"SLUICE_LLAMA_URL": llama_url, "SLUICE_DEV_API_KEY": STACK_KEY},
    )
    try:
        for name in ALL_SERVICES:
            stack.start(name)
        await stack.wait_ready(list(ALL_SERVICES), timeout=90)
        yield f"http://127.0.0.1:{stack.processes[ServiceName.GATEWAY].http_port}"
    finally:
        stack.stop_all()
        nats.stop()


async def test_the_local_model_answers_with_its_status_and_confidence(stack_url: str) -> None:
    async with httpx.AsyncClient(
        base_url=stack_url, headers={"Authorization": f"Bearer {STACK_KEY}"}, timeout=120
    ) as http:
        resp = await http.post(
            "/v1/chat/completions",
            json={
                "model": "qwen2.5-coder-0.5b",
                "messages": [
                    {"role": "user", "content": "What is the capital of France? One word."}
                ],
                "max_tokens": 8,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 2,
            },
            headers={"x-sluice-review-threshold": "0.99"},
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        tokens_back = body["choices"][0]["logprobs"]["content"]
        assert tokens_back and len(tokens_back[0]["top_logprobs"]) == 2
        sluice = body["sluice"]
        assert sluice["status"] == "success"
        assert 0.5 < sluice["confidence"] < 0.99
        assert sluice["requires_human_review"] is True

        # A JSON schema the grammar-constrained model keeps, streamed over Anthropic.
        schema = {
            "type": "object",
            "properties": {"capital": {"type": "string", "maxLength": 20}},
            "required": ["capital"],
            "additionalProperties": False,
        }
        streamed = await http.post(
            "/v1/messages",
            json={
                "model": "qwen2.5-coder-0.5b",
                "max_tokens": 32,
                "temperature": 0,
                "stream": True,
                "messages": [{"role": "user", "content": "The capital of France, as JSON."}],
                "output_config": {"format": {"type": "json_schema", "schema": schema}},
            },
        )
        assert streamed.status_code == 200, streamed.text
        last = [
            json.loads(line[6:])
            for line in streamed.text.split("\n")
            if line.startswith("data: ") and '"message_delta"' in line
        ][-1]
        assert last["sluice"]["status"] == "success", last["sluice"]

        # Too short for the schema: truncated, and the JSON is cut.
        cut = await http.post(
            "/v1/chat/completions",
            json={
                "model": "qwen2.5-coder-0.5b",
                "messages": [{"role": "user", "content": "The capital of France, as JSON."}],
                "max_tokens": 3,
                "temperature": 0,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "capital", "schema": schema},
                },
            },
            headers={"x-sluice-schema-repair": "off"},
        )
        assert cut.status_code == 200, cut.text
        types = [e["type"] for e in cut.json()["sluice"]["errors"]]
        assert types == ["truncated", "schema_violation"]
        assert cut.json()["sluice"]["status"] == "partial_success"
