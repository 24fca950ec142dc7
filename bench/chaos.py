"""Chaos: a route whose primary deployment fails 5% of its calls with a 5xx and stalls
another 5% far past its bound, over the simulator, through the whole product.

The route (``chaos-route``) has two deployments on the simulator: the primary, held to
``PRIMARY_BOUND_S`` per attempt, one attempt; then the secondary. First the load runs
with no fault (every answer from the primary: the primary's own p99), then the same
load with the simulator's chaos on the primary's upstream model (``POST /_sim/chaos``:
5% 500/503, 5% held ``STALL_MS`` before answering). Reported: the share of requests
answered 200, p50/p99 with and without chaos, how many answers the secondary or a last
resort gave, against the issue's bars (answered >= 99.9%, p99 <= primary p99 + 1 s).
Open loop: requests leave at a fixed rate whatever the answers do.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.load import percentile
from bench.report import table

REPO_CONFIG = Path(__file__).resolve().parents[1] / "config"
ROUTE = "chaos-route"
PRIMARY_UPSTREAM = "chaos-primary-up"
# Each simulated answer: first token after 150 ms, 24 tokens at 240 tokens/s (~0.25 s).
SIM = {"ttft_ms": 150, "tokens_per_second": 240, "output_tokens": 24}
PRIMARY_BOUND_S = 0.6
STALL_MS = 8000
ERROR_RATE = 0.05
STALL_RATE = 0.05


def product_env(config_dir: Path) -> dict[str, str]:
    """A copy of the catalogue with the chaos route added."""
    source = Path(os.environ.get("SLUICE_CONFIG_DIR") or REPO_CONFIG)
    shutil.copytree(source, config_dir, dirs_exist_ok=True)
    path = config_dir / "providers.yaml"
    catalog = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    catalog["models"][ROUTE] = {
        "owned_by": "simulator",
        "deadline_seconds": 15,
        "chain": [
            {
                "name": "chaos-primary",
                "provider": "simulator",
                "upstream_model": PRIMARY_UPSTREAM,
                "ttft_timeout_seconds": PRIMARY_BOUND_S,
                "timeout_seconds": PRIMARY_BOUND_S,
                "attempts": 1,
            },
            {
                "name": "chaos-secondary",
                "provider": "simulator",
                "upstream_model": "chaos-secondary-up",
            },
        ],
    }
    path.write_text(yaml.safe_dump(catalog, sort_keys=False), encoding="utf-8")
    return {"SLUICE_CONFIG_DIR": str(config_dir)}


@dataclass
class Phase:
    name: str
    totals: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    deployments: Counter[str] = field(default_factory=Counter)
    degraded: int = 0

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    @property
    def answered(self) -> int:
        return self.statuses[200] - self.degraded


async def _one(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], i: int, phase: Phase
) -> None:
    body = {
        "model": ROUTE,
        "messages": [{"role": "user", "content": f"chaos question {i}"}],
        "max_tokens": 32,
        "sim": SIM,
    }
    started = time.perf_counter()
    try:
        async with session.post(url, data=json.dumps(body), headers=headers) as resp:
            await resp.read()
            status = resp.status
            phase.deployments[resp.headers.get("x-sluice-deployment", "-")] += 1
            if resp.headers.get("x-sluice-status") == "degraded":
                phase.degraded += 1
    except (aiohttp.ClientError, TimeoutError):
        status = 599
    phase.statuses[status] += 1
    if status == 200:
        phase.totals.append(time.perf_counter() - started)


async def _load(gateway: str, api_key: str, phase: Phase, rate: float, seconds: float) -> None:
    url = f"{gateway}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = []
        start = time.perf_counter()
        count = int(rate * seconds)
        for i in range(count):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(session, url, headers, i, phase)))
        await asyncio.gather(*tasks)


async def _chaos(simulator: str, models: dict[str, Any]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{simulator}/_sim/chaos", json={"models": models}) as resp,
    ):
        resp.raise_for_status()


async def _stats(simulator: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{simulator}/_sim/stats") as resp:
        found: dict[str, Any] = await resp.json()
        return found


async def chaos_table(
    gateway: str, simulator: str, api_key: str, *, rate: float, seconds: float
) -> str:
    # Warm the path (connections, tokenizer, first pulls) outside the measured runs.
    await _load(gateway, api_key, Phase("warm-up"), rate, 1.0)
    baseline = Phase("primary alone, no faults")
    await _load(gateway, api_key, baseline, rate, seconds)
    chaotic = Phase(
        f"{ERROR_RATE:.0%} 5xx + {STALL_RATE:.0%} stalls ({STALL_MS / 1000:g} s) on the primary"
    )
    before = (await _stats(simulator)).get("chaos_by_model", {}).get(PRIMARY_UPSTREAM, 0)
    await _chaos(
        simulator,
        {
            PRIMARY_UPSTREAM: {
                "error_rate": ERROR_RATE,
                "stall_rate": STALL_RATE,
                "stall_ms": STALL_MS,
                "seed": 20261204,
            }
        },
    )
    try:
        await _load(gateway, api_key, chaotic, rate, seconds)
    finally:
        await _chaos(simulator, {})
    injected = (await _stats(simulator)).get("chaos_by_model", {}).get(PRIMARY_UPSTREAM, 0)
    primary_p99 = percentile(baseline.totals, 99)
    rows = []
    for phase in (baseline, chaotic):
        answered = 100 * phase.answered / phase.sent if phase.sent else float("nan")
        p99 = percentile(phase.totals, 99)
        rows.append(
            [
                phase.name,
                f"{phase.sent:,}",
                f"{answered:.2f} %",
                f"{percentile(phase.totals, 50) * 1000:.0f}",
                f"{p99 * 1000:.0f}",
                f"{(p99 - primary_p99) * 1000:+.0f}",
                str(phase.deployments.get("chaos-secondary", 0)),
                str(phase.degraded),
                ", ".join(f"{s}: {n}" for s, n in sorted(phase.statuses.items()) if s != 200)
                or "-",
            ]
        )
    answered_share = chaotic.answered / chaotic.sent if chaotic.sent else 0.0
    p99_delta = percentile(chaotic.totals, 99) - primary_p99
    verdict = (
        f"\nfaults injected on the primary: {injected - before:,} of {chaotic.sent:,} calls; "
        f"bars: answered >= 99.9 % ({'met' if answered_share >= 0.999 else 'MISSED'}), "
        f"p99 <= primary p99 + 1 s ({'met' if p99_delta <= 1.0 else 'MISSED'})"
    )
    return (
        table(
            [
                "load",
                "requests",
                "answered",
                "p50 ms",
                "p99 ms",
                "p99 vs primary",
                "by secondary",
                "degraded",
                "other statuses",
            ],
            rows,
        )
        + verdict
    )
