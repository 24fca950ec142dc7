"""The cost-tracker as a real process: ``python -m services.cost_tracker`` (and
``--rebuild``), started the way the launcher and the end-to-end suite start it."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sluice.cost.v1 import cost_pb2, cost_pb2_grpc
from sluice.pricing import PriceTable
from sluice.topology import ServiceName

from tests.cost_tracker.harness import REPO_CONFIG, eventually, publish_usage, unique, usage_event
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
