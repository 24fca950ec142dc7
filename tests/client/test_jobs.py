"""Jobs through the client on the real stack: submit with a webhook, follow the events,
wait, list, cancel, and check the webhook's signature with the team's secret."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web
from sluice.devtools.embedded import free_port
from sluice_client import (
    AsyncSluice,
    Cancelled,
    Sluice,
    WebhookVerificationError,
    raise_for_job,
    sign_webhook,
    verify_webhook,
)

from tests.client.conftest import CutProxy
from tests.client.test_streams import PROMPT, slow
from tests.support.full_stack import DEV_KEY, FullStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Receiver:
    """A webhook endpoint on 127.0.0.1 that keeps each delivery's raw body and headers."""

    def __init__(self) -> None:
        self.port = free_port()
        self.deliveries: list[tuple[bytes, dict[str, str]]] = []
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.deliveries.append(
            (await request.read(), {k.lower(): v for k, v in request.headers.items()})
        )
        self.arrived.set()
        return web.Response(status=204)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


def chat(tokens: int, rate: float = 0) -> dict[str, Any]:
    return {
        "model": "sim-fast",
        "messages": PROMPT,
        "max_tokens": tokens,
        "sim": slow(tokens, rate),
    }


async def test_a_job_round_trip_with_a_verified_webhook(stack: FullStack) -> None:
    async with AsyncSluice(DEV_KEY, base_url=stack.gateway_url) as client, Receiver() as hook:
        secret = await client.webhooks.secret()
        job = await client.jobs.submit(
            chat(12, 40), webhook_url=hook.url, metadata={"purpose": "client-test"}
        )
        assert job.status in ("queued", "in_progress")
        assert job.response_info.status_code == 202

        events = [event async for event in client.jobs.events(job.id)]
        tokens = [e.content for e in events if e.event == "token"]
        statuses = [e.job.status for e in events if e.event == "status" and e.job]
        assert statuses[-1] == "completed"
        done = await client.jobs.wait(job.id, timeout=30)
        assert done.status == "completed"
        raise_for_job(done)
        assert "".join(t or "" for t in tokens) == done.text
        assert len(done.text.split()) == 12

        listed = await client.jobs.list(limit=100)
        assert job.id in [j.id for j in listed.data]

        await asyncio.wait_for(hook.arrived.wait(), 20)
    body, headers = hook.deliveries[0]
    event = verify_webhook(secret, body, headers)
    assert event.type == "job.completed"
    assert event.job is not None and event.job.id == job.id
    assert event.webhook_id == headers["webhook-id"]
    # A changed body, another secret or an old timestamp are refused.
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, body.replace(b"completed", b"failed"), headers)
    with pytest.raises(WebhookVerificationError):
        verify_webhook("whsec_" + "A" * 32, body, headers)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, body, headers, now=time.time() + 3600)
    # The client signs as the gateway does.
    stamp = int(headers["webhook-timestamp"])
    assert (
        sign_webhook(secret, event.webhook_id, stamp, body) in headers["webhook-signature"].split()
    )


def test_sync_jobs_wait_inline_and_cancel(stack: FullStack) -> None:
    with Sluice(DEV_KEY, base_url=stack.gateway_url) as client:
        # Prefer: wait: a short job comes back completed from the submit itself.
        quick = client.jobs.submit(chat(4), wait=10)
        assert quick.status == "completed" and len(quick.text.split()) == 4

        slow_job = client.jobs.submit(chat(400, 10))
        cancelled = client.jobs.cancel(slow_job.id)
        assert cancelled.cancel_requested
        ended = client.jobs.wait(slow_job.id, timeout=30)
    assert ended.status == "cancelled"
    with pytest.raises(Cancelled) as caught:
        raise_for_job(ended)
    assert caught.value.code == "cancelled"


async def test_job_events_cut_mid_way_yield_each_token_once(
    stack: FullStack, proxy: CutProxy
) -> None:
    proxy.cut_after_event(b"event: token")
    async with AsyncSluice(DEV_KEY, base_url=proxy.url) as client:
        job = await client.jobs.submit(chat(30, 40))
        events = [event async for event in client.jobs.events(job.id)]
        done = await client.jobs.wait(job.id, timeout=30)
    assert proxy.cuts > 0 and proxy.connections >= 3  # submit, events, events again
    sequences = [e.sequence or 0 for e in events if e.event == "token"]
    assert sequences == sorted(set(sequences))
    assert "".join(e.content or "" for e in events if e.event == "token") == done.text
    assert len(done.text.split()) == 30
    assert events[-1].job is not None and events[-1].job.status == "completed"
