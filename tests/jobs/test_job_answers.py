"""A job's answer is judged as a direct answer is: the caller's confidence thresholds
(body ``sluice`` object, or the headers of ``Prefer: respond-async``) and the schema
travel with the job; an answer below the minimum ends the job ``failed`` with
``insufficient_confidence``, its answer kept."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.jobs.test_jobs import finished, submit
from tests.support.full_stack import FullStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def request(logprob: float, **sluice: Any) -> dict[str, Any]:
    return {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": f"judge me {uuid.uuid4().hex}"}],
        "max_tokens": 32,
        "sim": {"logprob": logprob, "output_tokens": 6},
        "sluice": sluice,
    }


async def test_a_job_below_the_review_threshold_is_marked(jobs_stack: FullStack) -> None:
    async with jobs_stack.client() as client:
        job = await submit(client, request(-0.5, review_threshold=0.9))
        done = await finished(client, job["id"])
    assert done["status"] == "completed"
    sluice = done["result"]["sluice"]
    assert sluice["status"] == "success"
    assert sluice["confidence"] == pytest.approx(0.606531, abs=1e-5)
    assert sluice["requires_human_review"] is True
    # The caller did not ask for logprobs: measured, not returned.
    assert done["result"]["choices"][0]["logprobs"] is None


async def test_a_job_below_the_minimum_fails_with_its_answer(jobs_stack: FullStack) -> None:
    async with jobs_stack.client() as client:
        job = await submit(client, request(-2.0, min_confidence=0.5))
        done = await finished(client, job["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "insufficient_confidence"
    assert done["result"]["sluice"]["confidence"] == pytest.approx(0.135335, abs=1e-5)


async def test_prefer_respond_async_takes_the_headers(jobs_stack: FullStack) -> None:
    async with jobs_stack.client() as client:
        body = request(-0.5)
        body.pop("sluice")
        resp = await client.post(
            "/v1/chat/completions",
            json=body,
            headers={"Prefer": "respond-async", "x-sluice-review-threshold": "0.9"},
        )
        assert resp.status_code == 202, resp.text
        done = await finished(client, resp.json()["id"])
    assert done["result"]["sluice"]["requires_human_review"] is True
