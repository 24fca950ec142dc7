"""Open-loop and closed-loop HTTP load against one endpoint, with per-request timings.

Open loop sends at a fixed rate whatever the answers do (the honest way to measure
latency at a given load); closed loop keeps N requests in flight to find throughput.
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


async def open_loop(
    url: str,
    body_for: Any,
    headers: dict[str, str],
    rate: float,
    duration_s: float,
) -> list[Sample]:
    """Send ``rate`` requests per second for ``duration_s``; ``body_for(i)`` builds bodies."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    tasks: list[asyncio.Task[Sample]] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        count = int(rate * duration_s)
        for i in range(count):
            target = start + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(session, url, body_for(i), headers)))
        return list(await asyncio.gather(*tasks))


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
