"""Where each process's CPU goes, by stage: py-spy samples the gateway, the worker, the
limiter and the cost-tracker while an open loop of non-streamed requests runs, and each
sample is put in one stage by the frames on its stack. A stage's share of a process's
samples times that process's CPU per request (measured over the same window) is its
cost per request.

Sampling is by wall clock over running threads, so a stage's share is of the time the
process was busy; a system call made by Python (a socket write, which on loopback also
does the receiver's share of TCP) counts for the Python frame that made it. Samples with
no Python frame are a stage of their own: native threads (the HTTP server's Rust
threads in the gateway), native code of the main thread, and samples py-spy read while
the stack was changing (it samples without stopping the process). In the gateway most of
them are the main thread's: per thread from /proc, granian's two threads used 92 µs of
its 980 µs per request at 300 requests/s.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

NATIVE = "no Python frame read (native code, or a sample read mid-change)"
EVENT_LOOP = "event loop (uvloop, asyncio)"

# A sample belongs to the first of these stages one of its frames matches...
SPECIFIC: tuple[tuple[str, str], ...] = (
    ("NATS client (publish, flush, read)", r"nats/aio/|nats/protocol/|nats/js/"),
    (
        "spans, metrics, logs",
        r"sluice/localtrace|sluice/telemetry|opentelemetry/|sluice/metrics|logging/__init__",
    ),
    ("token counting", r"sluice/tokens|tiktoken"),
    ("input guard", r"domain/guard"),
    ("admission (leases, limiter client)", r"domain/leases|domain/admission|fail_open"),
    ("auth and tenancy", r"domain/keys|tenancy/|authenticate"),
    ("body parsing and validation", r"pydantic|dialects/.*/request|dialects/parsing|read_body"),
    ("answer rendering", r"dialects/.*/response|domain/relay|problems"),
    ("protobuf", r"google/protobuf|_pb2"),
    ("upstream HTTP client (aiohttp)", r"aiohttp/|adapters/providers"),
)
# ...else the innermost of these, else the event loop.
GENERIC: tuple[tuple[str, str], ...] = (
    ("service code, other", r"services/|sluice/"),
    ("HTTP framework (litestar)", r"litestar/"),
    ("HTTP server (granian, Python side)", r"granian/"),
)
# Frames every sample of a service carries (its entry point), which say nothing.
_ROOT = re.compile(r"__main__\.py|sluice/service\.py|runpy")

PROCESSES = ("gateway", "inference_worker", "limiter", "cost_tracker")


def stage_of(frames: Iterable[str]) -> str:
    kept = [f for f in frames if f and not _ROOT.search(f)]
    if not kept:
        return NATIVE
    for name, pattern in SPECIFIC:
        if any(re.search(pattern, f) for f in kept):
            return name
    for frame in reversed(kept):
        for name, pattern in GENERIC:
            if re.search(pattern, frame):
                return name
    return EVENT_LOOP


def shares(raw: str) -> Counter[str]:
    """Samples per stage from py-spy's raw output (``frame;frame;... count`` lines)."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not count.isdigit():
            continue
        counts[stage_of(stack.split(";"))] += int(count)
    return counts


def py_spy() -> str | None:
    found = Path(sys.executable).parent / "py-spy"
    return str(found) if found.exists() else shutil.which("py-spy")


async def record(pids: dict[str, int], seconds: float, load: asyncio.Task[int]) -> dict[str, str]:
    """py-spy's raw samples of each process while ``load`` runs."""
    spy = py_spy()
    if spy is None:
        raise RuntimeError("py-spy not found (it is in the dev extras: make install)")
    duration = str(max(1, int(seconds)))
    with tempfile.TemporaryDirectory() as tmp:
        procs = {
            name: await asyncio.create_subprocess_exec(
                *(spy, "record", "-p", str(pid), "-d", duration, "-r", "500", "-f", "raw"),
                *("-o", f"{tmp}/{name}.txt", "--nonblocking"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pid in pids.items()
        }
        await load
        for proc in procs.values():
            await proc.wait()
        return await asyncio.to_thread(_read_all, Path(tmp), list(procs))


def _read_all(folder: Path, names: list[str]) -> dict[str, str]:
    files = {name: folder / f"{name}.txt" for name in names}
    return {name: path.read_text() if path.exists() else "" for name, path in files.items()}


def stage_table(samples: dict[str, str], cpu_ms: dict[str, float]) -> str:
    """One row per process and stage: share of its samples and microseconds per request."""
    from bench.report import table

    rows: list[list[object]] = []
    for name in PROCESSES:
        counts = shares(samples.get(name, ""))
        total = sum(counts.values())
        if not total:
            continue
        for stage, n in counts.most_common():
            share = n / total
            rows.append([name, stage, f"{100 * share:.1f}%", 1000 * cpu_ms.get(name, 0.0) * share])
    return table(["process", "stage", "share of samples", "µs CPU per request"], rows)


class Meter(Protocol):
    spent: dict[str, float]

    def counting(self) -> AbstractAsyncContextManager[None]: ...


async def stage_report(
    gateway: str,
    api_key: str,
    pids: dict[str, int],
    rate: float,
    seconds: float,
    *,
    meter_for: Callable[[dict[str, int]], Meter],
    body_for: Callable[[int], dict[str, Any]],
) -> str:
    """Samples the services while ``rate`` requests a second (``body_for``) run for
    ``seconds``, and prints each process's stages."""
    import aiohttp

    from bench.load import Target, _slice

    wanted = {name: pid for name, pid in pids.items() if name in PROCESSES}
    meter = meter_for(wanted)
    target = Target(
        f"{gateway}/v1/chat/completions",
        {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
    )
    count = max(1, round(rate * seconds))

    async def load() -> int:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session, meter.counting():
            done = await _slice(session, target, body_for, rate, count, 0)
        return len(done)

    task = asyncio.create_task(load())
    samples = await record(wanted, seconds, task)
    sent = max(1, task.result())
    cpu_ms = {name: secs * 1000 / sent for name, secs in meter.spent.items()}
    return stage_table(samples, cpu_ms)
