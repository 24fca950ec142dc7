"""Async jobs: how fast a job is accepted, and what a batch backlog does to interactive
requests.

``submission_table``: ``POST /v1/jobs`` (and ``POST /v1/chat/completions`` with
``Prefer: respond-async``) at a fixed rate, open loop, timing the ``202``; then waits for
the jobs to run, so that the next section starts on an idle worker.

``priority_table``: interactive requests on an idle worker first (the baseline), then
``batch_jobs`` jobs queued in the batch class, each paced by the simulator for a second
or few, enough to keep every worker slot busy; interactive requests sent at a steady
rate meanwhile report their queue wait (``sluice.latency_ms.queue``: from the gateway's
enqueue to the worker's pickup), and the batch is timed until its last job is done.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from bench.load import percentile
from bench.report import table

T = TypeVar("T")
TERMINAL = frozenset({"completed", "failed", "cancelled"})
# Worker slots of the product the priority section starts (the worker's default).
PRIORITY_CONCURRENCY = 64
# Batch jobs are paced at this rate; their length sets how long each holds a slot.
BATCH_TOKENS_PER_SECOND = 4.0
# How long each batch job runs (uniform in this range). Short enough that slots free up
# far more often than interactive requests arrive (64 slots / 2 s: 32 a second), long
# enough that 1,000 jobs keep the worker saturated for about half a minute.
BATCH_SECONDS = (1.0, 3.0)


def headers_for(api_key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json", **extra}


def chat_request(
    tag: str, i: int, *, output_tokens: int, tokens_per_second: float = 0.0
) -> dict[str, Any]:
    """A simulated completion that is never a cache hit (temperature > 0, own prompt)."""
    return {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": f"{tag} {i}: say something"}],
        "max_tokens": output_tokens,
        "temperature": 0.7,
        "sim": {
            "output_tokens": output_tokens,
            "ttft_ms": 0,
            "tokens_per_second": tokens_per_second,
        },
    }


def product_env() -> dict[str, str]:
    """Environment of the product the priority section runs on."""
    return {"SLUICE_WORKER_CONCURRENCY": str(PRIORITY_CONCURRENCY)}


@dataclass
class Timed:
    status: int
    ms: float
    body: dict[str, Any] = field(default_factory=dict)


async def post_json(
    session: aiohttp.ClientSession, url: str, payload: dict[str, Any], headers: dict[str, str]
) -> Timed:
    data = json.dumps(payload)
    started = time.perf_counter()
    try:
        async with session.post(url, data=data, headers=headers) as resp:
            raw = await resp.read()
            elapsed = (time.perf_counter() - started) * 1000
            status = resp.status
    except (TimeoutError, aiohttp.ClientError):
        return Timed(0, (time.perf_counter() - started) * 1000)
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    return Timed(status, elapsed, body if isinstance(body, dict) else {})


async def paced(rate: float, count: int, start: Callable[[int], Awaitable[T]]) -> list[T]:
    """Open loop: ``start(i)`` at ``i / rate`` seconds whatever the answers do."""
    tasks: list[asyncio.Task[T]] = []
    began = time.perf_counter()

    async def run(i: int) -> T:
        return await start(i)

    for i in range(count):
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(run(i)))
    return list(await asyncio.gather(*tasks))


async def job_status(
    session: aiohttp.ClientSession, gateway_url: str, api_key: str, job_id: str
) -> str:
    """``status`` of ``GET /v1/jobs/{id}``, or ``unknown``."""
    try:
        async with session.get(
            f"{gateway_url}/v1/jobs/{job_id}", headers=headers_for(api_key)
        ) as resp:
            if resp.status != 200:
                return "unknown"
            return str((await resp.json()).get("status", "unknown"))
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return "unknown"


async def wait_for_jobs(
    session: aiohttp.ClientSession,
    gateway_url: str,
    api_key: str,
    job_ids: list[str],
    *,
    timeout: float,
    window: int = 32,
    interval: float = 0.5,
) -> tuple[dict[str, str], float | None]:
    """Polls ``GET /v1/jobs/{id}`` until every job has ended; returns the final statuses
    and when (monotonic) the last one was seen ended, or None on timeout.

    Jobs start roughly in submission order, so each sweep asks only about the first
    ``window`` unfinished ones: the polling stays light however long the backlog."""
    statuses: dict[str, str] = {}
    pending = list(job_ids)
    deadline = time.monotonic() + timeout
    gate = asyncio.Semaphore(16)

    async def status_of(job_id: str) -> str:
        async with gate:
            return await job_status(session, gateway_url, api_key, job_id)

    while pending:
        now = time.monotonic()
        if now > deadline:
            return statuses, None
        batch = pending[:window]
        found = await asyncio.gather(*(status_of(j) for j in batch))
        done = {j for j, s in zip(batch, found, strict=True) if s in TERMINAL}
        for job_id, status in zip(batch, found, strict=True):
            if status in TERMINAL:
                statuses[job_id] = status
        pending = [j for j in pending if j not in done]
        if pending and len(done) < len(batch):
            await asyncio.sleep(interval)
    return statuses, time.monotonic()


# --- submission latency --------------------------------------------------------------------


async def submission_table(
    gateway_url: str, api_key: str, *, rate: float = 50, seconds: float = 4
) -> str:
    """``202`` latency of job submission at ``rate`` per second for ``seconds``."""
    count = max(1, int(rate * seconds))
    routes: list[tuple[str, str, dict[str, str], Callable[[int], dict[str, Any]]]] = [
        (
            "POST /v1/jobs",
            "/v1/jobs",
            headers_for(api_key),
            lambda i: {"request": chat_request("bench job", i, output_tokens=4)},
        ),
        (
            "POST /v1/chat/completions, Prefer: respond-async",
            "/v1/chat/completions",
            headers_for(api_key, Prefer="respond-async"),
            lambda i: chat_request("bench async", i, output_tokens=4),
        ),
    ]
    rows: list[list[object]] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Warm up: connections, key cache, the jobs bucket.
        for i in range(10):
            await post_json(
                session,
                f"{gateway_url}/v1/jobs",
                {"request": chat_request("bench warm-up", i, output_tokens=1)},
                headers_for(api_key),
            )
        for label, path, headers, body in routes:
            url = f"{gateway_url}{path}"

            async def submit(
                i: int,
                url: str = url,
                headers: dict[str, str] = headers,
                body: Callable[[int], dict[str, Any]] = body,
            ) -> Timed:
                return await post_json(session, url, body(i), headers)

            results = await paced(rate, count, submit)
            sent_done = time.monotonic()
            accepted = [r for r in results if r.status == 202]
            ids = [str(r.body["id"]) for r in accepted if "id" in r.body]
            statuses, finished = await wait_for_jobs(
                session, gateway_url, api_key, ids, timeout=max(60.0, 4 * seconds)
            )
            completed = sum(1 for s in statuses.values() if s == "completed")
            ran = (
                f"{completed}/{len(ids)} in {finished - sent_done:.1f} s"
                if finished is not None
                else f"{completed}/{len(ids)} (timed out)"
            )
            latencies = [r.ms for r in accepted]
            rows.append(
                [
                    label,
                    rate,
                    f"{len(accepted)}/{len(results)}",
                    percentile(latencies, 50),
                    percentile(latencies, 99),
                    max(latencies) if latencies else float("nan"),
                    ran,
                ]
            )
    return table(
        [
            "submission",
            "req/s",
            "202",
            "p50 ms",
            "p99 ms",
            "max ms",
            "completed (after the last submission)",
        ],
        rows,
    )


# --- priority under a batch backlog --------------------------------------------------------


@dataclass
class Interactive:
    ok: bool
    queue_ms: float
    total_ms: float


async def _interactive(
    session: aiohttp.ClientSession, gateway_url: str, api_key: str, rate: float, seconds: float
) -> list[Interactive]:
    url = f"{gateway_url}/v1/chat/completions"
    headers = headers_for(api_key, **{"x-sluice-priority": "interactive"})
    tag = f"bench interactive {time.monotonic_ns()}"

    async def one(i: int) -> Interactive:
        answer = await post_json(session, url, chat_request(tag, i, output_tokens=8), headers)
        sluice = answer.body.get("sluice") if answer.status == 200 else None
        if not isinstance(sluice, dict):
            return Interactive(False, float("nan"), answer.ms)
        queue = float(sluice.get("latency_ms", {}).get("queue", float("nan")))
        return Interactive(True, queue, answer.ms)

    return await paced(rate, max(1, int(rate * seconds)), one)


async def _submit_batch(
    session: aiohttp.ClientSession,
    gateway_url: str,
    api_key: str,
    count: int,
    durations: tuple[float, float],
    in_flight: int = 32,
) -> tuple[list[str], float]:
    """Queues ``count`` batch jobs as fast as the gateway accepts them (``in_flight``
    at a time); each runs for a random time within ``durations`` seconds."""
    rng = random.Random(7)
    lengths = [
        max(1, round(rng.uniform(*durations) * BATCH_TOKENS_PER_SECOND)) for _ in range(count)
    ]
    url = f"{gateway_url}/v1/jobs"
    headers = headers_for(api_key)
    ids: list[str | None] = [None] * count
    counter = iter(range(count))

    async def submitter() -> None:
        for i in counter:
            request = chat_request(
                "bench batch",
                i,
                output_tokens=lengths[i],
                tokens_per_second=BATCH_TOKENS_PER_SECOND,
            )
            answer = await post_json(session, url, {"request": request}, headers)
            if answer.status == 202 and "id" in answer.body:
                ids[i] = str(answer.body["id"])

    await asyncio.gather(*(submitter() for _ in range(in_flight)))
    # The simulator sends the first token at once, then one every 1 / rate seconds.
    busy = sum((n - 1) / BATCH_TOKENS_PER_SECOND for n, i in zip(lengths, ids, strict=True) if i)
    return [i for i in ids if i is not None], busy


async def priority_table(
    gateway_url: str,
    api_key: str,
    *,
    batch_jobs: int = 1000,
    batch_seconds: tuple[float, float] = BATCH_SECONDS,
    interactive_rate: float = 10,
    interactive_seconds: float = 15,
    baseline_seconds: float = 3,
    timeout: float = 240,
) -> str:
    """Interactive queue wait on an idle worker and behind ``batch_jobs`` batch jobs,
    and the time the batch takes to finish."""
    connector = aiohttp.TCPConnector(limit=0)
    client_timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        await _interactive(session, gateway_url, api_key, 20, 1)  # warm-up
        idle = await _interactive(session, gateway_url, api_key, interactive_rate, baseline_seconds)

        began = time.monotonic()
        ids, busy_s = await _submit_batch(session, gateway_url, api_key, batch_jobs, batch_seconds)
        submitted = time.monotonic()
        busy = await _interactive(
            session, gateway_url, api_key, interactive_rate, interactive_seconds
        )
        # Still queued at the end: the backlog lasted through the whole interactive run.
        last = await job_status(session, gateway_url, api_key, ids[-1]) if ids else "-"
        statuses, finished = await wait_for_jobs(
            session, gateway_url, api_key, ids, timeout=max(0.0, began + timeout - time.monotonic())
        )

    rows: list[list[object]] = []
    for label, samples in (("idle worker", idle), (f"{batch_jobs:,} batch jobs queued", busy)):
        ok = [s for s in samples if s.ok]
        queue = [s.queue_ms for s in ok]
        total = [s.total_ms for s in ok]
        rows.append(
            [
                label,
                interactive_rate,
                f"{len(ok)}/{len(samples)}",
                percentile(queue, 50),
                percentile(queue, 99),
                max(queue) if queue else float("nan"),
                percentile(total, 50),
                percentile(total, 99),
            ]
        )
    interactive = table(
        [
            "interactive requests",
            "req/s",
            "ok",
            "queue wait p50 ms",
            "queue wait p99 ms",
            "max ms",
            "total p50 ms",
            "total p99 ms",
        ],
        rows,
    )
    completed = sum(1 for s in statuses.values() if s == "completed")
    batch = table(
        [
            "batch jobs",
            "accepted",
            "queued in s",
            "last job at the end of the interactive run",
            "completed",
            "all done after s",
            "ideal s (sum of lengths / slots)",
        ],
        [
            [
                batch_jobs,
                len(ids),
                submitted - began,
                last,
                f"{completed}/{len(ids)}",
                finished - began if finished is not None else f"> {timeout:.0f} (timed out)",
                busy_s / PRIORITY_CONCURRENCY,
            ]
        ],
    )
    return f"{interactive}\n\n{batch}"
