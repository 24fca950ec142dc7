"""The simulator's chaos by upstream model: the share of 5xx and of stalls asked for,
only on that model, counted, and ended by an empty set or a reset."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
from sluice.devtools.embedded import free_port
from sluice.devtools.simulator import start_simulator


@pytest.fixture
async def sim() -> AsyncIterator[str]:
    runner = await start_simulator(free_port())
    yield next(iter(runner.sites)).name.rstrip("/")
    await runner.cleanup()


async def ask(http: aiohttp.ClientSession, sim: str, model: str) -> tuple[int, float]:
    started = time.perf_counter()
    body = {"model": model, "messages": [{"role": "user", "content": "x"}]}
    async with http.post(f"{sim}/v1/chat/completions", json=body) as resp:
        await resp.read()
        return resp.status, time.perf_counter() - started


async def test_chaos_hits_its_model_in_the_shares_asked(sim: str) -> None:
    async with aiohttp.ClientSession() as http:
        chaos = {"flaky": {"error_rate": 0.3, "stall_rate": 0.2, "stall_ms": 1000, "seed": 3}}
        async with http.post(f"{sim}/_sim/chaos", json={"models": chaos}) as resp:
            assert resp.status == 200
        results = await asyncio.gather(*(ask(http, sim, "flaky") for _ in range(200)))
        statuses = Counter(status for status, _ in results)
        stalled = sum(1 for status, took in results if status == 200 and took >= 1.0)
        assert 40 <= statuses[500] + statuses[503] <= 80 and statuses[500] and statuses[503]
        assert 20 <= stalled <= 60
        others = await asyncio.gather(*(ask(http, sim, "steady") for _ in range(50)))
        assert {status for status, _ in others} == {200}
        async with http.get(f"{sim}/_sim/stats") as resp:
            stats = await resp.json()
        assert stats["chaos_by_model"]["flaky"] == statuses[500] + statuses[503] + stalled
        async with http.post(f"{sim}/_sim/chaos", json={"models": {}}) as resp:
            assert resp.status == 200
        after = await asyncio.gather(*(ask(http, sim, "flaky") for _ in range(30)))
        assert {status for status, _ in after} == {200}
        async with http.post(f"{sim}/_sim/chaos", json={"models": "nope"}) as resp:
            assert resp.status == 400
