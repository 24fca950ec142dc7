"""The real limiter process SIGKILLed under load: a team whose tier fails open keeps
being served within the gateway's local allowance, one whose tier fails closed gets 503
``limiter_unavailable``; when a limiter is back it counts what was admitted meanwhile
from the usage stream, so the team's limit holds with the outage's requests in it."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.errors import Error as NatsError
from sluice.bus import Bus
from sluice.devtools.embedded import EmbeddedNats
from sluice.limiter.v1 import limiter_pb2
from sluice.partitions import partition_of
from sluice.topology import ServiceName, Subjects

from tests.support.stack import REPO, ServiceProcess, Stack, simulator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADMIN_KEY = "sk-sluice-admin-failopen-0123456789abcdef"
DEV_KEY = "sk-sluice-dev-failopen-0123456789abcdef"
TIERS = """
default_tier: closed
tiers:
  open:
    limiter_failure: fail_open
    team:
      limits:
        requests_per_minute: 100
  closed:
    limiter_failure: fail_closed
    team:
      limits:
        requests_per_minute: 100
"""


async def team_key(http: httpx.AsyncClient, team: str, tier: str) -> str:
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    made = await http.post("/v1/admin/teams", json={"team_id": team, "tier": tier}, headers=auth)
    assert made.status_code == 201, made.text
    key = await http.post("/v1/admin/keys", json={"team_id": team, "name": "k"}, headers=auth)
    assert key.status_code == 201, key.text
    return str(key.json()["secret"])


async def chat(http: httpx.AsyncClient, secret: str, n: int) -> tuple[int, dict[str, Any]]:
    reply = await http.post(
        "/v1/chat/completions",
        json={
            "model": "sim-fast",
            "messages": [{"role": "user", "content": f"say {n}"}],
            "max_tokens": 4,
        },
        headers={"authorization": f"Bearer {secret}"},
    )
    return reply.status_code, (reply.json() if reply.status_code != 200 else {})


# What the open key's leases still held when the limiter was killed: a lease of 1 + 99 // 8
# requests, of which the first ten requests took ten; with three left (a quarter or less)
# the gateway asked for the next ahead, granted 1 + 1/8 of the 86 then left.
FIRST_LEASE = 1 + 99 // 8
LEASED_LEFT = FIRST_LEASE - 10 + 1 + (100 - FIRST_LEASE - 1) // 8


async def served(bus: Bus, team: str, timeout: float = 30) -> None:
    """Until the team's partition has an owner that answers (a key of the team without
    levels: it counts nothing for the team)."""
    ask = limiter_pb2.ReserveRequest(team_id=team, key_id="probe", input_tokens=1)
    subject = Subjects.limiter_reserve(partition_of(team, ""))
    deadline = time.monotonic() + timeout
    while True:
        try:
            await bus.request(subject, ask, limiter_pb2.ReserveResponse, timeout=0.5)
            return
        except (TimeoutError, NatsError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_limiter_killed_under_load_fails_open_or_closed_by_tier_and_reconciles(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config"
    shutil.copytree(REPO / "config", config)
    (config / "tiers.yaml").write_text(TIERS)
    nats = EmbeddedNats.start(tmp_path / "nats", log_file=tmp_path / "nats.log")
    processes: list[ServiceProcess] = []
    bus = await Bus.connect(nats.url, "tests-fail-open")
    try:
        with simulator(tmp_path / "simulator.log") as sim_url:
            stack = Stack(
                nats.url,
                tmp_path / "state",
                {
                    "SLUICE_CONFIG_DIR": str(config),
                    "SLUICE_SIMULATOR_URL": sim_url,
                    "SLUICE_ADMIN_API_KEY": ADMIN_KEY,
                    "SLUICE_DEV_API_KEY": DEV_KEY,
                    "SLUICE_GATEWAY_CACHE_MODE": "off",
                    "SLUICE_GATEWAY_LIMITER_WAIT_SECONDS": "0.5",
                    "SLUICE_GATEWAY_FAIL_OPEN_SHARE": "0.2",
                    "SLUICE_LIMITER_SNAPSHOT_INTERVAL_SECONDS": "0.5",
                },
            )
            limiter = stack.start(ServiceName.LIMITER)
            processes += [
                limiter,
                stack.start(ServiceName.GATEWAY),
                stack.start(ServiceName.INFERENCE_WORKER),
            ]
            await stack.wait_ready(
                [ServiceName.LIMITER, ServiceName.GATEWAY, ServiceName.INFERENCE_WORKER],
                timeout=120,
            )
            url = f"http://127.0.0.1:{processes[1].http_port}"
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                opened = await team_key(http, "opn", "open")
                closed = await team_key(http, "cls", "closed")
                await served(bus, "opn")
                await served(bus, "cls")
                first = await asyncio.gather(
                    *(chat(http, opened, n) for n in range(10)),
                    *(chat(http, closed, n) for n in range(10)),
                )
                assert Counter(s for s, _ in first) == {200: 20}
                await asyncio.sleep(0.3)  # the leases asked for ahead arrive

                limiter.signal(signal.SIGKILL)
                assert await asyncio.to_thread(limiter.process.wait, 10) == -signal.SIGKILL

                async def paced(secret: str, n: int) -> tuple[int, dict[str, Any]]:
                    await asyncio.sleep(n * 0.02)
                    return await chat(http, secret, n)

                during_open = await asyncio.gather(*(paced(opened, n) for n in range(40)))
                during_closed = await asyncio.gather(*(paced(closed, n) for n in range(20)))
                # The open key's first ten were admitted from one lease of 13 requests
                # (the first, and 1/8 of the 99 then left), and the next was granted
                # ahead: what both hold was counted at the grant, so it is admitted until
                # they expire, limiter or not.
                # Then fail open: this gateway's allowance is 0.2 of the team's 100/min.
                opened_counts = Counter(s for s, _ in during_open)
                print(f"\nlimiter down: fail_open {dict(opened_counts)}")
                assert opened_counts == {200: LEASED_LEFT + 20, 429: 20 - LEASED_LEFT}
                # The key inherits its team's limit: either level may be the one named.
                assert {p["details"]["policy"] for s, p in during_open if s == 429} <= {
                    "fail_open.team.requests_per_minute",
                    "fail_open.key.requests_per_minute",
                }
                # Fail closed, past what its own lease still held (it may have expired).
                closed_counts = Counter(s for s, _ in during_closed)
                assert closed_counts[200] <= LEASED_LEFT and closed_counts[503] >= 6
                assert all(p["code"] == "limiter_unavailable" for s, p in during_closed if s != 200)

                # Still serving a tier: degraded (200), not down, and it says for whom.
                # (This stack runs no cache and no cost-tracker: named too, as degraded.)
                ready = await http.get("/readyz")
                assert ready.status_code == 200, ready.text
                report = ready.json()
                assert report["status"] == "degraded" and report["services"]["limiter"] is False
                effects = {o["service"]: o["effect"] for o in report["outages"]}
                assert set(effects) == {"limiter", "cache", "cost-tracker"}
                assert "fail_open tiers (open)" in effects["limiter"]

                # A limiter again: it takes the partitions once the killed one's leases
                # lapse, and counts the 20 requests admitted without it.
                processes.append(stack.start(ServiceName.LIMITER))
                await served(bus, "opn")
                await asyncio.sleep(0.5)  # the last usage events of the outage
                after = await asyncio.gather(*(chat(http, opened, n) for n in range(100)))
                statuses = Counter(s for s, _ in after)
                used = 10 + LEASED_LEFT + 20
                print(f"limiter back: {dict(statuses)} (limit 100, {used} already used)")
                assert statuses == {200: 100 - used, 429: used}
                refused = {p["details"]["policy"] for s, p in after if s == 429}
                assert refused <= {"team.requests_per_minute", "key.requests_per_minute"}
    finally:
        for process in processes:
            if process.process.poll() is None:
                process.stop()
        await bus.close()
        nats.stop()
