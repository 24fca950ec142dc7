"""The real cache process SIGKILLed under load, then hung (SIGSTOP): every request is
answered, those the cache could not answer marked ``x-sluice-cache: bypass`` with
``x-sluice-cache-reason: unavailable``, ``/readyz`` says ``degraded`` naming the cache,
and a cache started again (or woken) answers hits from the entries it kept.

A hung cache costs a lookup its whole budget: after ``SLUICE_GATEWAY_CACHE_SKIP_AFTER``
such lookups in a row the gateway stops asking for ``CACHE_SKIP_SECONDS``."""

from __future__ import annotations

import asyncio
import signal
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from sluice.topology import ServiceName

from tests.support.full_stack import full_stack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUDGET_SECONDS = 0.25
SKIP_AFTER = 3
SKIP_SECONDS = 2.0
REQUESTS = 240
CONCURRENCY = 8
KILL_AT = 80


def body(n: int, *, stream: bool = False) -> dict[str, Any]:
    """A cacheable request (temperature 0): ``n`` names one of a few prompts, so that
    a third of the load repeats a prompt already answered."""
    return {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": f"outage {n}"}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": stream,
    }


async def readiness(http: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    reply = await http.get("/readyz")
    return reply.status_code, reply.json()


async def test_cache_killed_under_load_requests_go_on_uncached_and_hit_again_after(
    tmp_path: Path,
) -> None:
    env = {
        "SLUICE_GATEWAY_CACHE_TIMEOUT_SECONDS": str(BUDGET_SECONDS),
        "SLUICE_GATEWAY_CACHE_SKIP_AFTER": str(SKIP_AFTER),
        "SLUICE_GATEWAY_CACHE_SKIP_SECONDS": str(SKIP_SECONDS),
        "SLUICE_GATEWAY_READINESS_CACHE_SECONDS": "0.1",
        "SLUICE_LIMITER_DEFAULT_REQUESTS_PER_MINUTE": "1000000",
        "SLUICE_LIMITER_DEFAULT_TOKENS_PER_MINUTE": "1000000000",
    }
    async with full_stack(tmp_path, gateway_env=env) as fs, fs.client() as http:
        # The repeated prompts are answered once, so that the load has hits in it.
        for n in range(3):
            assert (await http.post("/v1/chat/completions", json=body(n))).status_code == 200
        again = await http.post("/v1/chat/completions", json=body(0))
        assert again.headers["x-sluice-cache"] == "hit"
        assert (await readiness(http))[1]["status"] == "ready"

        cache = fs.stack.processes[ServiceName.CACHE]
        killed = asyncio.Event()
        answers: list[tuple[bool, int, dict[str, str], dict[str, Any]]] = []
        sent = 0

        async def client() -> None:
            nonlocal sent
            while sent < REQUESTS:
                sent += 1
                n = sent
                if n == KILL_AT:
                    cache.signal(signal.SIGKILL)
                    assert await asyncio.to_thread(cache.process.wait, 10) == -signal.SIGKILL
                    killed.set()
                after = killed.is_set()
                # One in three repeats a prompt answered (and cached) before the kill.
                prompt = n % 3 if n % 3 == 0 else 1000 + n
                reply = await http.post("/v1/chat/completions", json=body(prompt))
                answers.append((after, reply.status_code, dict(reply.headers), reply.json()))

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
        assert Counter(status for _, status, _, _ in answers) == {200: REQUESTS}
        before = [(h, b) for after, _, h, b in answers if not after]
        during = [(h, b) for after, _, h, b in answers if after]
        assert len(during) >= REQUESTS - KILL_AT - CONCURRENCY
        # Those in flight when the cache died may have gone uncached too.
        assert {h["x-sluice-cache"] for h, _ in before} <= {"hit", "miss", "coalesced", "bypass"}
        assert "hit" in {h["x-sluice-cache"] for h, _ in before}
        # Identical requests in flight together still share one call (the claims are in
        # NATS KV, not in the cache): a follower says so; every other one went uncached.
        kinds = Counter(h["x-sluice-cache"] for h, _ in during)
        assert set(kinds) <= {"bypass", "coalesced"} and kinds["bypass"] > len(during) / 2
        for headers, answer in during:
            assert headers["x-sluice-cache-reason"] == "unavailable"
            assert answer["sluice"]["cache"] == headers["x-sluice-cache"]
            assert answer["choices"][0]["message"]["content"]

        def p50(rows: list[tuple[dict[str, str], dict[str, Any]]], part: str) -> float:
            return statistics.median(b["sluice"]["latency_ms"][part] for _, b in rows)

        print(
            f"\ncache up: p50 total {p50(before, 'total'):.1f} ms"
            f" (lookup {p50(before, 'cache'):.2f});"
            f" cache killed: p50 total {p50(during, 'total'):.1f} ms"
            f" (lookup {p50(during, 'cache'):.2f})"
        )

        # Dead, not hung: once the pause the lookups in flight at the kill caused is
        # over, a lookup is answered "no responders" by the NATS server, not left to
        # run out of its budget (nor does it pause lookups again).
        await asyncio.sleep(SKIP_SECONDS)
        dead = []
        for _ in range(SKIP_AFTER + 2):
            reply = await http.post("/v1/chat/completions", json=body(0))
            assert reply.headers["x-sluice-cache"] == "bypass"
            dead.append(reply.json()["sluice"]["latency_ms"]["cache"])
        print(f"cache dead: lookup ms per request {dead}")
        assert all(0 < ms < BUDGET_SECONDS * 500 for ms in dead)

        # A stream is answered too, and says it went uncached.
        async with http.stream(
            "POST", "/v1/chat/completions", json=body(0, stream=True)
        ) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["x-sluice-cache"] == "bypass"
            assert streamed.headers["x-sluice-cache-reason"] == "unavailable"
            text = "".join([chunk async for chunk in streamed.aiter_text()])
        assert "data: [DONE]" in text

        # Readiness: degraded (still 200: answers go on), naming the cache and why.
        status, ready = await readiness(http)
        assert (status, ready["status"]) == (200, "degraded"), ready
        assert ready["services"]["cache"] is False
        assert [o["service"] for o in ready["outages"]] == ["cache"]
        assert "uncached" in ready["outages"][0]["effect"]

        # A cache again: its entries are in JetStream KV, so the prompts answered before
        # the kill are hits again, and readiness is back to ready.
        fs.stack.start(ServiceName.CACHE)
        await fs.stack.wait_ready([ServiceName.CACHE], timeout=60)

        async def hit() -> bool:
            reply = await http.post("/v1/chat/completions", json=body(0))
            assert reply.status_code == 200
            return reply.headers["x-sluice-cache"] == "hit"

        await wait_for(hit, timeout=20, what="a hit from the restarted cache")
        assert (
            "x-sluice-cache-reason"
            not in (await http.post("/v1/chat/completions", json=body(0))).headers
        )
        await wait_for(lambda: _status_is(http, "ready"), timeout=10, what="/readyz ready again")

        # Hung, not dead: each lookup now runs out of its budget, until SKIP_AFTER of
        # them in a row stop the gateway asking; those after are answered without one.
        hung = fs.stack.processes[ServiceName.CACHE]
        hung.signal(signal.SIGSTOP)
        try:
            rows = []
            for _ in range(SKIP_AFTER + 3):
                reply = await http.post("/v1/chat/completions", json=body(0))
                assert reply.status_code == 200
                assert reply.headers["x-sluice-cache"] == "bypass"
                rows.append(reply.json()["sluice"]["latency_ms"]["cache"])
            print(f"cache hung: lookup ms per request {rows}")
            # (The budget as the event loop's timer keeps it: within a few milliseconds.)
            assert all(ms >= BUDGET_SECONDS * 900 for ms in rows[:SKIP_AFTER])
            assert rows[SKIP_AFTER:] == [0.0] * 3
            status, ready = await readiness(http)
            assert (status, ready["status"]) == (200, "degraded")
        finally:
            hung.signal(signal.SIGCONT)
        # Woken: after the pause one lookup goes through, answers, and lookups resume.
        await asyncio.sleep(SKIP_SECONDS)
        await wait_for(hit, timeout=10, what="a hit once the cache answers again")


async def _status_is(http: httpx.AsyncClient, wanted: str) -> bool:
    return (await readiness(http))[1]["status"] == wanted
