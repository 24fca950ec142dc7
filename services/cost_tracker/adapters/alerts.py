"""Spend alerts out: the event on ``SLUICE_ALERTS`` (``sluice.v1.alert.spend.<team>``)
and, for a team with an alert webhook URL, a ``WebhookDelivery`` on ``SLUICE_WEBHOOKS``
that the gateway's webhook sender signs (Standard Webhooks, the team's secret), checks
against its SSRF rules at connection time and retries on its schedule. Both are
JetStream publishes with ``Nats-Msg-Id`` = the alert id, so an alert raised twice (two
replicas, a redelivered batch) is stored once."""

from __future__ import annotations

import hashlib
import re
import time

from sluice.bus import Bus
from sluice.cost.v1 import cost_pb2
from sluice.jobs.v1 import jobs_pb2
from sluice.topology import PREFIX, Subjects

from services.cost_tracker.domain.alerts import BUDGET_EVENT, SPIKE_EVENT

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")


def team_token(team_id: str) -> str:
    """The team's id as one subject token: itself when it is letters, digits, - and _,
    else ``t`` and the first 32 hex digits of its SHA-256."""
    if _TOKEN.fullmatch(team_id):
        return team_id
    return "t" + hashlib.sha256(team_id.encode()).hexdigest()[:32]


class NatsAlertSink:
    def __init__(self, bus: Bus, timeout: float = 5.0) -> None:
        self._bus = bus
        self._timeout = timeout

    async def emit(self, alert: cost_pb2.SpendAlert, webhook_url: str, payload: bytes) -> None:
        await self._bus.publish_durable(
            Subjects.spend_alert(team_token(alert.team_id)),
            alert,
            msg_id=alert.alert_id,
            timeout=self._timeout,
            span_name=f"{PREFIX}.alert.spend",
        )
        if not webhook_url:
            return
        delivery = jobs_pb2.WebhookDelivery(
            webhook_id=alert.alert_id,
            team_id=alert.team_id,
            url=webhook_url,
            event_type=BUDGET_EVENT if alert.kind == "budget" else SPIKE_EVENT,
            payload=payload,
            created_unix_ms=time.time_ns() // 1_000_000,
        )
        await self._bus.publish_durable(
            Subjects.webhook(alert.alert_id),
            delivery,
            msg_id=alert.alert_id,
            timeout=self._timeout,
            span_name=f"{PREFIX}.webhook",
        )
