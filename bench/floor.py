"""The architectural floor: CPU per request of the least each step of Sluice's path
costs, built from the libraries Sluice uses, each step a real multi-process setup on
127.0.0.1 (``python -m bench --only floor``).

The ladder (processes in ``bench/floor_parts``, one role each):

1. ``direct proxy``: one process, HTTP in, the upstream called with aiohttp, HTTP out.
2. ``+ NATS hop``: a gateway process sends a core NATS request to a worker process,
   which calls the upstream and replies.
3. ``+ JetStream``: durability as Sluice has it: the gateway subscribes to the
   request's stream subject and publishes the work to a work-queue stream (acked, with
   ``Nats-Msg-Id``); the worker keeps a batch pull open on it, calls the upstream,
   publishes the answer as a core publish that a file-stored stream captures, publishes
   a usage event to the usage stream (acked) and acks the work; one consumer process
   fetches the usage events in batches a quarter of a second apart and acks each.
4. ``+ 2nd consumer``: the usage events read by two consumer processes, as the limiter
   and the cost-tracker read them.

The upstream is the repository's simulated provider (``sluice simulator``), the load
the overhead section's (16-token chat, not streamed), sent straight to the simulator
and through the pipeline in alternating slices (added p50 is the pipeline's), then in a
closed loop. CPU is read from ``/proc`` for every process of the pipeline, nats-server
included, not the simulator nor the load generator. Pipelines run in alternating order
over the rounds; medians of the rounds are printed. Sluice itself (``sluice up
--simulator --no-model``, every service on the path, over its own simulator) runs beside
them under the same load, unless asked not to.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from sluice.devtools.embedded import EmbeddedNats, free_port, venv_binary, wait_for_port

from bench.floor_parts.__main__ import (
    INFER_STREAM,
    STREAMS_STREAM,
    USAGE_STREAM,
    WORKER_DURABLE,
)
from bench.load import Sample, Target, closed_loop, median, one_request, paired_open_loop
from bench.load import percentile as _percentile
from bench.report import table

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-floor-" + secrets.token_hex(8)
KEY_SHA256 = hashlib.sha256(KEY.encode()).hexdigest()
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
USAGE_DURABLES = ("usage-1", "usage-2")


@dataclass(frozen=True)
class Pipeline:
    name: str
    # (process name, role arguments); {nats}, {upstream}, {port} are filled in.
    parts: tuple[tuple[str, tuple[str, ...]], ...]
    nats: bool = False
    jetstream: bool = False
    usage_consumers: int = 0
    # Sluice itself (``sluice up --simulator --no-model``, bench/__main__.py's
    # ``running``) under the same load, for comparison; no parts of its own.
    product: bool = False


PIPELINES = (
    Pipeline("1 direct proxy", (("proxy", ("proxy",)),)),
    Pipeline(
        "2 + NATS hop",
        (("gateway", ("gateway", "--mode", "core")), ("worker", ("worker", "--mode", "core"))),
        nats=True,
    ),
    Pipeline(
        "3 + JetStream, 1 consumer",
        (
            ("gateway", ("gateway", "--mode", "js")),
            ("worker", ("worker", "--mode", "js")),
            ("usage-1", ("usage", "--durable", "usage-1")),
        ),
        nats=True,
        jetstream=True,
        usage_consumers=1,
    ),
    Pipeline(
        "4 + 2nd consumer",
        (
            ("gateway", ("gateway", "--mode", "js")),
            ("worker", ("worker", "--mode", "js")),
            ("usage-1", ("usage", "--durable", "usage-1")),
            ("usage-2", ("usage", "--durable", "usage-2")),
        ),
        nats=True,
        jetstream=True,
        usage_consumers=2,
    ),
)
PRODUCT = Pipeline("Sluice (5 services)", (), nats=True, product=True)


@dataclass
class FloorRun:
    """One pipeline in one round."""

    pipeline: str
    sent: int = 0
    ok: int = 0
    added_p50_ms: float = float("nan")
    closed_rps: float = float("nan")
    # CPU ms per request by process, at the fixed rate and in the closed loop.
    cpu_open: dict[str, float] = field(default_factory=dict)
    cpu_closed: dict[str, float] = field(default_factory=dict)
    # Usage events stored, and acked by each consumer, when the pipeline stopped.
    usage_stored: int = 0
    usage_acked: dict[str, int] = field(default_factory=dict)


@dataclass
class Started:
    url: str
    pids: dict[str, int]
    nats_url: str | None
    headers: dict[str, str]
    # What the pipeline calls: the added latency is measured against it.
    upstream: str
    # The pipeline's own processes by name, with their logs (none for the product).
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = field(default_factory=dict)

    def check_alive(self) -> None:
        """Raises when a process of the pipeline has exited: its figures would be void."""
        for name, (proc, log) in self.procs.items():
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}: {tail}")


async def declare(nats_url: str, consumers: int) -> None:
    """The three streams (file storage, the retention and windows of SLUICE_INFER,
    SLUICE_STREAMS and SLUICE_USAGE) and the durables, before any process starts."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        day = 24 * 3600.0
        for name, subject, retention, window in (
            (INFER_STREAM, "floor.infer.>", RetentionPolicy.WORK_QUEUE, 120.0),
            (STREAMS_STREAM, "floor.stream.>", RetentionPolicy.LIMITS, 0.0),
            (USAGE_STREAM, "floor.usage.>", RetentionPolicy.LIMITS, day),
        ):
            await js.add_stream(
                StreamConfig(
                    name=name,
                    subjects=[subject],
                    retention=retention,
                    storage=StorageType.FILE,
                    max_age=day,
                    duplicate_window=window,
                )
            )
        await js.add_consumer(
            INFER_STREAM,
            ConsumerConfig(
                durable_name=WORKER_DURABLE,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30,
                max_ack_pending=1000,
            ),
        )
        for durable in USAGE_DURABLES[:consumers]:
            await js.add_consumer(
                USAGE_STREAM,
                ConsumerConfig(
                    durable_name=durable,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=30,
                    max_ack_pending=1000,
                ),
            )
    finally:
        await nc.close()


