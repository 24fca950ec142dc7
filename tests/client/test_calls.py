"""The client's plain calls on the real stack: a retried call after a cut runs once
(Idempotency-Key), errors come typed by code with the trace id, estimates and usage."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from sluice_client import (
    AsyncSluice,
    BadRequest,
    IdempotencyKeyReused,
    InsufficientScope,
    ModelNotFound,
    NotFound,
    RateLimited,
    Sluice,
    SluiceError,
    Unauthorized,
)
from sluice_client.errors import from_response

from tests.client.conftest import CHAT_ONLY_KEY, CutProxy, add_key_with_rpm
from tests.client.test_streams import PROMPT, slow
from tests.support.full_stack import DEV_KEY, FullStack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_a_call_cut_mid_way_is_retried_with_its_key_and_runs_once(
    stack: FullStack, proxy: CutProxy
) -> None:
    sim = slow(20, 20)  # about a second upstream
    proxy.cut_after(0.3)
    async with AsyncSluice(DEV_KEY, base_url=proxy.url) as client:
        answer = await client.chat.completions.create(
            model="sim-fast", messages=PROMPT, max_tokens=20, sim=sim
        )
    assert proxy.cuts > 0
    assert len(answer.text.split()) == 20
    info = answer.response_info
    # The answer is the first run's, replayed under the same key.
    assert info.idempotent_replayed
    assert info.idempotency_key
    assert await stack.sim_count(sim["id"]) == 1


def test_a_long_call_cut_early_waits_for_its_first_run_past_the_retry_budget(
    stack: FullStack, proxy: CutProxy
) -> None:
    """About five seconds upstream, cut after 0.3 s: the retries meet 409 (the first run
    still going) more often than ``max_retries``; the client waits for the answer."""
    sim = slow(50, 10)
    proxy.cut_after(0.3)
    statuses: list[int] = []
    http = httpx.Client(
        timeout=60, event_hooks={"response": [lambda r: statuses.append(r.status_code)]}
    )
    with http, Sluice(DEV_KEY, base_url=proxy.url, max_retries=2, http_client=http) as client:
        answer = client.chat.completions.create(
            model="sim-fast", messages=PROMPT, max_tokens=50, sim=sim
        )
    assert answer.response_info.idempotent_replayed
    assert len(answer.text.split()) == 50
    assert statuses.count(409) > 2 and statuses[-1] == 200
    assert asyncio.run(stack.sim_count(sim["id"])) == 1


def test_reused_key_raises(stack: FullStack) -> None:
    key = str(uuid.uuid4())
    sim = slow(4, 0)
    with Sluice(DEV_KEY, base_url=stack.gateway_url) as client:
        first = client.chat.completions.create(
            model="sim-fast", messages=PROMPT, max_tokens=4, sim=sim, idempotency_key=key
        )
        replay = client.chat.completions.create(
            model="sim-fast", messages=PROMPT, max_tokens=4, sim=sim, idempotency_key=key
        )
        with pytest.raises(IdempotencyKeyReused) as caught:
            client.chat.completions.create(
                model="sim-fast", messages=PROMPT, max_tokens=5, sim=sim, idempotency_key=key
            )
    assert replay.response_info.idempotent_replayed
    assert replay.text == first.text
    assert caught.value.status == 422
    assert caught.value.code == "idempotency_key_reused"


def test_a_bad_key_is_unauthorized_with_its_trace_id(stack: FullStack) -> None:
    with Sluice("sk-not-a-key", base_url=stack.gateway_url) as client:
        with pytest.raises(Unauthorized) as caught:
            client.chat.completions.create(model="sim-fast", messages=PROMPT, max_tokens=4)
        with pytest.raises(Unauthorized) as on_messages:
            client.messages.create(model="sim-fast", max_tokens=4, messages=PROMPT)
    err = caught.value
    assert err.status == 401 and err.code == "unauthorized"
    assert err.trace_id and len(err.trace_id) == 32
    assert err.request_id and err.request_id.startswith("req_")
    assert err.title and err.detail
    # The Anthropic-shaped error body of /v1/messages carries the same.
    assert on_messages.value.code == "unauthorized"
    assert on_messages.value.trace_id and len(on_messages.value.trace_id) == 32


async def test_errors_are_typed_by_code(stack: FullStack) -> None:
    async with AsyncSluice(DEV_KEY, base_url=stack.gateway_url) as client:
        with pytest.raises(ModelNotFound) as unknown:
            await client.chat.completions.create(model="no-such-model", messages=PROMPT)
        with pytest.raises(BadRequest) as bad:
            await client.chat.completions.create(model="sim-fast", messages=PROMPT, max_tokens=-3)
        with pytest.raises(NotFound):
            await client.jobs.get("job_does_not_exist")
    assert unknown.value.status == 404 and unknown.value.trace_id
    assert bad.value.status == 400 and bad.value.param is not None
    async with AsyncSluice(CHAT_ONLY_KEY, base_url=stack.gateway_url) as chat_only:
        with pytest.raises(InsufficientScope) as scope:
            await chat_only.jobs.list()
    assert scope.value.status == 403 and scope.value.code == "insufficient_scope"


async def test_a_429_is_rate_limited_with_retry_after(stack: FullStack) -> None:
    """Retry-After and the code come through from a real 429: a key allowed two
    requests a minute, with the client's retries off."""
    secret = f"sk-sluice-client-rpm-{uuid.uuid4().hex}"
    await add_key_with_rpm(stack, secret, requests_per_minute=2)
    user = f"user-{uuid.uuid4().hex[:8]}"
    async with AsyncSluice(secret, base_url=stack.gateway_url, max_retries=0) as client:
        with pytest.raises(RateLimited) as caught:
            for _ in range(30):
                await client.chat.completions.create(
                    model="sim-fast", messages=PROMPT, max_tokens=2, user=user, sim=slow(2, 0)
                )
    assert caught.value.status == 429
    assert caught.value.retry_after is not None and caught.value.retry_after > 0


def test_an_unknown_code_still_raises_a_sluice_error() -> None:
    response = httpx.Response(
        418,
        json={"code": "brand_new_code", "title": "New", "detail": "d", "trace_id": "t" * 32},
        headers={"retry-after": "2"},
    )
    err = from_response(response)
    assert type(err) is SluiceError
    assert (err.code, err.status, err.retry_after, err.trace_id) == (
        "brand_new_code",
        418,
        2.0,
        "t" * 32,
    )


async def test_estimate_and_usage(stack: FullStack) -> None:
    tag = f"client-{uuid.uuid4().hex[:8]}"
    async with AsyncSluice(DEV_KEY, base_url=stack.gateway_url) as client:
        estimate = await client.estimate(model="sim-fast", messages=PROMPT, max_tokens=50)
        assert estimate.input_tokens > 0
        assert estimate.output_tokens["max"] == 50
        answer = await client.chat.completions.create(
            model="sim-fast", messages=PROMPT, max_tokens=6, tags=[tag], sim=slow(6, 0)
        )
        assert answer.usage is not None

        async def tagged() -> object:
            report = await client.usage(group_by=["tag", "model"], tag=tag)
            return report if report.data else None

        report = await wait_for(tagged, what="the tagged request in the ledger")
    assert report.group_by == ["tag", "model"]  # type: ignore[attr-defined]
    row = report.data[0]  # type: ignore[attr-defined]
    assert row["tag"] == tag and row["model"] == "sim-fast"
    assert row["requests"] == 1
    assert row["output_tokens"] == answer.usage["completion_tokens"]
