"""What Sluice says about each answer, through every process, with the simulator's
faults: the status, the errors, logprobs and confidence, the schema and its repair, in
both dialects and with the official SDKs."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.e2e.conftest import DEV_KEY, RunningStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "people": {"type": "integer"}},
    "required": ["city", "people"],
    "additionalProperties": False,
}


def body(sim: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": f"status {uuid.uuid4().hex}"}],
        "max_tokens": 16,
        **kw,
    }
    if sim is not None:
        out["sim"] = sim
    return out


def data_events(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:])
        for line in text.split("\n")
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


@pytest.mark.parametrize(
    ("sim", "status", "types"),
    [
        ({}, "success", []),
        ({"fault": "truncate"}, "partial_success", ["truncated"]),
        ({"fault": "refusal"}, "failed", ["refusal"]),
        ({"fault": "content_filter"}, "partial_success", ["content_filtered"]),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_each_fault_has_its_status(
    client: httpx.AsyncClient, sim: dict[str, Any], status: str, types: list[str], stream: bool
) -> None:
    resp = await client.post("/v1/chat/completions", json=body(sim, stream=stream))
    assert resp.status_code == 200, resp.text
    sluice = data_events(resp.text)[-1]["sluice"] if stream else resp.json()["sluice"]
    assert sluice["status"] == status
    assert [e["type"] for e in sluice["errors"]] == types
    for error in sluice["errors"]:
        assert set(error) == {"type", "message", "severity", "recovery_suggested"}


async def test_a_cut_stream_ends_with_its_status(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/v1/chat/completions",
        json=body({"fault": "cut", "cut_after": 3, "tokens_per_second": 200}, stream=True),
    )
    match = re.search(r"event: error\ndata: (.+)\n", resp.text)
    assert match is not None, resp.text
    problem = json.loads(match.group(1))
    assert problem["code"] == "upstream_stream_interrupted"
    assert problem["sluice"]["status"] == "partial_success"
    assert problem["sluice"]["errors"][0]["type"] == "truncated"


async def test_logprobs_and_confidence_with_the_openai_sdk(e2e: RunningStack) -> None:
    client = openai.AsyncOpenAI(base_url=e2e.gateway_url + "/v1", api_key=DEV_KEY, max_retries=0)
    completion = await client.chat.completions.create(
        model="sim-fast",
        messages=[{"role": "user", "content": f"lp {uuid.uuid4().hex}"}],
        max_tokens=6,
        logprobs=True,
        top_logprobs=1,
        extra_body={"sim": {"logprob": -0.1, "output_tokens": 6}},
        extra_headers={"x-sluice-review-threshold": "0.95"},
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert len(logprobs.content) == 6
    assert logprobs.content[0].logprob == pytest.approx(-0.1)
    sluice = (completion.model_extra or {})["sluice"]
    assert sluice["confidence"] == pytest.approx(0.904837, abs=1e-5)
    assert sluice["requires_human_review"] is True
    assert sluice["status"] == "success"

    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await client.chat.completions.create(
            model="sim-fast",
            messages=[{"role": "user", "content": f"lp {uuid.uuid4().hex}"}],
            max_tokens=6,
            extra_body={"sim": {"logprob": -1.0}},
            extra_headers={"x-sluice-min-confidence": "0.5"},
        )
    assert caught.value.code == "insufficient_confidence"


async def test_the_schema_is_checked_and_repaired(client: httpx.AsyncClient) -> None:
    sim = {"id": uuid.uuid4().hex, "replies": ['{"city": "Oslo"}', '{"city": "Oslo", "people": 7}']}
    resp = await client.post(
        "/v1/chat/completions",
        json=body(
            sim,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "place", "schema": SCHEMA},
            },
        ),
    )
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert json.loads(answer["choices"][0]["message"]["content"]) == {"city": "Oslo", "people": 7}
    sluice = answer["sluice"]
    assert sluice["status"] == "success"
    assert sluice["repair"]["succeeded"] is True


async def test_anthropic_sdk_sees_the_status(e2e: RunningStack) -> None:
    client = anthropic.AsyncAnthropic(base_url=e2e.gateway_url, api_key=DEV_KEY, max_retries=0)
    message = await client.messages.create(
        model="sim-fast",
        # The simulator answers 16 tokens: 2 stop at the limit.
        max_tokens=2,
        messages=[{"role": "user", "content": f"a {uuid.uuid4().hex}"}],
    )
    assert message.stop_reason == "max_tokens"
    sluice = (message.model_extra or {})["sluice"]
    assert sluice["status"] == "partial_success"
    assert sluice["errors"][0]["type"] == "truncated"