async def usage_settled(
    nats_url: str, consumers: int, expected: int, wait_s: float = 10.0
) -> tuple[int, dict[str, int]]:
    """Usage events stored, and acked by each consumer, once every consumer has acked
    ``expected`` of them (or ``wait_s`` passed)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + wait_s
        while True:
            stored = (await js.stream_info(USAGE_STREAM)).state.messages
            acked = {}
            for durable in USAGE_DURABLES[:consumers]:
                info = await js.consumer_info(USAGE_STREAM, durable)
                acked[durable] = int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
            if all(n >= expected for n in acked.values()) or time.monotonic() > deadline:
                return stored, acked
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


def wait_ready(log: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{log.name} exited: {log.read_text(errors='replace')[-2000:]}")
        if b"ready" in log.read_bytes():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{log.name} not ready after {timeout}s")


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.asynccontextmanager
async def started(pipeline: Pipeline, upstream: str) -> AsyncIterator[Started]:
    """The pipeline's processes (and a NATS server of its own) on free ports; for
    ``PRODUCT``, Sluice with its own simulator as the upstream."""
    if pipeline.product:
        from bench.__main__ import running

        async with running() as product:
            yield Started(
                f"{product.gateway}/v1/chat/completions",
                product.pids(),
                None,
                {"Authorization": f"Bearer {product.api_key}", "Content-Type": "application/json"},
                f"{product.simulator}/v1/chat/completions",
            )
        return
    with tempfile.TemporaryDirectory(prefix="sluice-floor-") as tmp:
        nats_server = EmbeddedNats.start(Path(tmp) / "nats") if pipeline.nats else None
        procs: list[subprocess.Popen[bytes]] = []
        try:
            pids: dict[str, int] = {}
            if nats_server is not None:
                pids["nats"] = nats_server.process.pid
                if pipeline.jetstream:
                    await declare(nats_server.url, pipeline.usage_consumers)
            port = free_port()
            for name, role in pipeline.parts:
                log = Path(tmp) / f"{name}.log"
                argv = [sys.executable, "-m", "bench.floor_parts", *role]
                argv += ["--upstream", upstream, "--key-sha256", KEY_SHA256]
                if role[0] in ("proxy", "gateway"):
                    argv += ["--port", str(port)]
                if nats_server is not None:
                    argv += ["--nats", nats_server.url]
                proc = spawn(argv, log)
                procs.append(proc)
                pids[name] = proc.pid
            for (name, _), proc in zip(pipeline.parts, procs, strict=True):
                await asyncio.to_thread(wait_ready, Path(tmp) / f"{name}.log", proc)
            yield Started(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                pids,
                nats_server.url if nats_server else None,
                HEADERS,
                upstream,
                {
                    name: (proc, Path(tmp) / f"{name}.log")
                    for (name, _), proc in zip(pipeline.parts, procs, strict=True)
                },
            )
        finally:
            stop(procs)
            if nats_server is not None:
                nats_server.stop()


@contextlib.contextmanager
def simulator() -> Any:
    port = free_port()
    proc = subprocess.Popen(
        [str(venv_binary("sluice")), "simulator", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port, 30, proc)
        yield f"http://127.0.0.1:{port}/v1/chat/completions"
    finally:
        stop([proc])


def per_request_ms(meter: Any, requests: int) -> dict[str, float]:
    """A ``CpuMeter``'s seconds by process as milliseconds per request."""
    return {name: s * 1000 / max(1, requests) for name, s in meter.spent.items()}


