"""Reconnect latency of resumable streams: how long a client that comes back with
``Last-Event-ID`` waits for its first replayed event.

One streamed completion is started (paced by the simulator so it is still running) and
read for a few events; then each sample opens ``GET /v1/streams/{id}`` with
``Last-Event-ID`` at a random earlier event and times the first ``data:`` line. Each
sample reads the request's history from JetStream again (a fresh ordered consumer), so
this is the cost a reconnect pays on any gateway replica.
"""

from __future__ import annotations

import random
import time

import aiohttp

from bench.load import median, percentile
from bench.report import table


async def _first_event_ms(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> float:
    started = time.perf_counter()
    async with session.get(url, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"resume answered {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if line.startswith(b"data:"):
                return (time.perf_counter() - started) * 1000
    raise RuntimeError("the resumed stream ended without an event")


async def measure_reconnect(gateway_url: str, api_key: str, samples: int) -> dict[str, float]:
    """p50/p99 (and mean) milliseconds from a reconnect to its first replayed event."""
    auth = {"Authorization": f"Bearer {api_key}"}
    body = {
        "model": "sim-fast",
        "stream": True,
        "messages": [{"role": "user", "content": "a long answer, please"}],
        # Slow enough to outlive the samples: the resume replays, then would tail live.
        "sim": {"output_tokens": 400, "tokens_per_second": 40},
    }
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(
            f"{gateway_url}/v1/chat/completions",
            json=body,
            headers={**auth, "x-sluice-on-disconnect": "continue", "cache-control": "no-store"},
        ) as resp:
            request_id = resp.headers["x-request-id"]
            seen = 0
            async for line in resp.content:
                if line.startswith(b"id:"):
                    seen = int(line.decode().rsplit(":", 1)[1])
                    if seen >= 20:
                        break
        url = f"{gateway_url}/v1/streams/{request_id}"
        timings: list[float] = []
        for _ in range(max(1, samples)):
            after = random.randint(1, seen - 1)
            headers = {**auth, "Last-Event-ID": f"{request_id}:{after}"}
            timings.append(await _first_event_ms(session, url, headers))
    return {
        "p50_ms": median(timings),
        "p99_ms": percentile(timings, 99),
        "mean_ms": sum(timings) / len(timings),
        "samples": float(len(timings)),
    }


async def resume_table(gateway_url: str, api_key: str, *, samples: int = 200) -> str:
    """``measure_reconnect`` as a table row."""
    figures = await measure_reconnect(gateway_url, api_key, samples)
    return table(
        ["reconnects", "first replayed event p50 ms", "p99 ms", "mean ms"],
        [[int(figures["samples"]), figures["p50_ms"], figures["p99_ms"], figures["mean_ms"]]],
    )
