"""Usage events per second the cost-trackers sustain into their ledger.

For each configuration (one tracker on SQLite; one and two trackers on one PostgreSQL
database), a backlog of ``UsageEvent``s is stored in ``SLUICE_USAGE`` first, then the
trackers (real ``python -m services.cost_tracker`` processes, sharing one durable) are
started and drain it; the rate is the backlog over the time from the first row to the
last committed in the ledger (polled every 20 ms), so process start is not counted.
CPU is the trackers' own (user and system, from /proc) over the same span, per event.

Each round runs every configuration once, in a rotating order, on an emptied stream and
a fresh database; medians over the rounds are quoted. PostgreSQL runs with its default
durability (``fsync`` and ``synchronous_commit`` on); SQLite's ledger uses WAL with
``synchronous=FULL`` as the service does. NATS, PostgreSQL, the trackers and this
process share the machine's cores.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sluice.bus import Bus
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.devtools.embedded import EmbeddedNats, free_port
from sluice.devtools.postgres import EmbeddedPostgres, connect, fresh_database
from sluice.topology import Streams, Subjects

from bench.report import table

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("sqlite x1", "postgres x1", "postgres x2")


@dataclass
class Run:
    config: str
    events_per_second: float
    cpu_us_per_event: float


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _publish_backlog(bus: Bus, events: int) -> None:
    await bus.js.purge_stream(Streams.USAGE.name)
    pending = []
    for i in range(events):
        event = cost_pb2.UsageEvent(
            request_id=f"bench-{uuid.uuid4().hex}",
            key_id=f"key-{i % 16}",
            team_id=f"team-{i % 4}",
            model_requested="sim-fast",
            model_served="sim-fast",
            provider="simulator",
            usage=chat_pb2.Usage(input_tokens=200 + i % 300, output_tokens=50 + i % 120),
            occurred_unix_nanos=time.time_ns(),
            outcome="completed",
            tags=["bench"] if i % 3 == 0 else [],
        )
        pending.append(
            bus.js.publish(
                Subjects.usage(event.key_id),
                event.SerializeToString(),
                headers={"Nats-Msg-Id": event.request_id},
            )
        )
        if len(pending) >= 256:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)


def _tracker(
    nats_url: str, state: Path, durable: str, database_url: str | None
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        {
            "SLUICE_NATS_URL": nats_url,
            "SLUICE_STATE_DIR": str(state),
            "SLUICE_CONFIG_DIR": str(REPO / "config"),
            "SLUICE_COST_CONSUMER_DURABLE": durable,
            "SLUICE_COST_GRPC_PORT": str(free_port()),
            "SLUICE_COST_METRICS_PORT": str(free_port()),
            "SLUICE_LOG_LEVEL": "WARNING",
        }
    )
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    if database_url is not None:
        env["SLUICE_COST_DATABASE_URL"] = database_url
    return subprocess.Popen(
        [sys.executable, "-m", "services.cost_tracker"],
        cwd=REPO,
        env=env,
        stdout=(state / f"{durable}-{len(list(state.glob('*.log')))}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )


async def _one(
    config: str, bus: Bus, nats_url: str, pg: EmbeddedPostgres, events: int, timeout: float
) -> Run:
    await _publish_backlog(bus, events)
    durable = f"bench-ledger-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="sluice-bench-ledger-") as tmp:
        state = Path(tmp)
        async with fresh_database(pg.url, "sluice_bench") as database_url:
            on_postgres = config.startswith("postgres")
            replicas = 2 if config.endswith("x2") else 1
            conn = await connect(database_url) if on_postgres else None
            ledger = state / "ledger.sqlite3"

            async def rows() -> int:
                if conn is not None:
                    try:
                        return int(await conn.fetchval("SELECT count(*) FROM ledger"))
                    except Exception:  # the first tracker is still creating the schema
                        return 0
                if not ledger.exists():
                    return 0
                try:
                    with sqlite3.connect(ledger) as lite:
                        return int(lite.execute("SELECT count(*) FROM ledger").fetchone()[0])
                except sqlite3.OperationalError:
                    return 0

            procs = [
                _tracker(nats_url, state, durable, database_url if on_postgres else None)
                for _ in range(replicas)
            ]
            try:
                deadline = time.monotonic() + timeout
                first = last = cpu_first = 0.0
                while time.monotonic() < deadline:
                    count = await rows()
                    now = time.monotonic()
                    if count and not first:
                        first = now
                        cpu_first = sum(_cpu_seconds(p.pid) for p in procs)
                    if count >= events:
                        last = now
                        break
                    await asyncio.sleep(0.02)
                if not last:
                    raise RuntimeError(f"{config}: the backlog was not drained in {timeout:g} s")
                cpu = sum(_cpu_seconds(p.pid) for p in procs) - cpu_first
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    p.wait(30)
                if conn is not None:
                    await conn.close()
                await bus.js.delete_consumer(Streams.USAGE.name, durable)
    return Run(config, events / max(last - first, 1e-6), cpu / events * 1e6)


async def ledger_table(*, rounds: int, events: int, timeout: float = 300) -> str:
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="sluice-bench-nats-") as store:
        nats = EmbeddedNats.start(Path(store), log_file=Path(store) / "nats.log")
        pg = EmbeddedPostgres.start(durable=True)
        try:
            bus = await Bus.connect(nats.url, "bench-ledger")
            await bus.ensure_topology()
            try:
                for r in range(rounds):
                    order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
                    for config in order:
                        runs.append(await _one(config, bus, nats.url, pg, events, timeout))
            finally:
                await bus.close()
        finally:
            pg.stop()
            nats.stop()
    rows = []
    for config in CONFIGS:
        mine = [r for r in runs if r.config == config]
        rows.append(
            [
                config,
                f"{statistics.median(r.events_per_second for r in mine):,.0f}",
                f"{min(r.events_per_second for r in mine):,.0f}-"
                f"{max(r.events_per_second for r in mine):,.0f}",
                f"{statistics.median(r.cpu_us_per_event for r in mine):.0f}",
            ]
        )
    return (
        table(["ledger", "events/s (median)", "range", "tracker CPU µs/event"], rows)
        + f"\n({events:,} events per run, {rounds} rounds, medians)"
    )
