"""Async jobs through every real process: submission, polling, Prefer, visibility,
cancel, durability across gateway and worker restarts, failure, webhooks, SSRF and
priority classes."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any

import httpx
import pytest
from aiohttp import web
from sluice.bus import Bus
from sluice.cost.v1 import cost_pb2
from sluice.devtools.embedded import free_port
from sluice.topology import ServiceName, Streams, Subjects
from standardwebhooks import Webhook

from tests.jobs.conftest import OTHER_KEY
from tests.support.full_stack import FullStack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TERMINAL = {"completed", "failed", "cancelled"}


def chat(content: str = "Say hello.", *, max_tokens: int = 8, **sim: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }
    if sim:
        body["sim"] = sim
    return body


async def submit(
    client: httpx.AsyncClient, request: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    headers = extra.pop("headers", {})
    resp = await client.post("/v1/jobs", json={"request": request, **extra}, headers=headers)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    return job


async def finished(client: httpx.AsyncClient, job_id: str, timeout: float = 30) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        return job if job["status"] in TERMINAL else None

    return await wait_for(check, timeout=timeout, interval=0.1, what=f"job {job_id} to end")


async def usage_events(stack: FullStack, request_id: str) -> list[cost_pb2.UsageEvent]:
    bus = await Bus.connect(stack.nats.url, "tests-usage")
    try:
        sub = await bus.js.subscribe(
            Subjects.USAGE_ALL, stream=Streams.USAGE.name, ordered_consumer=True
        )
        found: list[cost_pb2.UsageEvent] = []
        info = await bus.js.stream_info(Streams.USAGE.name)
        for _ in range(int(info.state.messages)):
            msg = await sub.next_msg(timeout=5)
            event = cost_pb2.UsageEvent()
            event.ParseFromString(msg.data)
            if event.request_id == request_id:
                found.append(event)
        await sub.unsubscribe()
        return found
    finally:
        await bus.close()


async def test_job_runs_from_202_to_completed_with_result(jobs_stack: FullStack) -> None:
    async with jobs_stack.client() as client:
        job = await submit(client, chat(max_tokens=8), metadata={"batch": "nightly"})
        assert job["object"] == "job"
        assert job["status"] == "queued"
        assert job["priority"] == "batch"
        assert job["id"].startswith("job_")
        done = await finished(client, job["id"])
    assert done["status"] == "completed", done
    result = done["result"]
    assert result["object"] == "chat.completion"
    assert result["choices"][0]["message"]["content"]
    assert done["usage"]["completion_tokens"] == result["usage"]["completion_tokens"] > 0
    assert done["cost_usd"] > 0
    assert done["attempts"] == 1
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert done["progress"]["fraction"] == 1.0
    assert done["metadata"] == {"batch": "nightly"}
    assert done["error"] is None


async def test_a_jobs_answer_fills_the_cache_for_the_same_chat_request(
    jobs_stack: FullStack,
) -> None:
    request = {**chat(f"Cache me {uuid.uuid4().hex}", max_tokens=8), "temperature": 0}
    async with jobs_stack.client() as client:
        job = await submit(client, request)
        done = await finished(client, job["id"])
        assert done["status"] == "completed", done

        async def hit() -> dict[str, Any] | None:
            # no-store: a miss here must not fill the cache itself, so only the job can.
            resp = await client.post(
                "/v1/chat/completions", json=request, headers={"cache-control": "no-store"}
            )
            assert resp.status_code == 200, resp.text
            return resp.json() if resp.headers["x-sluice-cache"] == "hit" else None

        # The store lands just after the job's end: a chat request before it misses.
        cached = await wait_for(hit, timeout=10, interval=0.1, what="the job's answer cached")
    answer = done["result"]["choices"][0]["message"]["content"]
    assert cached["choices"][0]["message"]["content"] == answer


async def test_prefer_wait_answers_inline_or_202(jobs_stack: FullStack) -> None:
    async with jobs_stack.client() as client:
        fast = await client.post(
            "/v1/chat/completions", json=chat(max_tokens=4), headers={"Prefer": "wait=10"}
        )
        assert fast.status_code == 200, fast.text
        assert fast.json()["object"] == "chat.completion"
        assert fast.headers["preference-applied"] == "wait=10"
        job_id = fast.headers["x-sluice-job-id"]
        assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "completed"

        slow = await client.post(
            "/v1/chat/completions",
            json=chat(max_tokens=30, tokens_per_second=20, output_tokens=30),
            headers={"Prefer": "respond-async, wait=0.3"},
        )
        assert slow.status_code == 202, slow.text
        assert slow.headers["preference-applied"] == "respond-async, wait=0.3"
        assert slow.json()["status"] in {"queued", "in_progress"}
        assert slow.headers["location"] == f"/v1/jobs/{slow.json()['id']}"
        done = await finished(client, slow.json()["id"])
        assert done["status"] == "completed"
        assert done["priority"] == "interactive"

        plain_async = await client.post(
            "/v1/chat/completions", json=chat(), headers={"Prefer": "respond-async"}
        )
        assert plain_async.status_code == 202
        assert plain_async.json()["priority"] == "batch"


async def test_jobs_are_listed_newest_first_and_only_for_their_team(jobs_stack: FullStack) -> None:
    async with jobs_stack.client() as client, jobs_stack.client(OTHER_KEY) as other:
        ids = [(await submit(client, chat()))["id"] for _ in range(3)]
        page = (await client.get("/v1/jobs", params={"limit": 2})).json()
        assert [j["id"] for j in page["data"]] == ids[::-1][:2]
        assert page["has_more"] is True
        rest = (await client.get("/v1/jobs", params={"after": page["last_id"]})).json()
        assert rest["data"][0]["id"] == ids[0]

        assert (await other.get(f"/v1/jobs/{ids[0]}")).status_code == 404
        assert (await other.post(f"/v1/jobs/{ids[0]}/cancel")).status_code == 404
        assert (await other.get(f"/v1/jobs/{ids[0]}/events")).status_code == 404
        assert (await other.get("/v1/jobs")).json()["data"] == []
        own = await submit(other, chat())
        assert [j["id"] for j in (await other.get("/v1/jobs")).json()["data"]] == [own["id"]]
        assert (await client.get(f"/v1/jobs/{own['id']}")).status_code == 404
        assert (await client.get("/v1/jobs/job_doesnotexist")).status_code == 404


async def test_events_stream_status_and_tokens(jobs_stack: FullStack) -> None:
    async with jobs_stack.client() as client:
        job = await submit(client, chat(max_tokens=10, tokens_per_second=40, output_tokens=10))
        events: list[tuple[str, dict[str, Any]]] = []
        async with client.stream("GET", f"/v1/jobs/{job['id']}/events") as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            name = ""
            async for line in resp.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
    kinds = [k for k, _ in events]
    assert kinds[0] == "status"
    # One event per delta: ten paced tokens, fewer if some reached the worker together.
    assert 1 <= kinds.count("token") <= 10
    assert "".join(d["content"] for k, d in events if k == "token").strip()
    last = events[-1]
    assert last[0] == "status" and last[1]["status"] == "completed"
    assert last[1]["result"]["choices"][0]["message"]["content"] == "".join(
        d["content"] for k, d in events if k == "token"
    )


async def test_cancel_a_running_job_stops_it_and_bills_what_was_made(
    jobs_stack: FullStack,
) -> None:
    async with jobs_stack.client() as client:
        job = await submit(client, chat(max_tokens=200, tokens_per_second=20, output_tokens=200))

        async def running() -> dict[str, Any] | None:
            current = (await client.get(f"/v1/jobs/{job['id']}")).json()
            return current if current["progress"]["tokens"] >= 5 else None

        current = await wait_for(running, timeout=20, what="tokens to flow")
        assert current["status"] == "in_progress"
        assert 0 < current["progress"]["fraction"] < 1
        resp = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert resp.status_code == 200
        assert resp.json()["cancel_requested"] is True
        done = await finished(client, job["id"], timeout=15)
    assert done["status"] == "cancelled", done
    assert done["error"]["code"] == "cancelled"
    assert 0 < done["usage"]["completion_tokens"] < 200
    events = await wait_for(lambda: usage_events(jobs_stack, job["id"]), what="usage event")
    assert len(events) == 1
    assert 0 < events[0].usage.output_tokens < 200


async def test_cancel_a_queued_job_means_it_never_runs(jobs_stack: FullStack) -> None:
    tag = uuid.uuid4().hex
    async with jobs_stack.client() as client:
        # Two slow interactive jobs take the worker's two slots.
        blockers = [
            await submit(
                client,
                chat(max_tokens=100, tokens_per_second=25, output_tokens=100),
                headers={"x-sluice-priority": "interactive"},
            )
            for _ in range(2)
        ]

        async def both_running() -> bool:
            states = [(await client.get(f"/v1/jobs/{b['id']}")).json()["status"] for b in blockers]
            return all(s == "in_progress" for s in states)

        await wait_for(both_running, what="the worker to be busy")
        queued = await submit(client, chat(id=tag))
        cancelled = await client.post(f"/v1/jobs/{queued['id']}/cancel")
        assert cancelled.json()["status"] == "cancelled", cancelled.text
        for blocker in blockers:
            await client.post(f"/v1/jobs/{blocker['id']}/cancel")
        for blocker in blockers:
            await finished(client, blocker["id"])
        # The worker is free again; the cancelled job must still not run.
        await asyncio.sleep(1.0)
        final = (await client.get(f"/v1/jobs/{queued['id']}")).json()
    assert final["status"] == "cancelled"
    assert final["started_at"] is None
    assert await jobs_stack.sim_count(tag) == 0


async def test_a_job_that_fails_every_attempt_ends_failed(jobs_stack: FullStack) -> None:
    async with jobs_stack.client() as client:
        job = await submit(client, chat(fault="500"))
        done = await finished(client, job["id"], timeout=30)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "upstream_error"
    assert done["error"]["status"] == 502
    assert done["result"] is None


async def test_restarting_the_gateway_and_killing_the_worker_lose_nothing(
    jobs_stack: FullStack,
) -> None:
    tag = uuid.uuid4().hex
    async with jobs_stack.client() as client:
        job = await submit(
            client, chat(max_tokens=40, tokens_per_second=20, output_tokens=40, id=tag)
        )

        async def started() -> bool:
            return (await client.get(f"/v1/jobs/{job['id']}")).json()["status"] == "in_progress"

        await wait_for(started, what="the job to start")
    # The worker dies mid-generation; the gateway that took the job restarts meanwhile.
    worker = jobs_stack.stack.processes[ServiceName.INFERENCE_WORKER]
    worker.process.kill()
    worker.process.wait()
    await jobs_stack.restart(ServiceName.GATEWAY)
    jobs_stack.stack.start(ServiceName.INFERENCE_WORKER)
    await jobs_stack.stack.wait_ready([ServiceName.INFERENCE_WORKER])
    async with jobs_stack.client() as client:
        done = await finished(client, job["id"], timeout=60)
    assert done["status"] == "completed", done
    assert done["attempts"] >= 2
    assert done["result"]["choices"][0]["message"]["content"]
    events = await wait_for(lambda: usage_events(jobs_stack, job["id"]), what="usage event")
    assert len(events) == 1


class Receiver:
    """A webhook endpoint on 127.0.0.1 that verifies every signature."""

    def __init__(self, secret: str, fail_first: int) -> None:
        self.webhook = Webhook(secret)
        self.fail_first = fail_first
        self.calls: list[dict[str, Any]] = []
        self.port = free_port()
        self.delivered = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        verified = self.webhook.verify(body, headers)
        self.calls.append({"headers": headers, "payload": verified})
        if len(self.calls) <= self.fail_first:
            return web.Response(status=500)
        self.delivered.set()
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


async def test_webhook_is_signed_and_retried_after_a_500(jobs_stack: FullStack) -> None:
    async with jobs_stack.client() as client:
        secret = (await client.get("/v1/webhooks/secret")).json()["secret"]
        assert secret.startswith("whsec_")
        async with Receiver(secret, fail_first=1) as receiver:
            job = await submit(client, chat(), webhook_url=receiver.url)
            await asyncio.wait_for(receiver.delivered.wait(), timeout=30)

            async def logged() -> dict[str, Any] | None:
                current = (await client.get(f"/v1/jobs/{job['id']}")).json()
                return current if current["webhook"]["status"] == "delivered" else None

            done = await wait_for(logged, what="the delivery log")
    assert len(receiver.calls) == 2
    first, second = receiver.calls
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"]
    assert second["payload"]["type"] == "job.completed"
    assert second["payload"]["data"]["id"] == job["id"]
    assert second["payload"]["data"]["status"] == "completed"
    deliveries = done["webhook"]["deliveries"]
    assert [d["status_code"] for d in deliveries] == [500, 204]
    assert [d["attempt"] for d in deliveries] == [1, 2]


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/hook",
        "http://127.0.0.2:9/hook",
        "http://[::1]/hook",
        "ftp://example.com/hook",
    ],
)
async def test_webhook_urls_to_internal_addresses_are_refused(
    jobs_stack: FullStack, url: str
) -> None:
    async with jobs_stack.client() as client:
        resp = await client.post("/v1/jobs", json={"request": chat(), "webhook_url": url})
    assert resp.status_code == 400, resp.text
    assert resp.json()["code"] == "invalid_request"
    assert resp.json()["error"]["param"] == "webhook_url"


async def test_priority_header_is_checked(jobs_stack: FullStack) -> None:
    async with jobs_stack.client() as client, jobs_stack.client(OTHER_KEY) as other:
        bad = await client.post(
            "/v1/chat/completions", json=chat(), headers={"x-sluice-priority": "urgent"}
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "x-sluice-priority"
        # The other key lacks the priority:system scope; the dev key has "*".
        denied = await other.post(
            "/v1/chat/completions", json=chat(), headers={"x-sluice-priority": "system"}
        )
        assert denied.status_code == 403
        ok = await client.post(
            "/v1/chat/completions", json=chat(), headers={"x-sluice-priority": "system"}
        )
        assert ok.status_code == 200


async def test_batch_jobs_progress_under_interactive_load(jobs_stack: FullStack) -> None:
    """Two worker slots, a steady stream of interactive requests, and batch jobs queued
    behind them: the batch jobs still finish, and the queue depth shows per class."""
    stop = time.monotonic() + 8.0
    stop_wall = time.time() + 8.0
    interactive_done = 0

    async def interactive_load(client: httpx.AsyncClient) -> None:
        nonlocal interactive_done
        while time.monotonic() < stop:
            resp = await client.post(
                "/v1/chat/completions",
                json=chat(max_tokens=5, tokens_per_second=25, output_tokens=5),
            )
            assert resp.status_code == 200
            interactive_done += 1

    async with jobs_stack.client() as client:
        loaders = [asyncio.create_task(interactive_load(client)) for _ in range(4)]
        await asyncio.sleep(0.5)
        jobs = [
            await submit(client, chat(max_tokens=5, tokens_per_second=25, output_tokens=5))
            for _ in range(8)
        ]
        worker = jobs_stack.stack.processes[ServiceName.INFERENCE_WORKER]

        async def batch_depth_seen() -> bool:
            async with httpx.AsyncClient(timeout=5) as http:
                text = (await http.get(f"http://127.0.0.1:{worker.metrics_port}/metrics")).text
            depth = re.search(
                r"^sluice_jetstream_pending\w*"
                r'\{(?=[^}]*consumer="worker-batch")(?=[^}]*priority="batch")[^}]*\}\s+(\S+)',
                text,
                re.MULTILINE,
            )
            return depth is not None and float(depth.group(1)) > 0

        await wait_for(batch_depth_seen, what="the per-class queue depth gauge")
        results = [await finished(client, j["id"], timeout=40) for j in jobs]
        await asyncio.gather(*loaders)
    assert all(r["status"] == "completed" for r in results)
    assert interactive_done > 8
    # Batch work finished while interactive traffic still saturated the worker (the
    # timestamps are whole seconds, rounded down): batch is slowed, never starved.
    assert sum(r["finished_at"] + 1 <= stop_wall for r in results) >= 2
