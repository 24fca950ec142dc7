"""Spend alerts: budget thresholds and spikes, checked after each batch of usage is
committed, raised once per threshold and period.

**Budgets.** A key's daily and monthly budgets (its record's ``Budgets``) and its
team's (the team record's), in nano-USD, 0 meaning none. When the spend of the UTC day
or month that a batch's usage fell in reaches a threshold (50, 80 and 100 % by
default, ``SLUICE_COST_ALERT_THRESHOLDS``) of a budget, that threshold's alert is due:
``spend * 100 >= threshold * budget``, in integers.

**Spikes.** A key's spend in one UTC hour above N times its mean hourly spend over the
24 hours before that hour (``SLUICE_COST_SPIKE_FACTOR``, 0: off) and at least a floor
(``SLUICE_COST_SPIKE_MIN_USD``, so that a new key's first cents, against a baseline of
zero, are not a spike). One alert per key and hour.

**Once.** The check reads the state (spend per key and hour, kept by the ledger in the
transaction that records the usage), not the events, so a batch seen twice, or by two
replicas, finds the same alerts due, with the same ids (a hash of what the alert is
for). An alert already recorded in the ledger is skipped; a new one is emitted (a
JetStream publish deduplicated by its id, and the team's webhook), then recorded. Two
replicas racing to the same alert both publish it with one id, which JetStream keeps
once; a crash between emitting and recording emits it again, with the same id, when
the batch comes back. So an alert is emitted at least once and stored once.

**Failure.** When emitting fails (NATS away), ``check`` raises and the consumer naks the
batch: its rows are committed already and come back as duplicates, and the check runs
again. Nothing depends on later usage arriving (a key stopped by its budget sends
none).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any, Protocol

import orjson
from sluice.cost.v1 import cost_pb2
from sluice.pricing import nanos_to_usd

from services.cost_tracker.domain.usage import LedgerEntry

log = logging.getLogger(__name__)

HOUR = 3600
BASELINE_HOURS = 24
BUDGET_EVENT = "spend.budget"
SPIKE_EVENT = "spend.spike"


@dataclass(frozen=True)
class Budgets:
    """nano-USD per UTC day and month; 0: none."""

    per_day: int = 0
    per_month: int = 0

    @property
    def any(self) -> bool:
        return self.per_day > 0 or self.per_month > 0


@dataclass(frozen=True)
class TeamPolicy:
    budgets: Budgets
    # Standard Webhooks endpoint for the team's alerts; empty: the NATS event only.
    webhook_url: str = ""


class BudgetDirectory(Protocol):
    """The budgets on the key and team records, as last seen."""

    def key_budgets(self, key_id: str) -> Budgets | None: ...

    def team(self, team_id: str) -> TeamPolicy | None: ...


class SpendLedger(Protocol):
    async def spend_by(
        self, column: str, ids: Sequence[str], since_unix: int, until_unix: int
    ) -> dict[tuple[str, int], int]:
        """nano-USD per (id, hour start) of ``spend_hourly``, ``column`` being
        ``key_id`` or ``team_id``, for hours in ``[since, until)``."""
        ...

    async def alerts_known(self, alert_ids: Sequence[str]) -> set[str]:
        """Which of these alerts are recorded already."""
        ...

    async def save_alerts(self, alerts: Sequence[cost_pb2.SpendAlert]) -> None:
        """Record alerts (an id already there is left as it is)."""
        ...


class AlertSink(Protocol):
    async def emit(self, alert: cost_pb2.SpendAlert, webhook_url: str, payload: bytes) -> None:
        """Publish the alert event, and queue the webhook when there is a URL; raises
        when either was not accepted."""
        ...


@dataclass(frozen=True)
class AlertSettings:
    thresholds: tuple[int, ...] = (50, 80, 100)
    spike_factor: float = 3.0
    spike_min_nanos: int = 100_000_000


def hour_of(unix_nanos: int) -> int:
    return unix_nanos // 1_000_000_000 // HOUR * HOUR


def day_of(hour: int) -> int:
    return hour // 86_400 * 86_400


def month_of(hour: int) -> tuple[int, int]:
    """The UTC month holding ``hour``: its start and the next month's, unix seconds."""
    moment = datetime.fromtimestamp(hour, tz=UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    following = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return int(start.timestamp()), int(following.timestamp())


def alert_id(*parts: object) -> str:
    """Stable for what the alert is for; a subject token and a webhook id alike."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()
    return f"alert_{digest[:32]}"


def webhook_body(alert: cost_pb2.SpendAlert) -> bytes:
    """The Standard Webhooks body: ``type``, ``timestamp`` and the alert, amounts in
    nano-USD integers and exact USD strings."""
    data: dict[str, Any] = {
        "alert_id": alert.alert_id,
        "kind": alert.kind,
        "scope": alert.scope,
        "key_id": alert.key_id or None,
        "team_id": alert.team_id,
        "period": alert.period,
        "period_start": datetime.fromtimestamp(alert.period_start_unix, tz=UTC)
        .isoformat()
        .replace("+00:00", "Z"),
        "spend_usd_nanos": alert.spend_usd_nanos,
        "spend_usd": _usd(alert.spend_usd_nanos),
    }
    if alert.kind == "budget":
        data.update(
            threshold_percent=alert.threshold_percent,
            budget_usd_nanos=alert.budget_usd_nanos,
            budget_usd=_usd(alert.budget_usd_nanos),
        )
    else:
        data.update(
            baseline_usd_nanos=alert.baseline_usd_nanos,
            baseline_usd=_usd(alert.baseline_usd_nanos),
            spike_factor=alert.spike_factor,
        )
    at = datetime.fromtimestamp(alert.at_unix_nanos / 1e9, tz=UTC)
    return orjson.dumps(
        {
            "type": BUDGET_EVENT if alert.kind == "budget" else SPIKE_EVENT,
            "timestamp": at.isoformat().replace("+00:00", "Z"),
            "data": data,
        }
    )


def _usd(nanos: int) -> str:
    return format(nanos_to_usd(nanos).normalize(), "f") if nanos else "0"


@dataclass(frozen=True)
class _Due:
    alert: cost_pb2.SpendAlert
    webhook_url: str


class SpendWatch:
    """Checks a committed batch's keys and teams and raises the alerts now due."""

    def __init__(
        self,
        ledger: SpendLedger,
        directory: BudgetDirectory,
        sink: AlertSink,
        settings: AlertSettings,
    ) -> None:
        self.ledger = ledger
        self.directory = directory
        self.sink = sink
        self.settings = settings
        self.raised = 0
        # Alerts known to be recorded (this process raised or found them): skipped
        # without asking the ledger. Bounded: cleared when it grows past _KNOWN_MAX.
        self._known: set[str] = set()

    async def check(self, entries: Sequence[LedgerEntry]) -> list[cost_pb2.SpendAlert]:
        """The alerts raised for the state after ``entries`` (new or seen before)."""
        if not entries:
            return []
        due = await self._due(entries)
        fresh = [d for d in due if d.alert.alert_id not in self._known]
        if fresh:
            recorded = await self.ledger.alerts_known([d.alert.alert_id for d in fresh])
            self._remember(recorded)
            fresh = [d for d in fresh if d.alert.alert_id not in recorded]
        for d in fresh:
            await self.sink.emit(d.alert, d.webhook_url, webhook_body(d.alert))
        if fresh:
            await self.ledger.save_alerts([d.alert for d in fresh])
            self._remember({d.alert.alert_id for d in fresh})
            self.raised += len(fresh)
            for d in fresh:
                log.info(
                    "spend alert %s: %s %s %s %s",
                    d.alert.alert_id,
                    d.alert.kind,
                    d.alert.scope,
                    d.alert.key_id or d.alert.team_id,
                    d.alert.period,
                )
        return [d.alert for d in fresh]

    def _remember(self, ids: set[str]) -> None:
        if len(self._known) > _KNOWN_MAX:
            self._known.clear()
        self._known |= ids

    async def _due(self, entries: Sequence[LedgerEntry]) -> list[_Due]:
        hours_by_key: dict[str, set[int]] = {}
        team_of: dict[str, str] = {}
        hours_by_team: dict[str, set[int]] = {}
        for e in entries:
            hour = hour_of(e.occurred_unix_nanos)
            hours_by_key.setdefault(e.key_id, set()).add(hour)
            hours_by_team.setdefault(e.team_id, set()).add(hour)
            team_of[e.key_id] = e.team_id
        now = time.time_ns()
        due: list[_Due] = []
        s = self.settings

        # Budgets: the month's hourly spend of every key and team that has a budget.
        budgeted_keys = {
            k: b for k in hours_by_key if (b := self.directory.key_budgets(k)) and b.any
        }
        teams = {t: p for t in hours_by_team if (p := self.directory.team(t)) is not None}
        budgeted_teams = {t: p for t, p in teams.items() if p.budgets.any}
        for column, subjects, hours_of in (
            ("key_id", budgeted_keys, hours_by_key),
            ("team_id", {t: p.budgets for t, p in budgeted_teams.items()}, hours_by_team),
        ):
            if not subjects:
                continue
            months = {month_of(h) for i in subjects for h in hours_of[i]}
            since, until = min(m[0] for m in months), max(m[1] for m in months)
            spend = _by_id(await self.ledger.spend_by(column, sorted(subjects), since, until))
            for ident, budgets in subjects.items():
                hourly = spend.get(ident, {})
                for hour in sorted(hours_of[ident]):
                    day = day_of(hour)
                    month_start, month_end = month_of(hour)
                    day_spend = sum(v for h, v in hourly.items() if day <= h < day + 86_400)
                    month_spend = sum(v for h, v in hourly.items() if month_start <= h < month_end)
                    for period, start, amount, budget in (
                        ("day", day, day_spend, budgets.per_day),
                        ("month", month_start, month_spend, budgets.per_month),
                    ):
                        if budget <= 0:
                            continue
                        for threshold in s.thresholds:
                            if amount * 100 < threshold * budget:
                                continue
                            scope = "key" if column == "key_id" else "team"
                            team = team_of.get(ident, "") if scope == "key" else ident
                            alert = cost_pb2.SpendAlert(
                                alert_id=alert_id("budget", scope, ident, period, start, threshold),
                                kind="budget",
                                scope=scope,
                                key_id=ident if scope == "key" else "",
                                team_id=team,
                                period=period,
                                period_start_unix=start,
                                threshold_percent=threshold,
                                spend_usd_nanos=amount,
                                budget_usd_nanos=budget,
                                at_unix_nanos=now,
                            )
                            due.append(_Due(alert, self._webhook(team, teams)))

        # Spikes: every key of the batch, its hour against the 24 before.
        if s.spike_factor > 0:
            factor = Fraction(str(s.spike_factor))
            first = min(h for hs in hours_by_key.values() for h in hs)
            last = max(h for hs in hours_by_key.values() for h in hs)
            hourly_spend = await self.ledger.spend_by(
                "key_id", sorted(hours_by_key), first - BASELINE_HOURS * HOUR, last + HOUR
            )
            for key, hours in hours_by_key.items():
                for hour in sorted(hours):
                    current = hourly_spend.get((key, hour), 0)
                    trailing = sum(
                        hourly_spend.get((key, hour - i * HOUR), 0)
                        for i in range(1, BASELINE_HOURS + 1)
                    )
                    # current > factor * (trailing / 24), in exact fractions.
                    if current < s.spike_min_nanos or current * BASELINE_HOURS <= factor * trailing:
                        continue
                    team = team_of[key]
                    alert = cost_pb2.SpendAlert(
                        alert_id=alert_id("spike", "key", key, "hour", hour),
                        kind="spike",
                        scope="key",
                        key_id=key,
                        team_id=team,
                        period="hour",
                        period_start_unix=hour,
                        spend_usd_nanos=current,
                        baseline_usd_nanos=trailing // BASELINE_HOURS,
                        spike_factor=s.spike_factor,
                        at_unix_nanos=now,
                    )
                    due.append(_Due(alert, self._webhook(team, teams)))
        return due

    def _webhook(self, team_id: str, teams: dict[str, TeamPolicy]) -> str:
        policy = teams.get(team_id) or self.directory.team(team_id)
        return policy.webhook_url if policy is not None else ""


_KNOWN_MAX = 100_000


def _by_id(spend: dict[tuple[str, int], int]) -> dict[str, dict[int, int]]:
    out: dict[str, dict[int, int]] = {}
    for (ident, hour), nanos in spend.items():
        out.setdefault(ident, {})[hour] = nanos
    return out
