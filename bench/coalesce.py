"""Coalescing: a burst of identical requests (temperature 0, so the exact cache and
coalescing take them) sent at once, against the same burst with ``Cache-Control:
no-cache`` (each request its own upstream call). Reports the calls the simulator saw
and the waiters' latency: following the leader's stream should cost the followers
little over the leader's own time, while the provider is called once."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp

from bench.load import median, percentile
from bench.report import table


async def _burst(
    session: aiohttp.ClientSession,
    gateway: str,
    simulator: str,
    api_key: str,
    *,
    size: int,
    stream: bool,
    fresh: bool,
) -> list[Any]:
    sim_id = uuid.uuid4().hex
    body: dict[str, Any] = {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": f"coalesce bench {sim_id}"}],
        "temperature": 0,
        "max_tokens": 32,
        "stream": stream,
        "sim": {"id": sim_id, "ttft_ms": 300, "output_tokens": 20, "tokens_per_second": 100},
    }
    headers = {"Authorization": f"Bearer {api_key}"}
    if fresh:
        headers["Cache-Control"] = "no-cache, no-store"

    async def one() -> float:
        started = time.perf_counter()
        async with session.post(
            f"{gateway}/v1/chat/completions", json=body, headers=headers
        ) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"answered {resp.status}")
        return (time.perf_counter() - started) * 1000

    timings = await asyncio.gather(*(one() for _ in range(size)))
    async with session.get(f"{simulator}/_sim/stats") as resp:
        stats = await resp.json()
    calls = int(stats["by_id"].get(sim_id, 0))
    mode = "no-cache (each its own call)" if fresh else "coalesced"
    return [
        mode,
        "stream" if stream else "whole",
        size,
        calls,
        median(timings),
        percentile(timings, 99),
    ]


async def coalesce_table(gateway: str, simulator: str, api_key: str, *, size: int) -> str:
    rows = []
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for stream in (False, True):
            for fresh in (False, True):
                rows.append(
                    await _burst(
                        session, gateway, simulator, api_key, size=size, stream=stream, fresh=fresh
                    )
                )
    return table(["burst", "answer", "requests", "provider calls", "p50 ms", "p99 ms"], rows)
