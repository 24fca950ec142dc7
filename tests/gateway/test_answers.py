"""What Sluice says about each answer (``sluice.status``, ``sluice.errors[]``,
confidence, review, the schema and its repair), in both dialects, with the test standing
in for the worker."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson
import pytest
from sluice.common.v1 import chat_pb2
from sluice.inference.v1 import inference_pb2

from services.gateway.domain.verdict import (
    AnswerTally,
    Checks,
    IssueType,
    Status,
    assess,
    schema_problems,
)
from tests.gateway.harness import Gateway, answer

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "people": {"type": "integer"}},
    "required": ["city", "people"],
    "additionalProperties": False,
}


def logprobs(*probabilities: float) -> chat_pb2.Logprobs:
    return chat_pb2.Logprobs(
        content=[
            chat_pb2.TokenLogprob(
                token=f"t{i}",
                logprob=math.log(p),
                bytes=b"t",
                top_logprobs=[chat_pb2.TopLogprob(token=f"t{i}", logprob=math.log(p))],
            )
            for i, p in enumerate(probabilities)
        ]
    )


def tally_of(*choices: chat_pb2.Choice) -> AnswerTally:
    tally = AnswerTally()
    tally.set_choices(choices)
    return tally


# --- the verdict ----------------------------------------------------------------------


def test_a_whole_answer_is_a_success():
    verdict = assess(tally_of(chat_pb2.Choice(content="Paris", finish_reason="stop")), Checks())
    assert verdict.status is Status.SUCCESS and not verdict.issues
    assert verdict.confidence is None and not verdict.requires_human_review
    assert verdict.to_json() == {
        "status": "success",
        "errors": [],
        "confidence": None,
        "requires_human_review": False,
    }


def test_length_is_truncated_partial_success():
    verdict = assess(tally_of(chat_pb2.Choice(content="Par", finish_reason="length")), Checks())
    assert verdict.status is Status.PARTIAL_SUCCESS
    (issue,) = verdict.issues
    assert issue.type is IssueType.TRUNCATED and issue.severity == "error"
    assert "max_tokens" in issue.recovery_suggested


def test_a_refusal_alone_failed_and_with_text_partial():
    refused = assess(tally_of(chat_pb2.Choice(refusal="I can't", finish_reason="stop")), Checks())
    assert refused.status is Status.FAILED
    assert [i.type for i in refused.issues] == [IssueType.REFUSAL]
    # The refusal's text never goes into the message.
    assert "I can't" not in refused.issues[0].message
    mixed = assess(
        tally_of(
            chat_pb2.Choice(index=0, content="ok", finish_reason="stop"),
            chat_pb2.Choice(index=1, refusal="no", finish_reason="stop"),
        ),
        Checks(),
    )
    assert mixed.status is Status.PARTIAL_SUCCESS


def test_content_filter():
    empty = assess(tally_of(chat_pb2.Choice(finish_reason="content_filter")), Checks())
    assert empty.status is Status.FAILED
    assert [i.type for i in empty.issues] == [IssueType.CONTENT_FILTERED]
    some = assess(
        tally_of(
            chat_pb2.Choice(index=0, content="fine", finish_reason="stop"),
            chat_pb2.Choice(index=1, content="cut", finish_reason="content_filter"),
        ),
        Checks(),
    )
    assert some.status is Status.PARTIAL_SUCCESS


def test_an_interrupted_stream_is_truncated():
    tally = AnswerTally()
    tally.add_delta(inference_pb2.Delta(content="Hello"))
    verdict = assess(tally, Checks(), interrupted=True)
    assert verdict.status is Status.PARTIAL_SUCCESS
    assert verdict.issues[0].type is IssueType.TRUNCATED
    assert "prefix" in verdict.issues[0].message


def test_degraded_wins_over_success():
    verdict = assess(
        tally_of(chat_pb2.Choice(content="stored", finish_reason="stop")),
        Checks(),
        degraded="Served from the exact cache: every deployment failed.",
    )
    assert verdict.status is Status.DEGRADED
    assert verdict.issues[-1].type is IssueType.DEGRADED


def test_schema_violations_name_paths_never_values():
    schema = json.dumps(SCHEMA)
    assert schema_problems(schema, '{"city": "Oslo", "people": 5}') == []
    problems = schema_problems(schema, '{"city": "SECRET-VALUE", "people": "many"}')
    assert problems == ["people fails 'type'"]
    assert "SECRET" not in "".join(problems)
    assert schema_problems(schema, "not json")[0].startswith("the output is not valid JSON")
    assert sorted(schema_problems(schema, '{"people": 1, "extra": 2}')) == [
        "<root> fails 'additionalProperties'",
        "<root> fails 'required'",
    ]
    verdict = assess(
        tally_of(chat_pb2.Choice(content='{"city": 1}', finish_reason="stop")),
        Checks(schema_json=schema),
    )
    assert verdict.status is Status.PARTIAL_SUCCESS
    assert verdict.has(IssueType.SCHEMA_VIOLATION)
    # A tool call is not the JSON answer the schema describes.
    tool = chat_pb2.Choice(
        tool_calls=[chat_pb2.ToolCall(id="c", name="f", arguments="{}")],
        finish_reason="tool_calls",
    )
    assert assess(tally_of(tool), Checks(schema_json=schema)).status is Status.SUCCESS


def test_confidence_is_the_mean_token_probability():
    tally = AnswerTally()
    tally.add_delta(inference_pb2.Delta(content="a", logprobs=logprobs(0.9, 0.5)))
    tally.add_delta(inference_pb2.Delta(content="b", logprobs=logprobs(0.7)))
    verdict = assess(tally, Checks(review_threshold=0.75))
    assert verdict.confidence == pytest.approx((0.9 + 0.5 + 0.7) / 3)
    assert verdict.requires_human_review and not verdict.insufficient
    assert verdict.status is Status.SUCCESS
    assert verdict.issues[0].type is IssueType.LOW_CONFIDENCE
    assert verdict.issues[0].severity == "warning"
    above = assess(tally, Checks(review_threshold=0.5, min_confidence=0.6))
    assert not above.requires_human_review and not above.insufficient and not above.issues
    below = assess(tally, Checks(min_confidence=0.8))
    assert below.insufficient and not below.requires_human_review


def test_a_threshold_without_logprobs_asks_for_review():
    tally = tally_of(chat_pb2.Choice(content="x", finish_reason="stop"))
    review = assess(tally, Checks(review_threshold=0.5))
    assert review.requires_human_review and review.confidence is None
    assert assess(tally, Checks(min_confidence=0.1)).insufficient


def test_a_finished_answer_replaces_what_deltas_said():
    tally = AnswerTally()
    tally.add_delta(inference_pb2.Delta(content="partial", finish_reason="length"))
    tally.set_choices([chat_pb2.Choice(content="whole", finish_reason="stop")])
    assert assess(tally, Checks()).status is Status.SUCCESS


# --- over HTTP ------------------------------------------------------------------------


def sse_data(text: str) -> list[dict[str, Any]]:
    out = []
    for block in text.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


async def test_openai_status_logprobs_and_confidence(gw: Gateway):
    async def scenario(work, fake):
        final = answer(
            "Hi",
            choices=[
                chat_pb2.Choice(
                    index=0, content="Hi", finish_reason="stop", logprobs=logprobs(0.8, 0.6)
                )
            ],
        )
        await fake.emit(work, inference_pb2.StreamEvent(sequence=1, final=final))

    gw.fake.scenario = scenario
    async with gw.authed() as http:
        resp = await http.post(
            CHAT,
            json={
                "model": "sim-fast",
                "messages": [{"role": "user", "content": "hi"}],
                "logprobs": True,
                "top_logprobs": 1,
                "sluice": {"review_threshold": 0.9},
            },
        )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    lp = body["choices"][0]["logprobs"]
    assert [t["token"] for t in lp["content"]] == ["t0", "t1"]
    assert lp["content"][0]["logprob"] == pytest.approx(math.log(0.8))
    assert lp["content"][0]["bytes"] == [116]
    assert lp["content"][0]["top_logprobs"][0]["token"] == "t0"
    sluice = body["sluice"]
    assert sluice["status"] == "success"
    assert sluice["confidence"] == pytest.approx(0.7)
    assert sluice["requires_human_review"] is True
    assert [e["type"] for e in sluice["errors"]] == ["low_confidence"]
    # The body's sluice object is the gateway's, never the provider's.
    work = gw.fake.work[-1]
    assert "sluice" not in (work.request.extra_json or "")
    assert work.request.sampling.logprobs


async def test_a_threshold_asks_the_provider_for_logprobs_but_returns_none(gw: Gateway):
    async def scenario(work, fake):
        choice = chat_pb2.Choice(content="Hi", finish_reason="stop", logprobs=logprobs(0.99))
        final = answer("Hi", choices=[choice])
        await fake.emit(work, inference_pb2.StreamEvent(sequence=1, final=final))

    gw.fake.scenario = scenario
    async with gw.authed() as http:
        resp = await http.post(
            CHAT,
            json={"model": "sim-fast", "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-sluice-review-threshold": "0.5"},
        )
    assert resp.status_code == 200, resp.text
    assert gw.fake.work[-1].request.sampling.logprobs
    body = resp.json()
    assert body["choices"][0]["logprobs"] is None
    assert body["sluice"]["confidence"] == pytest.approx(0.99)
    assert body["sluice"]["requires_human_review"] is False


async def test_min_confidence_is_422_in_both_dialects(gw: Gateway):
    async def scenario(work, fake):
        choice = chat_pb2.Choice(content="Hi", finish_reason="stop", logprobs=logprobs(0.3))
        final = answer("Hi", choices=[choice])
        await fake.emit(work, inference_pb2.StreamEvent(sequence=1, final=final))

    gw.fake.scenario = scenario
    async with gw.authed() as http:
        resp = await http.post(
            CHAT,
            json={"model": "sim-fast", "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-sluice-min-confidence": "0.5"},
        )
        assert resp.status_code == 422, resp.text
        problem = resp.json()
        assert problem["code"] == "insufficient_confidence"
        assert problem["details"]["confidence"] == pytest.approx(0.3)
        assert problem["details"]["min_confidence"] == 0.5

        resp = await http.post(
            MESSAGES,
            json={
                "model": "sim-fast",
                "max_tokens": 16,
                "messages": [{"role": "user", "content": "hi"}],
                "sluice": {"min_confidence": 0.5},
            },
        )
    assert resp.status_code == 422, resp.text
    error = resp.json()
    assert error["type"] == "error" and error["code"] == "insufficient_confidence"


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-sluice-min-confidence", "2"),
        ("x-sluice-review-threshold", "high"),
        ("x-sluice-schema-repair", "maybe"),
    ],
)
async def test_bad_hint_headers_are_400(gw: Gateway, header: str, value: str):
    async with gw.authed() as http:
        resp = await http.post(
            CHAT,
            json={"model": "sim-fast", "messages": [{"role": "user", "content": "hi"}]},
            headers={header: value},
        )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == header
    assert not gw.fake.work


def schema_body(**kw: Any) -> dict[str, Any]:
    return {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": "Where?"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "place", "schema": SCHEMA},
        },
        **kw,
    }


async def test_schema_violation_is_repaired_by_a_second_call(gw: Gateway):
    async def scenario(work, fake):
        repaired = work.request_id.endswith("-repair")
        text = '{"city": "Oslo", "people": 5}' if repaired else '{"city": "Oslo"}'
        final = answer(text, cost_usd=0.001, cost_usd_nanos=1_000_000)
        await fake.emit(work, inference_pb2.StreamEvent(sequence=1, final=final))

    gw.fake.scenario = scenario
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=schema_body())
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert json.loads(body["choices"][0]["message"]["content"]) == {"city": "Oslo", "people": 5}
    sluice = body["sluice"]
    assert sluice["status"] == "success", sluice
    assert sluice["repair"]["succeeded"] is True
    assert sluice["repair"]["request_id"].endswith("-repair")
    # Both calls are billed, and the answer says what it cost in all.
    assert body["usage"]["prompt_tokens"] == 24 and body["usage"]["completion_tokens"] == 6
    assert sluice["cost_usd"] == pytest.approx(0.002)
    first, repair = gw.fake.work
    assert repair.request_id == first.request_id + "-repair"
    assert [m.role for m in repair.request.messages] == ["user", "assistant", "user"]
    assert repair.request.messages[1].text == '{"city": "Oslo"}'
    assert "people fails 'required'" not in repair.request.messages[2].text
    assert "<root> fails 'required'" in repair.request.messages[2].text
    assert len(gw.fake.reserves) == 2


async def test_schema_violation_kept_when_repair_is_off(gw: Gateway):
    async def scenario(work, fake):
        await fake.emit(work, inference_pb2.StreamEvent(sequence=1, final=answer("not json")))

    gw.fake.scenario = scenario
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=schema_body(), headers={"x-sluice-schema-repair": "off"})
    assert resp.status_code == 200, resp.text
    sluice = resp.json()["sluice"]
    assert sluice["status"] == "partial_success"
    assert [e["type"] for e in sluice["errors"]] == ["schema_violation"]
    assert "repair" not in sluice
    assert len(gw.fake.work) == 1


async def test_a_stream_says_truncated_on_its_last_chunk(gw: Gateway):
    async def scenario(work, fake):
        await fake.emit(
            work,
            inference_pb2.StreamEvent(
                sequence=1,
                delta=inference_pb2.Delta(content="Par", logprobs=logprobs(0.5)),
            ),
        )
        await fake.emit(
            work,
            inference_pb2.StreamEvent(
                sequence=2, delta=inference_pb2.Delta(finish_reason="length")
            ),
        )
        await fake.emit(work, inference_pb2.StreamEvent(sequence=3, final=answer("", choices=[])))

    gw.fake.scenario = scenario
    async with gw.authed() as http:
        resp = await http.post(
            CHAT,
            json={
                "model": "sim-fast",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "logprobs": True,
            },
        )
    chunks = sse_data(resp.text)
    assert chunks[0]["choices"][0]["logprobs"]["content"][0]["token"] == "t0"
    sluice = chunks[-1]["sluice"]
    assert sluice["status"] == "partial_success"
    assert sluice["errors"][0]["type"] == "truncated"
    assert sluice["confidence"] == pytest.approx(0.5)


async def test_a_cut_stream_says_what_the_client_holds(gw: Gateway):
    async def scenario(work, fake):
        await fake.emit(
            work, inference_pb2.StreamEvent(sequence=1, delta=inference_pb2.Delta(content="Hel"))
        )
        failure = inference_pb2.Failure(
            problem=chat_pb2.Problem(
                code="upstream_stream_interrupted", message="provider closed the stream"
            )
        )
        await fake.emit(work, inference_pb2.StreamEvent(sequence=2, failure=failure))

    gw.fake.scenario = scenario
    async with gw.authed() as http:
        resp = await http.post(
            CHAT,
            json={"model": "sim-fast", "messages": [{"role": "user", "content": "x"}], "stream": 1},
        )
        error = re.search(r"event: error\ndata: (.+)\n", resp.text)
        assert error is not None, resp.text
        problem = json.loads(error.group(1))
        assert problem["code"] == "upstream_stream_interrupted"
        assert problem["sluice"]["status"] == "partial_success"
        assert problem["sluice"]["errors"][0]["type"] == "truncated"

        resp = await http.post(
            MESSAGES,
            json={
                "model": "sim-fast",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
            },
        )
    error = re.search(r"event: error\ndata: (.+)\n", resp.text)
    assert error is not None, resp.text
    body = json.loads(error.group(1))
    assert body["type"] == "error" and body["sluice"]["status"] == "partial_success"


async def test_anthropic_carries_the_status_and_validates_output_config(gw: Gateway):
    async def scenario(work, fake):
        choice = chat_pb2.Choice(content='{"city": 3}', finish_reason="length")
        await fake.emit(
            work, inference_pb2.StreamEvent(sequence=1, final=answer("", choices=[choice]))
        )

    gw.fake.scenario = scenario
    async with gw.authed() as http:
        resp = await http.post(
            MESSAGES,
            json={
                "model": "sim-fast",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "x"}],
                "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}},
            },
            headers={"x-sluice-schema-repair": "off"},
        )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["stop_reason"] == "max_tokens"
    sluice = body["sluice"]
    assert sluice["status"] == "partial_success"
    assert [e["type"] for e in sluice["errors"]] == ["truncated", "schema_violation"]
    work = gw.fake.work[-1]
    assert work.request.response_format.type == "json_schema"
    assert orjson.loads(work.request.response_format.schema_json) == SCHEMA


async def test_a_stand_in_answer_is_degraded_in_both_dialects(gw: Gateway):
    async def scenario(work, fake):
        final = answer(
            "stored",
            degraded_reason="Every deployment failed; this is a stored answer to the request.",
        )
        await fake.emit(work, inference_pb2.StreamEvent(sequence=1, final=final))

    gw.fake.scenario = scenario
    async with gw.authed() as http:
        chat = await http.post(
            CHAT, json={"model": "sim-fast", "messages": [{"role": "user", "content": "x"}]}
        )
        message = await http.post(
            MESSAGES,
            json={
                "model": "sim-fast",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "x"}],
            },
        )
    for sluice in (chat.json()["sluice"], message.json()["sluice"]):
        assert sluice["status"] == "degraded"
        (error,) = sluice["errors"]
        assert error["type"] == "degraded" and "stored answer" in error["message"]


async def test_a_stream_below_the_minimum_ends_with_insufficient_confidence(gw: Gateway):
    async def scenario(work, fake):
        await fake.emit(
            work,
            inference_pb2.StreamEvent(
                sequence=1, delta=inference_pb2.Delta(content="maybe", logprobs=logprobs(0.2))
            ),
        )
        await fake.emit(work, inference_pb2.StreamEvent(sequence=2, final=answer("", choices=[])))

    gw.fake.scenario = scenario
    async with gw.authed() as http:
        resp = await http.post(
            CHAT,
            json={
                "model": "sim-fast",
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
            },
            headers={"x-sluice-min-confidence": "0.5"},
        )
    assert resp.status_code == 200
    assert "data: [DONE]" not in resp.text
    match = re.search(r"event: error\ndata: (.+)\n", resp.text)
    assert match is not None, resp.text
    problem = json.loads(match.group(1))
    assert problem["code"] == "insufficient_confidence"
    assert problem["details"]["confidence"] == pytest.approx(0.2)
    assert problem["sluice"]["confidence"] == pytest.approx(0.2)
