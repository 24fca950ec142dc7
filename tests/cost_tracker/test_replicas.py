"""Two cost-trackers on one PostgreSQL ledger, as real processes behind the whole stack
(NATS, the simulated provider, gateway, limiter, cache, worker): 2,000 chat requests
while one tracker is SIGKILLed and started again. Every request is one ledger row, and
the ledger's total is the provider-reported usage of the answers times the price
table, to the nano-dollar.

What makes it exact is the ledger's unique request id (``adapters.postgres``): the
killed tracker's delivered, unacknowledged events come back (to either tracker) after
the durable's ack wait, and those it had committed before dying are found there and
not counted again.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import subprocess
import sys
import time
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sluice.devtools.embedded import EmbeddedNats, free_port, wait_for_port
from sluice.pricing import PriceTable
from sluice.topology import ALL_SERVICES, ServiceName

from tests.cost_tracker.harness import REPO_CONFIG, eventually
from tests.support.stack import REPO, ServiceProcess, Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEV_KEY = "sk-sluice-replicas-test-key-0123456789"
REQUESTS = 2000
CONCURRENCY = 24
KILL_AFTER = 500
RESTART_AFTER = 1100


async def serving(proc: ServiceProcess) -> bool:
    """The process's own gRPC health (NATS health would be answered by either replica)."""
    if proc.process.poll() is not None:
        raise AssertionError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1
            )
    except grpc.aio.AioRpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_two_trackers_one_killed_count_every_request_once_to_the_nano_dollar(
    tmp_path, database_url
):
    sim_port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "sluice.devtools.cli", "simulator", "--port", str(sim_port)],
        cwd=REPO,
        stdout=(tmp_path / "simulator.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    nats = EmbeddedNats.start(tmp_path / "nats", log_file=tmp_path / "nats.log")
    stack = Stack(
        nats.url,
        tmp_path / "state",
        {
            "SLUICE_SIMULATOR_URL": f"http://127.0.0.1:{sim_port}/v1",
            "SLUICE_DEV_API_KEY": DEV_KEY,
            "SLUICE_COST_DATABASE_URL": database_url,
            # Every request reaches the provider, and the limiter admits them all.
            "SLUICE_GATEWAY_CACHE_MODE": "off",
            "SLUICE_LIMITER_DEFAULT_REQUESTS_PER_MINUTE": "1000000",
            "SLUICE_LIMITER_DEFAULT_TOKENS_PER_MINUTE": "1000000000",
        },
    )
    trackers: list[ServiceProcess] = []
    try:
        wait_for_port("127.0.0.1", sim_port, 20, sim)
        for name in ALL_SERVICES:
            process = stack.start(name)
            if name is ServiceName.COST_TRACKER:
                trackers.append(process)
        trackers.append(stack.start(ServiceName.COST_TRACKER))
        await stack.wait_ready(list(ALL_SERVICES), timeout=90)
        for tracker in trackers:
            await eventually(functools.partial(serving, tracker), timeout=60)
        gateway = stack.processes[ServiceName.GATEWAY]

        answers: dict[str, dict[str, Any]] = {}
        sent = 0
        victim = trackers[0]

        async def client(http: httpx.AsyncClient) -> None:
            nonlocal sent, victim
            while sent < REQUESTS:
                sent += 1
                n = sent
                if n == KILL_AFTER:
                    victim.process.send_signal(signal.SIGKILL)
                if n == RESTART_AFTER:
                    assert victim.process.wait(10) == -signal.SIGKILL
                    victim = stack.start(ServiceName.COST_TRACKER)
                    trackers.append(victim)
                reply = await http.post(
                    "/v1/chat/completions",
                    json={
                        "model": "sim-fast",
                        "messages": [{"role": "user", "content": f"request {n}: count to {n % 7}"}],
                        "max_tokens": 8 + n % 24,
                    },
                )
                assert reply.status_code == 200, reply.text
                body = reply.json()
                answers[body["sluice"]["request_id"]] = body

        started = time.monotonic()
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{gateway.http_port}",
            headers={"Authorization": f"Bearer {DEV_KEY}"},
            timeout=60,
        ) as http:
            await asyncio.gather(*(client(http) for _ in range(CONCURRENCY)))
        elapsed = time.monotonic() - started
        assert len(answers) == REQUESTS
        await eventually(functools.partial(serving, victim), timeout=60)

        table = PriceTable.load(REPO_CONFIG / "prices.yaml")
        expected = 0
        for body in answers.values():
            usage = body["usage"]
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            priced = table.price(
                body["sluice"]["model_served"],
                _usage(usage["prompt_tokens"], usage["completion_tokens"], cached),
            )
            expected += priced.total_nanos

        conn = await asyncpg.connect(database_url)
        try:

            async def all_recorded() -> bool:
                count = await conn.fetchval("SELECT count(*) FROM ledger")
                return count >= REQUESTS

            # The killed tracker's unacked events come back after the ack wait (30 s).
            await eventually(all_recorded, timeout=90, interval=0.5)
            # A little longer: a late duplicate would show as a 2,001st row.
            await asyncio.sleep(1)
            ids = {r[0] for r in await conn.fetch("SELECT request_id FROM ledger")}
            total = await conn.fetchval("SELECT sum(total_cost_nanos) FROM ledger")
            hourly = await conn.fetchval("SELECT sum(cost_nanos) FROM spend_hourly")
        finally:
            await conn.close()
        assert ids == set(answers), "every request once in the ledger, and nothing else"
        assert int(total) == expected
        assert int(hourly) == expected
        assert expected > 0
        # The killed one died while the others went on; its successor took its share.
        assert "cost-tracker recording into" in victim.log()
        print(f"{REQUESTS} requests in {elapsed:.1f}s, ledger total {int(total)} nano-USD")
    finally:
        for tracker in trackers:
            tracker.stop()
        stack.stop_all()
        nats.stop()
        sim.terminate()
        sim.wait(10)


def _usage(prompt: int, completion: int, cached: int):
    from sluice.common.v1 import chat_pb2

    return chat_pb2.Usage(input_tokens=prompt, output_tokens=completion, cached_input_tokens=cached)
