"""Spend alerts on the real NATS server, with the budgets written into the real key and
team buckets and the ledger on SQLite or PostgreSQL: each threshold of a key's and a
team's daily and monthly budgets raised once per period, spikes against the trailing
baseline, the team's webhook queued for the gateway's sender, and the once-only rule
held by two replicas at the same time and by a tracker that starts again."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import secrets
import time
from dataclasses import replace

import pytest
from sluice.bus import Bus
from sluice.cost.v1 import cost_pb2
from sluice.jobs.v1 import jobs_pb2
from sluice.keys.v1 import keys_pb2
from sluice.tenancy.v1 import tenancy_pb2
from sluice.topology import Buckets, Consumers, Streams, Subjects

from services.cost_tracker.adapters.alerts import team_token
from services.cost_tracker.domain.alerts import HOUR, hour_of, month_of
from tests.cost_tracker.harness import eventually, publish_usage, start_tracker, unique, usage_event
from tests.support.postgres import fresh_database

pytestmark = [pytest.mark.integration]

# sim-fast in the test price table: 0.10 USD input, 0.40 USD output per million tokens,
# so 1000 input and 500 output tokens cost 100,000 + 200,000 = 300,000 nano-USD.
COST = 300_000


async def put_key(bus: Bus, key_id: str, team_id: str, day: int = 0, month: int = 0) -> None:
    kv = await bus.kv(Buckets.API_KEYS)
    digest = hashlib.sha256(secrets.token_bytes(16)).hexdigest()
    record = keys_pb2.ApiKeyRecord(key_id=key_id, secret_sha256=digest, team_id=team_id)
    record.budgets.usd_nanos_per_day = day
    record.budgets.usd_nanos_per_month = month
    await kv.put(digest, record.SerializeToString())


async def put_team(bus: Bus, team_id: str, *, day: int = 0, month: int = 0, url: str = "") -> None:
    kv = await bus.kv(Buckets.TEAMS)
    record = tenancy_pb2.Team(team_id=team_id, name=team_id, alert_webhook_url=url)
    record.budgets.usd_nanos_per_day = day
    record.budgets.usd_nanos_per_month = month
    await kv.put(team_id, record.SerializeToString())


async def stored_alerts(bus: Bus, team_id: str) -> list[cost_pb2.SpendAlert]:
    out = []
    replay = bus.replay(Streams.ALERTS.name, Subjects.spend_alert(team_token(team_id)))
    async with contextlib.aclosing(replay) as msgs:
        async for msg in msgs:
            out.append(cost_pb2.SpendAlert.FromString(msg.data))
    return out


async def stored_webhooks(bus: Bus, alert_ids: list[str]) -> list[jobs_pb2.WebhookDelivery]:
    """The deliveries waiting on SLUICE_WEBHOOKS (a work queue: no gateway drains it
    here) for these alerts, each as many times as it is stored."""
    out = []
    for alert_id in alert_ids:
        subject = Subjects.webhook(alert_id)
        info = await bus.js.stream_info(Streams.WEBHOOKS.name, subjects_filter=subject)
        count = (info.state.subjects or {}).get(subject, 0)
        last = await bus.last_message(Streams.WEBHOOKS.name, subject)
        if last is not None:
            out.extend([jobs_pb2.WebhookDelivery.FromString(last)] * count)
    return out


def own_spec(key: str):
    """A durable of the test's own that reads one key's usage."""
    return replace(
        Consumers.COST_USAGE, durable=unique("cost-alerts"), filter_subject=Subjects.usage(key)
    )


async def known(tracker, key: str, team: str) -> bool:
    d = tracker.tracker.directory
    return d.key_budgets(key) is not None and d.team(team) is not None


async def test_budget_thresholds_are_raised_once_per_period_with_the_team_webhook(
    bus: Bus, tmp_path
) -> None:
    key, team = unique("key"), unique("team")
    url = "https://hooks.example.com/sluice"
    # Key: 1,000,000 per day (3.33 events), team: 3,000,000 per month (10 events).
    await put_key(bus, key, team, day=1_000_000)
    await put_team(bus, team, month=3_000_000, url=url)
    running = await start_tracker(bus, tmp_path, consumer_spec=own_spec(key))
    try:
        await eventually(lambda: known(running, key, team))
        for _ in range(2):  # 600,000: the key's 50 %
            await publish_usage(bus, usage_event(key, team_id=team))
        await eventually(lambda: _count(bus, team, 1))
        for _ in range(3):  # 1,500,000: the key's 80 and 100 %, the team's 50 %
            await publish_usage(bus, usage_event(key, team_id=team))
        await eventually(lambda: _count(bus, team, 4))
        for _ in range(5):  # 3,000,000: the team's 80 and 100 %
            await publish_usage(bus, usage_event(key, team_id=team))
        await eventually(lambda: _count(bus, team, 6))
        # More spend past every threshold raises nothing new.
        for _ in range(3):
            await publish_usage(bus, usage_event(key, team_id=team))
        await eventually(lambda: _recorded(running, key, 13))
        await asyncio.sleep(0.5)
        alerts = await stored_alerts(bus, team)
    finally:
        await running.stop()
    seen = sorted((a.scope, a.period, a.threshold_percent) for a in alerts)
    assert seen == [
        ("key", "day", 50),
        ("key", "day", 80),
        ("key", "day", 100),
        ("team", "month", 50),
        ("team", "month", 80),
        ("team", "month", 100),
    ]
    assert len({a.alert_id for a in alerts}) == 6
    key_100 = next(a for a in alerts if a.scope == "key" and a.threshold_percent == 100)
    assert key_100.key_id == key and key_100.team_id == team
    assert key_100.budget_usd_nanos == 1_000_000 and key_100.spend_usd_nanos >= 1_000_000
    assert key_100.period_start_unix == hour_of(time.time_ns()) // 86_400 * 86_400
    team_80 = next(a for a in alerts if a.scope == "team" and a.threshold_percent == 80)
    assert (
        team_80.key_id == "" and team_80.period_start_unix == month_of(hour_of(time.time_ns()))[0]
    )
    # Each alert queued once for the team's webhook, with its Standard Webhooks body.
    webhooks = await stored_webhooks(bus, [a.alert_id for a in alerts])
    assert sorted(w.webhook_id for w in webhooks) == sorted(a.alert_id for a in alerts)
    assert {(w.url, w.team_id, w.job_id, w.event_type) for w in webhooks} == {
        (url, team, "", "spend.budget")
    }


async def _count(bus: Bus, team: str, n: int) -> bool:
    return len(await stored_alerts(bus, team)) >= n


async def _recorded(running, key: str, n: int) -> bool:
    from services.cost_tracker.domain.usage import UsageFilter

    return len(await running.tracker.ledger.entries(UsageFilter(key_id=key))) == n


async def test_a_spike_is_the_hour_against_the_24_before(bus: Bus, tmp_path) -> None:
    """A key's trailing day at 300,000 an hour, then an hour at over three times that:
    one spike alert for that hour, none for the steady hours, and no webhook without a
    URL."""
    key, team = unique("key"), unique("team")
    await put_key(bus, key, team)
    await put_team(bus, team)
    running = await start_tracker(
        bus, tmp_path, consumer_spec=own_spec(key), spike_factor=3.0, spike_min_usd="0.0005"
    )
    try:
        await eventually(lambda: known(running, key, team))
        now_hour = hour_of(time.time_ns())
        for back in range(24, 0, -1):  # one event an hour, the 24 hours before
            at = (now_hour - back * HOUR) * 1_000_000_000 + 1
            await publish_usage(bus, usage_event(key, team_id=team, occurred_unix_nanos=at))
        await eventually(lambda: _recorded(running, key, 24))
        for _ in range(3):  # 900,000 this hour: three times the baseline, not above
            await publish_usage(bus, usage_event(key, team_id=team))
        await eventually(lambda: _recorded(running, key, 27))
        assert await stored_alerts(bus, team) == []
        await publish_usage(bus, usage_event(key, team_id=team))  # 1,200,000: above
        await eventually(lambda: _count(bus, team, 1))
        await publish_usage(bus, usage_event(key, team_id=team))
        await eventually(lambda: _recorded(running, key, 29))
        await asyncio.sleep(0.5)
        alerts = await stored_alerts(bus, team)
    finally:
        await running.stop()
    (spike,) = alerts
    assert (spike.kind, spike.scope, spike.key_id, spike.period) == ("spike", "key", key, "hour")
    assert spike.period_start_unix == now_hour
    assert spike.spend_usd_nanos == 4 * COST and spike.baseline_usd_nanos == COST
    assert spike.spike_factor == 3.0
    assert await stored_webhooks(bus, [spike.alert_id]) == []


async def test_two_replicas_on_postgres_raise_each_alert_once_and_a_restart_none_again(
    bus: Bus, tmp_path, postgres
) -> None:
    """Two trackers sharing one durable and one PostgreSQL ledger race through the same
    thresholds: each alert is stored once. Then the alert stream is emptied (as it is
    after its duplicate window), and a new tracker sees the same usage again: the
    ledger's record of the alerts keeps them from being raised a second time."""
    key, team = unique("key"), unique("team")
    await put_key(bus, key, team, day=3_000_000)
    await put_team(bus, team, day=6_000_000)
    spec = own_spec(key)
    for sub in ("r0", "r1", "again"):
        (tmp_path / sub).mkdir()
    async with fresh_database(postgres.url) as url:
        trackers = [
            await start_tracker(bus, tmp_path / f"r{i}", consumer_spec=spec, database_url=url)
            for i in range(2)
        ]
        try:
            for t in trackers:
                await eventually(functools.partial(known, t, key, team))
            await asyncio.gather(
                *(publish_usage(bus, usage_event(key, team_id=team)) for _ in range(30))
            )
            await eventually(lambda: _recorded(trackers[0], key, 30))
            await eventually(lambda: _count(bus, team, 6))
            await asyncio.sleep(0.5)
            alerts = await stored_alerts(bus, team)
        finally:
            for t in trackers:
                await t.stop()
        assert sorted((a.scope, a.threshold_percent) for a in alerts) == [
            ("key", 50),
            ("key", 80),
            ("key", 100),
            ("team", 50),
            ("team", 80),
            ("team", 100),
        ]
        raised = sum(t.tracker.watch.raised for t in trackers if t.tracker.watch)
        assert raised >= 6  # each at least once; the stream kept one of each

        await bus.js.purge_stream(
            Streams.ALERTS.name, subject=Subjects.spend_alert(team_token(team))
        )
        again = await start_tracker(
            bus,
            tmp_path / "again",
            consumer_spec=replace(spec, durable=unique("cost-again")),
            database_url=url,
        )
        try:
            await eventually(lambda: known(again, key, team))
            await eventually(lambda: _again_settled(bus, again))
            await asyncio.sleep(0.5)
            assert again.tracker.watch is not None and again.tracker.watch.raised == 0
            assert await stored_alerts(bus, team) == []
        finally:
            await again.stop()


async def _again_settled(bus: Bus, running) -> bool:
    consumer = running.tracker.consumer
    info = await bus.js.consumer_info(Streams.USAGE.name, consumer.spec.durable)
    return bool(info.ack_floor.stream_seq) and info.num_pending + info.num_ack_pending == 0
