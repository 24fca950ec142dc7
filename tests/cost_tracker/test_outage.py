"""The only cost-tracker, a real process behind the whole stack, SIGKILLed under load:
requests go on being answered, ``/readyz`` says ``degraded`` naming the cost-tracker,
the usage events wait in ``SLUICE_USAGE`` for the durable ``cost-ledger``, and once a
new cost-tracker starts every request is in the ledger exactly once, its total the
provider-reported usage of the answers times the price table to the nano-dollar.

(The events the killed tracker had been delivered and not acknowledged come back after
the durable's ack wait, 30 s; those it had committed are found in the ledger and not
counted again.)"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from sluice.bus import Bus
from sluice.common.v1 import chat_pb2
from sluice.pricing import PriceTable
from sluice.topology import Consumers, ServiceName

from tests.cost_tracker.harness import REPO_CONFIG
from tests.support.full_stack import full_stack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REQUESTS = 400
CONCURRENCY = 8
KILL_AT = 100
RESTART_AT = 300


def ledger(path: Path) -> tuple[set[str], int, int]:
    """The ledger's request ids, its row count and its total (nano-USD)."""
    if not path.exists():
        return set(), 0, 0
    with sqlite3.connect(path) as conn:
        ids = {r[0] for r in conn.execute("SELECT request_id FROM ledger")}
        rows, total = conn.execute(
            "SELECT count(*), coalesce(sum(total_cost_nanos), 0) FROM ledger"
        ).fetchone()
    return ids, int(rows), int(total)


async def readiness(http: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    reply = await http.get("/readyz")
    return reply.status_code, reply.json()


async def test_only_cost_tracker_killed_usage_waits_and_is_counted_once_on_return(
    tmp_path: Path,
) -> None:
    env = {
        # Every request reaches the provider, and the limiter admits them all.
        "SLUICE_GATEWAY_CACHE_MODE": "off",
        "SLUICE_GATEWAY_READINESS_CACHE_SECONDS": "0.1",
        "SLUICE_LIMITER_DEFAULT_REQUESTS_PER_MINUTE": "1000000",
        "SLUICE_LIMITER_DEFAULT_TOKENS_PER_MINUTE": "1000000000",
    }
    async with full_stack(tmp_path, gateway_env=env) as fs, fs.client(timeout=60) as http:
        path = fs.stack.state_dir / "ledger.sqlite3"
        tracker = fs.stack.processes[ServiceName.COST_TRACKER]
        assert (await readiness(http))[1]["status"] == "ready"
        bus = await Bus.connect(fs.nats.url, "tests-cost-outage")
        try:
            answers: dict[str, dict[str, Any]] = {}
            statuses: Counter[int] = Counter()
            sent = 0
            waiting: list[int] = []
            outage_ready: list[tuple[int, dict[str, Any]]] = []

            async def pending() -> int:
                info = await bus.js.consumer_info(
                    Consumers.COST_USAGE.stream, Consumers.COST_USAGE.durable
                )
                return int(info.num_pending) + int(info.num_ack_pending)

            async def client() -> None:
                nonlocal sent, tracker
                while sent < REQUESTS:
                    sent += 1
                    n = sent
                    if n == KILL_AT:
                        tracker.signal(signal.SIGKILL)
                        killed = await asyncio.to_thread(tracker.process.wait, 10)
                        assert killed == -signal.SIGKILL
                    if n == RESTART_AT:
                        # Meanwhile: still served, degraded, the usage queued.
                        outage_ready.append(await readiness(http))
                        waiting.append(await pending())
                        tracker = fs.stack.start(ServiceName.COST_TRACKER)
                    reply = await http.post(
                        "/v1/chat/completions",
                        json={
                            "model": "sim-fast",
                            "messages": [{"role": "user", "content": f"request {n}: {n % 7}"}],
                            "max_tokens": 8 + n % 24,
                        },
                    )
                    statuses[reply.status_code] += 1
                    if reply.status_code == 200:
                        answer = reply.json()
                        answers[answer["sluice"]["request_id"]] = answer

            await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
            assert statuses == {200: REQUESTS}
            assert len(answers) == REQUESTS

            [(status, ready)] = outage_ready
            assert (status, ready["status"]) == (200, "degraded"), ready
            assert ready["services"]["cost-tracker"] is False
            assert [o["service"] for o in ready["outages"]] == ["cost-tracker"]
            assert "SLUICE_USAGE" in ready["outages"][0]["effect"]
            # The events of the requests answered while no tracker ran wait in the stream.
            assert waiting[0] >= RESTART_AT - KILL_AT - CONCURRENCY, waiting

            await fs.stack.wait_ready([ServiceName.COST_TRACKER], timeout=60)

            async def every_request_recorded() -> bool:
                return (await asyncio.to_thread(ledger, path))[1] >= REQUESTS

            await wait_for(every_request_recorded, timeout=90, interval=0.5, what="ledger")

            # Until the stream has nothing left for the durable: the events the killed
            # tracker was delivered come back after the ack wait (30 s), and those it
            # had committed are duplicates, which must not show as rows too many.
            async def drained() -> bool:
                return await pending() == 0

            await wait_for(drained, timeout=60, interval=0.5, what="the usage drained")
            ids, rows, total = ledger(path)
        finally:
            await bus.close()

        table = PriceTable.load(REPO_CONFIG / "prices.yaml")
        expected = 0
        for answer in answers.values():
            usage = answer["usage"]
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            expected += table.price(
                answer["sluice"]["model_served"],
                chat_pb2.Usage(
                    input_tokens=usage["prompt_tokens"],
                    output_tokens=usage["completion_tokens"],
                    cached_input_tokens=cached,
                ),
            ).total_nanos
        assert ids == set(answers), "every request once in the ledger, and nothing else"
        assert rows == REQUESTS
        assert total == expected > 0
        print(
            f"\n{REQUESTS} requests, cost-tracker killed at {KILL_AT}, a new one at"
            f" {RESTART_AT}: {waiting[0]} usage events waited; ledger {rows} rows,"
            f" {total} nano-USD"
        )
        await wait_for(lambda: _status_is(http, "ready"), timeout=10, what="/readyz ready again")

        # Without a worker nothing is answered: that, unlike the cost-tracker, is down.
        worker = fs.stack.processes[ServiceName.INFERENCE_WORKER]
        worker.signal(signal.SIGKILL)
        await asyncio.to_thread(worker.process.wait, 10)

        async def unready() -> tuple[int, dict[str, Any]] | None:
            found = await readiness(http)
            return found if found[0] != 200 else None

        # (Readiness answers are reused for a tenth of a second here.)
        status, down = await wait_for(unready, timeout=5, what="/readyz down")
        assert status == 503, down
        assert down["code"] == "service_unavailable"
        assert down["details"]["status"] == "down"
        assert [o["service"] for o in down["details"]["outages"]] == ["inference-worker"]
        assert "inference-worker" in down["detail"]


async def _status_is(http: httpx.AsyncClient, wanted: str) -> bool:
    return (await readiness(http))[1]["status"] == wanted
