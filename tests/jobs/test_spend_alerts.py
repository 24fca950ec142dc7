"""A team's spend alerts reach its alert_webhook_url through the gateway's webhook sender,
on the whole product: the cost-tracker sees the team's daily budget crossed by real
chat requests and queues one delivery per threshold; the gateway signs each with the
team's secret (Standard Webhooks), retries the one its receiver failed, and keeps no
job log for them (they belong to no job)."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from typing import Any

import pytest
from sluice.bus import Bus
from sluice.common.v1 import chat_pb2
from sluice.keys.v1 import keys_pb2
from sluice.pricing import PriceTable
from sluice.tenancy.v1 import tenancy_pb2
from sluice.topology import Buckets

from tests.jobs.test_jobs import Receiver, chat
from tests.support.full_stack import FullStack, wait_for
from tests.support.stack import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRICES = PriceTable.load(REPO / "config" / "prices.yaml")


async def write_records(
    stack: FullStack, secret: str, team_id: str, *, budget: int = 0, url: str = ""
) -> None:
    bus = await Bus.connect(stack.nats.url, "tests-spend-alerts")
    try:
        digest = hashlib.sha256(secret.encode()).hexdigest()
        key = keys_pb2.ApiKeyRecord(
            key_id="k-" + team_id,
            secret_sha256=digest,
            team_id=team_id,
            scopes=["chat", "jobs"],
            created_unix=int(time.time()),
        )
        await (await bus.kv(Buckets.API_KEYS)).put(digest, key.SerializeToString())
        team = tenancy_pb2.Team(team_id=team_id, name=team_id, alert_webhook_url=url)
        team.budgets.usd_nanos_per_day = budget
        await (await bus.kv(Buckets.TEAMS)).put(team_id, team.SerializeToString())
    finally:
        await bus.close()


def cost_of(answer: dict[str, Any]) -> int:
    usage = answer["usage"]
    return PRICES.price(
        "sim-fast",
        chat_pb2.Usage(
            input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"]
        ),
    ).total_nanos


async def test_budget_alerts_are_signed_webhooks_to_the_team(jobs_stack: FullStack) -> None:
    team = "alerts-" + secrets.token_hex(4)
    secret = "sk-sluice-alerts-" + secrets.token_hex(12)
    await write_records(jobs_stack, secret, team)
    async with jobs_stack.client(secret) as client:
        signing = (await client.get("/v1/webhooks/secret")).json()["secret"]
        async with Receiver(signing, fail_first=1) as receiver:
            first = await client.post("/v1/chat/completions", json=chat(output_tokens=8))
            assert first.status_code == 200, first.text
            # A daily budget of just over three such requests, with the webhook URL.
            budget = 3 * cost_of(first.json()) + 1
            await write_records(jobs_stack, secret, team, budget=budget, url=receiver.url)
            await asyncio.sleep(0.5)  # the cost-tracker follows the team bucket
            spent = cost_of(first.json())
            while spent < budget:
                reply = await client.post("/v1/chat/completions", json=chat(output_tokens=8))
                assert reply.status_code == 200, reply.text
                spent += cost_of(reply.json())

            async def all_delivered() -> set[str] | None:
                ok = {
                    c["headers"]["webhook-id"]
                    for i, c in enumerate(receiver.calls)
                    if i >= receiver.fail_first
                }
                return ok if len(ok) >= 3 else None

            delivered = await wait_for(all_delivered, timeout=30, what="three alert webhooks")
            await asyncio.sleep(1)  # a fourth would show up meanwhile
    payloads = {c["headers"]["webhook-id"]: c["payload"] for c in receiver.calls}
    assert set(payloads) == delivered, "the failed attempt was retried, with the same id"
    assert len(receiver.calls) == 4
    assert {p["type"] for p in payloads.values()} == {"spend.budget"}
    data = sorted((p["data"] for p in payloads.values()), key=lambda d: d["threshold_percent"])
    assert [d["threshold_percent"] for d in data] == [50, 80, 100]
    assert {(d["scope"], d["team_id"], d["period"]) for d in data} == {("team", team, "day")}
    assert all(d["budget_usd_nanos"] == budget for d in data)
    assert data[-1]["spend_usd_nanos"] >= budget
    assert {d["alert_id"] for d in data} == delivered
