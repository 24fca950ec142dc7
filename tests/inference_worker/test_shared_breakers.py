"""Breakers shared by real worker processes: a deployment one worker opens for slowness
is skipped by the other within a second (the sluice_breakers bucket)."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from sluice import grpc_edge
from sluice.bus import Bus
from sluice.devtools.embedded import EmbeddedNats
from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice.topology import Buckets, ServiceName

from tests.inference_worker.conftest import new_work, run
from tests.support.stack import REPO, ServiceProcess, Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONFIG = """
providers:
  sim:
    kind: openai
    base_url: {sim}
models:
  shared-route:
    chain:
      # Every call here takes a second; the bound is 0.3 s: cut, counted as slow.
      - name: shared-slow
        provider: sim
        upstream_model: sim-fast
        timeout_seconds: 0.3
        attempts: 1
        params: {{sim: {{ttft_ms: 1000}}}}
      - name: shared-ok
        provider: sim
        upstream_model: sim-fast
"""


started: list[ServiceProcess] = []


@pytest.fixture
async def stack(nats_server: EmbeddedNats, sim_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    config = tmp_path / "config"
    config.mkdir()
    (config / "providers.yaml").write_text(CONFIG.format(sim=sim_url), encoding="utf-8")
    shutil.copy(REPO / "config" / "prices.yaml", config / "prices.yaml")
    stack = Stack(
        nats_url=nats_server.url,
        state_dir=tmp_path / "state",
        extra_env={
            "SLUICE_CONFIG_DIR": str(config),
            "SLUICE_WORKER_LONG_POLL_SECONDS": "1",
            # One slow call opens the breaker, for a minute.
            "SLUICE_WORKER_CIRCUIT_FAILURE_THRESHOLD": "1",
            "SLUICE_WORKER_CIRCUIT_COOLDOWN_SECONDS": "60",
        },
    )
    try:
        yield stack
    finally:
        stack.stop_all()
        # Stack keeps one process per service name: stop the other worker too.
        for proc in started:
            if proc.process.poll() is None:
                proc.stop()


async def deployments(stack: Stack, proc: ServiceProcess) -> dict[str, inference_pb2.BreakerRecord]:
    async with grpc_edge.channel(f"127.0.0.1:{proc.grpc_port}", stack.service_token) as channel:
        health = await inference_pb2_grpc.ProviderHealthServiceStub(channel).GetProviderHealth(
            inference_pb2.ProviderHealthRequest(), timeout=2
        )
    return {d.deployment: d for d in health.deployments}


async def wait_serving(stack: Stack, proc: ServiceProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await deployments(stack, proc)
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline or proc.process.poll() is not None:
                raise RuntimeError(proc.log()[-3000:]) from None
            await asyncio.sleep(0.2)


async def test_a_breaker_opened_for_latency_by_one_worker_is_honoured_by_another(
    stack: Stack, bus: Bus
) -> None:
    kv = await bus.kv(Buckets.BREAKERS)
    # The session's server may hold a record from an earlier run of this test.
    for name in ("shared-slow", "shared-ok"):
        await kv.purge(name)
    first = stack.start(ServiceName.INFERENCE_WORKER)
    second = stack.start(ServiceName.INFERENCE_WORKER)
    started.extend((first, second))
    await asyncio.gather(wait_serving(stack, first), wait_serving(stack, second))

    result = await run(bus, new_work(model="shared-route"), timeout=15)
    assert (result.final.deployment, result.final.attempts) == ("shared-ok", 2)

    entry = await kv.get("shared-slow")
    record = inference_pb2.BreakerRecord()
    record.ParseFromString(entry.value or b"")
    assert (record.state, record.reason) == ("open", "latency")
    opener_pid = int(record.worker.split("-")[0])
    by_pid = {first.process.pid: first, second.process.pid: second}
    assert opener_pid in by_pid
    other = next(p for pid, p in by_pid.items() if pid != opener_pid)

    # The other worker holds it open (it never called the deployment itself).
    async with grpc_edge.channel(f"127.0.0.1:{other.grpc_port}", stack.service_token) as channel:
        stub = inference_pb2_grpc.ProviderHealthServiceStub(channel)
        while True:
            health = await stub.GetProviderHealth(inference_pb2.ProviderHealthRequest(), timeout=2)
            held = next((d for d in health.deployments if d.deployment == "shared-slow"), None)
            if held is not None and held.state == "open":
                seen = time.time_ns()
                break
            assert time.time_ns() - record.changed_unix_nanos < 5e9, "never honoured"
            await asyncio.sleep(0.01)
    lag = (seen - record.changed_unix_nanos) / 1e9
    print(f"honoured by the other worker {lag * 1000:.0f} ms after it opened")
    assert lag < 1.0, f"honoured {lag:.3f} s after it opened"
    assert held.open_until_unix_nanos > time.time_ns() + 50e9

    # And in its metrics: 2 is open.
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{other.metrics_port}/metrics") as resp,
    ):
        exposition = await resp.text()
    [line] = [
        x
        for x in exposition.splitlines()
        if x.startswith("sluice_breaker_state") and 'deployment="shared-slow"' in x
    ]
    assert float(line.rsplit(" ", 1)[1]) == 2.0

    # Every request now goes straight to the healthy deployment, whichever worker takes it.
    results = await asyncio.gather(
        *(run(bus, new_work(model="shared-route"), timeout=15) for _ in range(8))
    )
    assert {(r.final.deployment, r.final.attempts) for r in results} == {("shared-ok", 1)}
