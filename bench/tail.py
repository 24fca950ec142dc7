"""Where a request's tail goes: an open loop of non-streamed requests through the
gateway, each answer's client latency split by the answer's own ``sluice.latency_ms``
into what the gateway measured (from admission to the final event: queue, upstream and
the rest) and what it did not (the HTTP server's hand-off, authentication, the body's
arrival, the rendering, the client). The table compares the middle half of the requests
with the slowest few percent, so that a longer tail can be placed before it is cut.

Beside it, from the gateway's own spans of the same requests (``round_trips``): how many
request traces held a round trip to the limiter, and how many lease refills ran ahead of
need. A request admitted from a lease makes none; one that found its key's lease spent
did, and the requests of the key that came meanwhile waited for it."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.report import table

QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995)
CHAT_SPAN = "POST /v1/chat/completions"
# The gateway's CLIENT span of a reserve on a limiter partition, and a lease asked ahead.
RESERVE_SPAN = "sluice.v1.limiter.reserve.* request"
REFILL_SPAN = "limiter.lease refill"


@dataclass
class Answered:
    client_ms: float
    latency: dict[str, float]

    @property
    def inside_ms(self) -> float:
        return float(self.latency.get("total", 0.0))

    @property
    def outside_ms(self) -> float:
        return self.client_ms - self.inside_ms


async def _open_loop(
    url: str, headers: dict[str, str], body_for: Any, rate: float, seconds: float
) -> list[Answered]:
    answered: list[Answered] = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout
    ) as session:

        async def one(i: int) -> None:
            started = time.perf_counter()
            async with session.post(url, data=json.dumps(body_for(i)), headers=headers) as r:
                body = await r.json()
            if r.status == 200:
                latency = (body.get("sluice") or {}).get("latency_ms") or {}
                answered.append(Answered((time.perf_counter() - started) * 1000, latency))

        start = time.perf_counter()
        tasks = []
        for i in range(round(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)
    return answered


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def tail_report(
    gateway: str, api_key: str, body_for: Any, rate: float, seconds: float, slowest: float = 0.03
) -> str:
    url = f"{gateway}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    answered = sorted(
        await _open_loop(url, headers, body_for, rate, seconds), key=lambda a: a.client_ms
    )
    n = len(answered)
    if n == 0:
        return "no answer"
    quantiles = table(
        ["requests", *(f"p{q * 100:g} ms" for q in QUANTILES)],
        [[n, *(f"{answered[min(n - 1, int(n * q))].client_ms:.2f}" for q in QUANTILES)]],
    )
    groups = {
        "middle half": answered[n // 4 : 3 * n // 4],
        f"slowest {slowest * 100:g} %": answered[-max(1, int(n * slowest)) :],
    }
    rows = []
    for name, group in groups.items():
        rows.append(
            [
                name,
                f"{_median([a.client_ms for a in group]):.2f}",
                f"{_median([a.inside_ms for a in group]):.2f}",
                f"{_median([float(a.latency.get('queue', 0)) for a in group]):.2f}",
                f"{_median([float(a.latency.get('upstream', 0)) for a in group]):.2f}",
                f"{_median([a.outside_ms for a in group]):.2f}",
            ]
        )
    split = table(
        [
            "requests",
            "client ms",
            "gateway-measured ms",
            "of which queue ms",
            "of which upstream ms",
            "not measured by the gateway ms",
        ],
        rows,
    )
    return f"{quantiles}\n\nMedians of each group\n{split}"


def round_trips(span_lines: list[str]) -> str:
    """Of the chat requests' traces among ``span_lines`` (the gateway's span file, JSON
    lines): how many held a round trip to the limiter, and the lease refills run ahead."""
    names: dict[str, set[str]] = defaultdict(set)
    for line in span_lines:
        span = json.loads(line)
        names[span["trace_id"]].add(span["name"])
    requests = [trace for trace in names.values() if CHAT_SPAN in trace]
    waited = sum(1 for trace in requests if RESERVE_SPAN in trace)
    refills = sum(1 for trace in names.values() if REFILL_SPAN in trace)
    return table(
        ["request traces", "with a round trip to the limiter", "lease refills ahead"],
        [[len(requests), waited, refills]],
    )


def span_lines_after(path: Path, offset: int) -> list[str]:
    """The span file's complete lines from byte ``offset`` on."""
    if not path.exists():
        return []
    with path.open("rb") as fh:
        fh.seek(offset)
        data = fh.read()
    return [line for line in data.decode().splitlines() if line.strip()]