async def measure(
    pipeline: Pipeline,
    upstream: str,
    body_for: Callable[[int], dict[str, Any]],
    *,
    rate: float,
    seconds: float,
    in_flight: int,
    warmup: int,
) -> FloorRun:
    from bench.__main__ import CpuMeter

    run = FloorRun(pipeline.name)
    async with started(pipeline, upstream) as pipe:
        async with aiohttp.ClientSession() as session:
            for i in range(warmup):
                sample = await one_request(session, pipe.url, body_for(i), pipe.headers)
                run.sent += 1
                run.ok += sample.ok
        if pipeline.usage_consumers:
            assert pipe.nats_url is not None
            await usage_settled(pipe.nats_url, pipeline.usage_consumers, run.ok)
        meter = CpuMeter(pipe.pids)
        direct, via = await paired_open_loop(
            Target(pipe.upstream, {"Content-Type": "application/json"}),
            Target(pipe.url, pipe.headers),
            body_for,
            rate,
            seconds,
            around_via=meter.counting,
        )
        run.cpu_open = per_request_ms(meter, len(via))
        run.added_p50_ms = 1000 * (
            _percentile([s.total_s for s in via if s.ok], 50)
            - _percentile([s.total_s for s in direct if s.ok], 50)
        )
        run.sent += len(via)
        run.ok += sum(s.ok for s in via)
        closed = CpuMeter(pipe.pids)
        samples: list[Sample] = []
        async with closed.counting():
            samples, run.closed_rps = await closed_loop(
                pipe.url, body_for, pipe.headers, in_flight, seconds
            )
        pipe.check_alive()
        ok = sum(s.ok for s in samples)
        run.cpu_closed = per_request_ms(closed, ok)
        run.sent += len(samples)
        run.ok += ok
        if pipeline.usage_consumers:
            assert pipe.nats_url is not None
            run.usage_stored, run.usage_acked = await usage_settled(
                pipe.nats_url, pipeline.usage_consumers, run.ok
            )
    return run


async def measure_floor(
    *,
    rounds: int,
    rate: float,
    seconds: float,
    in_flight: int = 32,
    warmup: int = 50,
    pipelines: tuple[Pipeline, ...] = PIPELINES,
) -> list[list[FloorRun]]:
    """Every pipeline in every round (order reversed every other round); the runs of
    each round in ``pipelines`` order."""
    from bench.__main__ import chat_body

    body_for = chat_body(False, 16)
    rounds_out: list[list[FloorRun]] = []
    with simulator() as upstream:
        async with aiohttp.ClientSession() as session:
            for i in range(warmup):
                await one_request(session, upstream, body_for(i), {})
        for round_ in range(rounds):
            order = list(pipelines) if round_ % 2 == 0 else list(reversed(pipelines))
            runs = {
                p.name: await measure(
                    p,
                    upstream,
                    body_for,
                    rate=rate,
                    seconds=seconds,
                    in_flight=in_flight,
                    warmup=warmup,
                )
                for p in order
            }
            rounds_out.append([runs[p.name] for p in pipelines])
    return rounds_out


def usage_column(runs: tuple[FloorRun, ...]) -> str:
    """Usage events acked by the slowest consumer, of those stored, over the rounds."""
    if not any(r.usage_acked for r in runs):
        return "-"
    acked = sum(min(r.usage_acked.values()) for r in runs)
    return f"{acked}/{sum(r.usage_stored for r in runs)}"


def floor_report(rounds: list[list[FloorRun]], rate: float, in_flight: int) -> str:
    by_pipeline = list(zip(*rounds, strict=True))

    def med(runs: tuple[FloorRun, ...], read: Callable[[FloorRun], float]) -> float:
        return median([read(r) for r in runs])

    rows: list[list[object]] = []
    process_rows: list[list[object]] = []
    for runs in by_pipeline:
        names = list(runs[0].cpu_open)
        rows.append(
            [
                runs[0].pipeline,
                f"{sum(r.ok for r in runs)}/{sum(r.sent for r in runs)}",
                med(runs, lambda r: r.closed_rps),
                med(runs, lambda r: sum(r.cpu_closed.values())),
                med(runs, lambda r: sum(r.cpu_open.values())),
                med(runs, lambda r: r.added_p50_ms),
                usage_column(runs),
            ]
        )
        for name in names:
            process_rows.append(
                [
                    runs[0].pipeline,
                    name,
                    median([r.cpu_open[name] for r in runs]),
                    median([r.cpu_closed[name] for r in runs]),
                ]
            )
    summary = table(
        [
            "pipeline",
            "ok",
            f"req/s, {in_flight} in flight",
            f"CPU ms/req, {in_flight} in flight",
            f"CPU ms/req, {rate:g}/s",
            f"added p50 ms, {rate:g}/s",
            "usage events acked/stored",
        ],
        rows,
    )
    per_process = table(
        ["pipeline", "process", f"CPU ms/req, {rate:g}/s", f"CPU ms/req, {in_flight} in flight"],
        process_rows,
    )
    return f"{summary}\n\nCPU ms per request, by process (medians)\n{per_process}"


async def floor_tables(
    *,
    rounds: int,
    rate: float,
    seconds: float,
    in_flight: int = 32,
    warmup: int = 50,
    product: bool = True,
) -> str:
    """The floor's tables; with ``product``, Sluice's own row under the same load."""
    measured = await measure_floor(
        rounds=rounds,
        rate=rate,
        seconds=seconds,
        in_flight=in_flight,
        warmup=warmup,
        pipelines=(*PIPELINES, PRODUCT) if product else PIPELINES,
    )
    return floor_report(measured, rate, in_flight)
