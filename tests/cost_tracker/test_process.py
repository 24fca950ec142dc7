"""The cost-tracker as a real process: ``python -m services.cost_tracker`` (and
``--rebuild``), started the way the launcher and the end-to-end suite start it."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import urllib.request

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sluice.cost.v1 import cost_pb2, cost_pb2_grpc
from sluice.pricing import PriceTable
from sluice.topology import ServiceName

from services.cost_tracker.adapters.ledger import SqliteLedger
from services.cost_tracker.adapters.postgres import PostgresLedger
from services.cost_tracker.domain.usage import Dimension, ReportSpec, UsageFilter
from tests.cost_tracker.harness import REPO_CONFIG, eventually, publish_usage, unique, usage_event
from tests.support.postgres import PostgresServer
from tests.support.stack import REPO, Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def rows_for(path, key: str) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT request_id, total_cost_nanos FROM ledger WHERE key_id = ? "
            "ORDER BY occurred_unix_nanos",
            (key,),
        ).fetchall()


async def test_process_serves_health_queries_and_stops_cleanly(nats_server, bus, tmp_path):
    stack = Stack(nats_server.url, tmp_path)
    proc = stack.start(ServiceName.COST_TRACKER)
    try:
        await stack.wait_ready([ServiceName.COST_TRACKER], timeout=60)
        key = unique("key")
        # Shipped prices: the process reads <config_dir>/prices.yaml.
        table = PriceTable.load(REPO_CONFIG / "prices.yaml")
        model = next(iter(table.prices))
        events = [
            usage_event(key, model=model, input_tokens=1000 * n, output_tokens=100 * n)
            for n in (1, 2)
        ]
        for event in events:
            await publish_usage(bus, event)

        async with grpc.aio.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
            # Health answers without a token (probes send none); every team's cost does not.
            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(
                health_pb2.HealthCheckRequest(service="sluice.cost.v1.UsageService")
            )
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await cost_pb2_grpc.UsageServiceStub(channel).QueryUsage(cost_pb2.UsageQuery())
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        async with stack.grpc_channel(ServiceName.COST_TRACKER) as channel:
            stub = cost_pb2_grpc.UsageServiceStub(channel)

            async def both_recorded():
                summary = await stub.QueryUsage(cost_pb2.UsageQuery(key_id=key))
                return summary if summary.requests == 2 else None

            summary = await eventually(both_recorded, timeout=20)
        expected = sum(table.price(model, e.usage).total_usd for e in events)
        assert summary.total_cost_usd == pytest.approx(float(expected))
        ledger = tmp_path / "ledger.sqlite3"
        assert [r[0] for r in rows_for(ledger, key)] == [e.request_id for e in events]
        metrics = await asyncio.to_thread(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5)
                .read()
                .decode()
            )
        )
        cost_lines = [
            line
            for line in metrics.splitlines()
            if line.startswith("sluice_cost") and f'key_id="{key}"' in line
        ]
        assert len(cost_lines) == 1, metrics[-2000:]
        assert f'model="{model}"' in cost_lines[0]
        assert float(cost_lines[0].rsplit(" ", 1)[1]) == pytest.approx(float(expected))
    finally:
        code = proc.stop()
    assert code == 0, proc.log()[-3000:]
    assert "cost-tracker stopped" in proc.log()
    # Spans were flushed on shutdown, into the state dir that `sluice trace` reads.
    spans = (tmp_path / "spans" / "cost-tracker.jsonl").read_text(encoding="utf-8")
    assert events[0].request_id in spans


async def test_rebuild_command_recreates_the_ledger_and_exits(nats_server, bus, tmp_path):
    key = unique("key")
    events = [usage_event(key), usage_event(key, cache_hit=True)]
    for event in events:
        await publish_usage(bus, event)
    ledger = tmp_path / "ledger.sqlite3"
    env = Stack(nats_server.url, tmp_path).env_for(ServiceName.COST_TRACKER, 0, 0, None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cost_tracker",
        "--rebuild",
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()[-3000:]
    assert "ledger rebuilt" in out.decode()
    rows = rows_for(ledger, key)
    assert [r[0] for r in rows] == [e.request_id for e in events]
    assert rows[1][1] == 0  # the cache hit


PASSWORD = "s3cret-not-to-be-logged"


def with_password(url: str, server: PostgresServer) -> str:
    """The URL with a password in it, when the server is the suite's own (trust
    authentication ignores it), to show that no log line repeats it."""
    if server.embedded is None:
        return url
    return url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


async def _rebuild(env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cost_tracker",
        "--rebuild",
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode()
    assert proc.returncode == 0, text[-3000:]
    assert "ledger rebuilt" in text
    return text


async def test_rebuild_gives_the_same_totals_on_both_backends(
    nats_server, bus, tmp_path, database_url, postgres
):
    """`--rebuild` into the SQLite file and into PostgreSQL (twice there: a rebuild
    replaces what the first made, and the spend alerts already raised stay): the same
    rows, the same exact totals, grouped any way, as pricing the events by hand."""
    keys = [unique("key"), unique("key")]
    table = PriceTable.load(REPO_CONFIG / "prices.yaml")
    model = next(iter(table.prices))
    events = [
        usage_event(keys[0], model=model, input_tokens=1234, output_tokens=567, cached=200),
        usage_event(keys[0], model=model, cache_hit=True),
        usage_event(keys[1], model=model, input_tokens=7, output_tokens=9, outcome="failed"),
        usage_event(keys[1], model="no-such-model"),
    ]
    events[0].tags.extend(["batch", "eval"])
    events[2].end_user = "user-7"
    events[1].cache_saved_usd_nanos = 4242
    for event in events:
        await publish_usage(bus, event)
    # Republished under another message id: still one row.
    await publish_usage(bus, events[0], msg_id=events[0].request_id + "-again")
    env = Stack(nats_server.url, tmp_path).env_for(ServiceName.COST_TRACKER, 0, 0, None)
    await _rebuild(env)
    pg_env = {**env, "SLUICE_COST_DATABASE_URL": with_password(database_url, postgres)}
    await _rebuild(pg_env)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO spend_alerts VALUES ('kept', 'budget', 'key', 'k', 't', 'day', 0, 50, "
            "1, 2, 3)"
        )
    finally:
        await conn.close()
    out = await _rebuild(pg_env)
    assert PASSWORD not in out

    sqlite_ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    pg_ledger = PostgresLedger(database_url)
    reports = []
    for led in (sqlite_ledger, pg_ledger):
        await led.open()
        try:
            for dims in ((Dimension.KEY, Dimension.MODEL), (Dimension.TAG, Dimension.DAY)):
                report = await led.report(ReportSpec.of(UsageFilter(key_id=keys[0]), dims))
                other = await led.report(ReportSpec.of(UsageFilter(key_id=keys[1]), dims))
                reports.append((report.rows, report.totals, other.rows, other.totals))
            rows = [e for k in keys for e in await led.entries(UsageFilter(key_id=k))]
            assert sorted(r.request_id for r in rows) == sorted(e.request_id for e in events)
        finally:
            await led.close()
    assert reports[:2] == reports[2:]
    expected = sum(
        table.price(e.model_served, e.usage).total_nanos
        for e in events
        if not e.cache_hit and e.model_served in table.prices
    )
    (_, totals_0, _, totals_1) = reports[0]
    assert totals_0.cost_nanos + totals_1.cost_nanos == expected
    assert totals_0.saved_nanos == 4242
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM spend_alerts") == 1
    finally:
        await conn.close()


async def test_sigint_is_graceful_too(nats_server, tmp_path):
    stack = Stack(nats_server.url, tmp_path)
    proc = stack.start(ServiceName.COST_TRACKER)
    try:
        await stack.wait_ready([ServiceName.COST_TRACKER], timeout=60)
        proc.signal(signal.SIGINT)
        code = await asyncio.to_thread(proc.process.wait, 30)
        assert code == 0, proc.log()[-3000:]
    finally:
        proc.stop()
