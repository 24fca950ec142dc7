"""Three limiter replicas and two gateways as real processes on their own NATS (with the
simulated provider and a worker behind): one limit holds across all of them, and a
SIGKILLed limiter's partitions are taken over by the others with their state rebuilt
from JetStream (the partition's snapshot, its journal, the usage stream), not reset.

Figures (takeover time, overshoot) are printed; run with ``-s`` to read them.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.errors import Error as NatsError
from nats.js.errors import NoKeysError
from sluice.bus import Bus
from sluice.devtools.embedded import EmbeddedNats
from sluice.limiter.v1 import limiter_pb2
from sluice.partitions import partition_of
from sluice.topology import LIMITER_PARTITIONS, Buckets, ServiceName, Subjects

from tests.support.stack import ServiceProcess, Stack, simulator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADMIN_KEY = "sk-sluice-admin-replicas-0123456789abcdef"
DEV_KEY = "sk-sluice-dev-replicas-0123456789abcdef"
REPLICAS = 3
CONCURRENT = 300


async def owners(bus: Bus) -> dict[int, str]:
    kv = await bus.kv(Buckets.LIMITER_OWNERS)
    try:
        keys = [k for k in await kv.keys() if k.startswith("p.")]
    except NoKeysError:
        return {}
    out = {}
    for key in keys:
        entry = await kv.get(key)
        if entry.value:
            out[int(key.removeprefix("p."))] = entry.value.decode()
    return out


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.1)


async def admin(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = await http.post(path, json=body, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert reply.status_code == 201, reply.text
    result: dict[str, Any] = reply.json()
    return result


async def team_key(http: httpx.AsyncClient, team: str, rpm: int) -> str:
    await admin(
        http,
        "/v1/admin/teams",
        {"team_id": team, "tier": "enterprise", "limits": {"requests_per_minute": rpm}},
    )
    key = await admin(http, "/v1/admin/keys", {"team_id": team, "name": "load"})
    return str(key["secret"])


async def chat(
    gateways: list[httpx.AsyncClient], n: int, secret: str
) -> tuple[int, dict[str, Any] | None, float]:
    """One request through one of the gateways: (status, problem, seconds)."""
    started = time.monotonic()
    reply = await gateways[n % len(gateways)].post(
        "/v1/chat/completions",
        json={
            "model": "sim-fast",
            "messages": [{"role": "user", "content": f"say {n}"}],
            "max_tokens": 4,
        },
        headers={"authorization": f"Bearer {secret}"},
    )
    problem = reply.json() if reply.status_code != 200 else None
    return reply.status_code, problem, time.monotonic() - started


async def test_one_limit_across_replicas_and_a_killed_limiters_partitions_taken_over(
    tmp_path: Path,
) -> None:
    nats = EmbeddedNats.start(tmp_path / "nats", log_file=tmp_path / "nats.log")
    processes: list[ServiceProcess] = []
    clients: list[httpx.AsyncClient] = []
    bus = await Bus.connect(nats.url, "tests-replicas")
    try:
        with simulator(tmp_path / "simulator.log") as sim_url:
            stack = Stack(
                nats.url,
                tmp_path / "state",
                {
                    "SLUICE_SIMULATOR_URL": sim_url,
                    "SLUICE_ADMIN_API_KEY": ADMIN_KEY,
                    "SLUICE_DEV_API_KEY": DEV_KEY,
                    "SLUICE_GATEWAY_CACHE_MODE": "off",
                    "SLUICE_LIMITER_SNAPSHOT_INTERVAL_SECONDS": "0.5",
                },
            )
            limiters = {
                f"lim-{i}": stack.start(ServiceName.LIMITER, env={"SLUICE_INSTANCE_ID": f"lim-{i}"})
                for i in range(REPLICAS)
            }
            processes.extend(limiters.values())
            gateways = [stack.start(ServiceName.GATEWAY) for _ in range(2)]
            processes.extend(gateways)
            processes.append(stack.start(ServiceName.INFERENCE_WORKER))
            await stack.wait_ready(
                [ServiceName.LIMITER, ServiceName.GATEWAY, ServiceName.INFERENCE_WORKER],
                timeout=120,
            )

            async def spread() -> bool:
                held = await owners(bus)
                return len(held) == LIMITER_PARTITIONS and set(held.values()) == set(limiters)

            await until(spread, 30, "partitions not spread over the three limiters")
            urls = [f"http://127.0.0.1:{g.http_port}" for g in gateways]
            async with httpx.AsyncClient(base_url=urls[0], timeout=30) as http:
                for url in urls:  # each gateway serves before the load starts
                    await until(lambda url=url: _models_ok(url), 60, f"gateway {url} not serving")
                acme = await team_key(http, "acme", rpm=100)
                beta = await team_key(http, "beta", rpm=200)
            limits = httpx.Limits(max_connections=CONCURRENT, max_keepalive_connections=CONCURRENT)
            for url in urls:
                clients.append(httpx.AsyncClient(base_url=url, timeout=30, limits=limits))

            # --- one key, 300 at once, through both gateways ------------------------
            results = await asyncio.gather(*(chat(clients, n, acme) for n in range(CONCURRENT)))
            statuses = Counter(status for status, _, _ in results)
            admitted = statuses[200]
            overshoot = admitted - 100
            print(f"\n300 concurrent over one key, limit 100/min: {dict(statuses)}")
            print(f"overshoot: {overshoot} (bound: one reservation per replica, {REPLICAS})")
            assert set(statuses) <= {200, 429}, statuses
            assert 0 <= overshoot <= REPLICAS
            refusals = [p for s, p, _ in results if s == 429]
            assert refusals and all(p and p["code"] == "rate_limited" for p in refusals)
            assert {p["details"]["policy"] for p in refusals if p} <= {
                "key.requests_per_minute",
                "team.requests_per_minute",
            }

            # --- SIGKILL the owner of a key's partition under load ------------------
            partition = partition_of("beta", "")
            victim_id = (await owners(bus))[partition]
            victim = limiters[victim_id]
            before = await asyncio.gather(*(chat(clients, n, beta) for n in range(80)))
            assert Counter(s for s, _, _ in before) == {200: 80}

            async def probe() -> float:
                """Seconds from the kill until the partition's subject is answered again
                (a reservation of another key of the team, whose own quota is untouched)."""
                subject = Subjects.limiter_reserve(partition)
                ask = limiter_pb2.ReserveRequest(team_id="beta", key_id="probe", input_tokens=1)
                while True:
                    try:
                        reply = await bus.request(
                            subject, ask, limiter_pb2.ReserveResponse, timeout=0.25
                        )
                        if reply.allowed:
                            return time.monotonic() - killed_at
                    except (TimeoutError, NatsError):
                        pass
                    await asyncio.sleep(0.02)

            killed_at = time.monotonic()
            victim.signal(signal.SIGKILL)
            takeover = asyncio.create_task(probe())

            async def load(n: int) -> tuple[int, dict[str, Any] | None, float]:
                await asyncio.sleep(n * 0.02)  # 300 requests over 6 s
                status, problem, _ = await chat(clients, n, beta)
                return status, problem, time.monotonic() - killed_at

            after = await asyncio.gather(*(load(n) for n in range(CONCURRENT)))
            assert victim.process.wait(10) == -signal.SIGKILL
            took = await asyncio.wait_for(takeover, 30)
            print(f"partition {partition} served again {took:.2f} s after the SIGKILL")
            statuses = Counter(s for s, _, _ in after)
            taken_over_in = min(done for _, _, done in after)
            new_owner = (await owners(bus)).get(partition)
            print(f"killed {victim_id}; partition {partition} now owned by {new_owner}")
            print(f"first HTTP answer {taken_over_in:.2f} s after the kill: {dict(statuses)}")
            # No 503: every request waited for the partition's new owner (at most the
            # gateway's 5 s), which had rebuilt the 80 requests already admitted.
            assert set(statuses) <= {200, 429}, statuses
            assert new_owner in set(limiters) - {victim_id}
            admitted_total = 80 + statuses[200]
            print(f"admitted over the kill: {admitted_total} of a limit of 200")
            assert 200 - REPLICAS <= admitted_total <= 200 + REPLICAS
    finally:
        for client in clients:
            await client.aclose()
        for process in processes:
            if process.process.poll() is None:
                process.stop()
        await bus.close()
        nats.stop()


async def _models_ok(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            reply = await http.get(
                f"{url}/v1/models", headers={"authorization": f"Bearer {DEV_KEY}"}
            )
    except httpx.HTTPError:
        return False
    return reply.status_code == 200
