"""Open-loop and closed-loop HTTP load, with per-request timings.

Open loop sends at a fixed rate whatever the answers do (the honest way to measure
latency at a given load), alternating between the provider alone and the gateway in
front of it; closed loop keeps N requests in flight to find throughput.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Sample:
    ok: bool
    status: int
    total_s: float
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def one_request(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> Sample:
    start = time.perf_counter()
    stream = bool(body.get("stream"))
    try:
        async with session.post(url, data=json.dumps(body), headers=headers) as resp:
            if not stream:
                await resp.read()
                return Sample(resp.status == 200, resp.status, time.perf_counter() - start)
            ttft: float | None = None
            gaps: list[float] = []
            last: float | None = None
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                if b'"content"' not in line:
                    continue
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - start
                elif last is not None:
                    gaps.append(now - last)
                last = now
            return Sample(resp.status == 200, resp.status, time.perf_counter() - start, ttft, gaps)
    except (TimeoutError, aiohttp.ClientError):
        return Sample(False, 0, time.perf_counter() - start)


@dataclass
class Target:
    url: str
    headers: dict[str, str]


async def _slice(
    session: aiohttp.ClientSession,
    target: Target,
    body_for: Any,
    rate: float,
    count: int,
    first: int,
) -> list[Sample]:
    """``count`` requests at ``rate`` per second, bodies ``body_for(first)`` onwards."""
    tasks: list[asyncio.Task[Sample]] = []
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = body_for(first + i)
        tasks.append(asyncio.create_task(one_request(session, target.url, body, target.headers)))
    return list(await asyncio.gather(*tasks))


async def paired_open_loop(
    direct: Target,
    via: Target,
    body_for: Any,
    rate: float,
    duration_s: float,
    *,
    slice_s: float = 2.0,
    around_via: Any = None,
) -> tuple[list[Sample], list[Sample]]:
    """Open loop at ``rate`` against both targets for ``duration_s`` each, in alternating
    slices of ``slice_s`` (ABBA order), each on its own kept-alive session.

    On a shared machine whose speed drifts by tens of percent within a minute, two
    back-to-back runs compare two different machines; interleaved slices see the same
    drift, so their difference is the gateway's. ``around_via`` (an async context
    manager factory) wraps each gateway slice, e.g. to count CPU time."""
    per_slice = max(1, round(rate * slice_s))
    slices = max(1, round(duration_s / slice_s))
    timeout = aiohttp.ClientTimeout(total=60)
    out: tuple[list[Sample], list[Sample]] = ([], [])
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as d,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as v,
    ):
        for n in range(slices):
            order = (0, 1) if n % 4 in (0, 3) else (1, 0)
            for which in order:
                first = n * per_slice
                if which == 0:
                    out[0].extend(await _slice(d, direct, body_for, rate, per_slice, first))
                elif around_via is None:
                    out[1].extend(await _slice(v, via, body_for, rate, per_slice, first))
                else:
                    async with around_via():
                        out[1].extend(await _slice(v, via, body_for, rate, per_slice, first))
    return out


async def closed_loop(
    url: str, body_for: Any, headers: dict[str, str], concurrency: int, duration_s: float
) -> tuple[list[Sample], float]:
    """Keep ``concurrency`` requests in flight for ``duration_s``; returns samples and
    the achieved requests per second."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    samples: list[Sample] = []
    counter = iter(range(10**9))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        deadline = start + duration_s

        async def worker() -> None:
            while time.perf_counter() < deadline:
                samples.append(await one_request(session, url, body_for(next(counter)), headers))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return samples, len([s for s in samples if s.ok]) / elapsed
