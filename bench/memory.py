"""Resident memory of every Sluice process, idle and under load (``--only memory``).

The product as ``sluice up --simulator --no-model`` starts it: the supervisor (the
``sluice up`` process itself), the five services and the embedded NATS server. RSS
(``VmRSS``, what ``ps`` and the peer bench sum) is read from /proc idle (after the warm-
up), then every half second while an open loop sends ``rate`` requests per second for
``seconds`` (every other one streamed); the table gives idle, peak and end, and the CPU
each process spent per request meanwhile (what a memory setting costs in CPU). PSS
(shared pages split among the processes that map them) is printed beside it: RSS counts
the shared libraries and the files every Python process maps once per process, PSS once
in all.

The bar (issue 17) is RSS summed over every process of Sluice under load, NATS
included; the sum without NATS is the Python processes alone. The simulator is the
upstream, not Sluice: listed, never summed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from bench.load import Sample, one_request
from bench.report import table

SAMPLE_EVERY_S = 0.5
# The order of the table: the supervisor first, the services as they start, NATS last.
# ("launcher": a checkout from before `sluice up` supervised from its own process forked
# its supervisor from a launcher that forwarded signals.)
ORDER = (
    "launcher",
    "supervisor",
    "limiter",
    "cache",
    "cost_tracker",
    "inference_worker",
    "gateway",
    "nats",
)


def _status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    kib = _status_kib(pid, "VmRSS")
    return float("nan") if kib is None else kib / 1024


def pss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def _open_loop(
    url: str,
    headers: dict[str, str],
    body_for: Callable[[int], dict[str, Any]],
    rate: float,
    seconds: float,
) -> list[Sample]:
    timeout = aiohttp.ClientTimeout(total=60)
    tasks: list[asyncio.Task[Sample]] = []
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout
    ) as session:
        start = time.perf_counter()
        for i in range(round(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(session, url, body_for(i), headers)))
        return list(await asyncio.gather(*tasks))


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(parent, []).append(int(entry.name))
    return kids


def product_pids(root: int, services: Mapping[str, int]) -> dict[str, int]:
    """Every process of the product's tree by name: ``services`` (the five and NATS, by
    their command lines), the ``sluice up`` process at ``root`` (the supervisor, or the
    launcher of an older checkout, whose supervisor is a child running ``up`` too) and the
    simulator."""
    named = dict(services)
    known = set(services.values())
    kids = _children()
    todo, tree = [root], []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(kids.get(pid, []))
    for pid in tree:
        if pid in known:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if pid == root:
            named["supervisor"] = pid
        elif b" simulator" in cmdline:
            named["simulator"] = pid
        elif b" up " in cmdline:
            named["launcher"], named["supervisor"] = root, pid
    return named


def _ordered(pids: Mapping[str, int]) -> list[str]:
    known = [name for name in ORDER if name in pids]
    return known + sorted(set(pids) - set(known) - {"simulator"})


async def memory_table(
    gateway: str,
    api_key: str,
    pids: Mapping[str, int],
    body_for: Callable[[int], dict[str, Any]],
    *,
    rate: float,
    seconds: float,
) -> str:
    """RSS (and PSS) of each process in ``pids`` idle, at its peak under the load and at
    its end; sums with and without NATS."""
    idle = {name: rss_mib(pid) for name, pid in pids.items()}
    idle_pss = {name: pss_mib(pid) for name, pid in pids.items()}
    peak = dict(idle)
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            for name, pid in pids.items():
                peak[name] = max(peak[name], rss_mib(pid))
            await asyncio.sleep(SAMPLE_EVERY_S)

    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    sampler = asyncio.create_task(sample())
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    samples = await _open_loop(f"{gateway}/v1/chat/completions", headers, body_for, rate, seconds)
    done.set()
    await sampler
    end = {name: rss_mib(pid) for name, pid in pids.items()}
    sent = max(1, len(samples))
    cpu_ms = {
        name: (cpu_seconds(pid) - cpu_before[name]) * 1000 / sent for name, pid in pids.items()
    }
    end_pss = {name: pss_mib(pid) for name, pid in pids.items()}
    ok = sum(1 for s in samples if s.ok)

    rows: list[list[object]] = []
    names = _ordered(pids)
    for name in names:
        rows.append(
            [name, idle[name], peak[name], end[name], idle_pss[name], end_pss[name], cpu_ms[name]]
        )

    def total(values: Mapping[str, float], with_nats: bool) -> float:
        return sum(v for n, v in values.items() if n in names and (with_nats or n != "nats"))

    for label, with_nats in (("every Sluice process", True), ("without NATS", False)):
        rows.append(
            [
                label,
                total(idle, with_nats),
                total(peak, with_nats),
                total(end, with_nats),
                total(idle_pss, with_nats),
                total(end_pss, with_nats),
                total(cpu_ms, with_nats),
            ]
        )
    if "simulator" in pids:
        name = "simulator"
        rows.append(
            [
                "simulator (upstream, not summed)",
                idle[name],
                peak[name],
                end[name],
                idle_pss[name],
                end_pss[name],
                cpu_ms[name],
            ]
        )
    header = f"{ok}/{len(samples)} requests answered\n"
    return header + table(
        [
            "process",
            "RSS idle MiB",
            "RSS peak MiB",
            "RSS end MiB",
            "PSS idle MiB",
            "PSS end MiB",
            "CPU ms/req",
        ],
        rows,
    )
