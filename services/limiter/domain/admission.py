"""Admission as the contracts state it: a ``ReserveRequest`` in, a ``ReserveResponse``
out, and the same for commits, usage events and quota queries, over one in-memory
``Limiter``. Both transports call it: the NATS handlers (reserve, commit, the usage
consumer) and the gRPC ``QuotaService``. The decisions' attributes go on the caller's
current span, and plain counters feed the metrics.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry import metrics, trace
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.limiter.v1 import limiter_pb2
from sluice.metrics import instruments
from sluice.pricing import PriceTable
from sluice.tenancy.v1 import tenancy_pb2
from sluice.topology import PriorityClass, ServiceName

from services.limiter.domain.windows import (
    LEASE,
    Level,
    LevelLimits,
    Limiter,
    PolicyView,
    Pricer,
    Settlement,
    end_user_scope,
    team_scope,
)

Clock = Callable[[], int]


class OpenCount(Protocol):
    """What the open-reservations gauge reads (a ``Limiter``, or a replica's sum)."""

    @property
    def open_reservations(self) -> int: ...


def wall_ms() -> int:
    """Wall-clock milliseconds: windows must mean the same thing after a restart."""
    return time.time_ns() // 1_000_000


def policy_states(views: Iterable[PolicyView]) -> list[limiter_pb2.PolicyState]:
    return [
        limiter_pb2.PolicyState(
            name=v.name,
            quota=v.quota,
            remaining=v.remaining,
            window_seconds=v.window_seconds,
            reset_ms=v.reset_ms,
            unit=v.unit,
        )
        for v in views
    ]


def _level_limits(limits: tenancy_pb2.Limits, budgets: tenancy_pb2.Budgets) -> LevelLimits:
    return LevelLimits(
        requests_per_minute=limits.requests_per_minute,
        input_tokens_per_minute=limits.input_tokens_per_minute,
        output_tokens_per_minute=limits.output_tokens_per_minute,
        concurrent_requests=limits.concurrent_requests,
        usd_nanos_per_day=budgets.usd_nanos_per_day,
        usd_nanos_per_month=budgets.usd_nanos_per_month,
    )


def levels_of(request: limiter_pb2.ReserveRequest) -> tuple[Level, ...]:
    """The levels a reservation sets: the key's, its team's and its end user's (an end
    user is one of its team's, or of the key's when the key has no team)."""
    levels = []
    key = _level_limits(request.key_limits, request.key_budgets)
    if key.any:
        levels.append(Level("key", request.key_id, key))
    if request.team_id:
        team = _level_limits(request.team_limits, request.team_budgets)
        if team.any:
            levels.append(Level("team", team_scope(request.team_id), team))
    if request.end_user:
        user = _level_limits(request.end_user_limits, request.end_user_budgets)
        if user.any:
            owner = request.team_id or request.key_id
            levels.append(Level("end_user", end_user_scope(owner, request.end_user), user))
    return tuple(levels)


def usage_scopes(event: cost_pb2.UsageEvent) -> tuple[str, ...]:
    """The scopes beyond the key that a request of this usage event was counted in."""
    scopes = []
    if event.team_id:
        scopes.append(team_scope(event.team_id))
    if event.end_user:
        scopes.append(end_user_scope(event.team_id or event.key_id, event.end_user))
    return tuple(scopes)


class Prices:
    """The price table as the limiter uses it: nano-USD of a model's tokens."""

    def __init__(self, table: PriceTable | None) -> None:
        self.table = table

    def pricer(self, model: str) -> Pricer | None:
        table = self.table
        if table is None or table.price_for(model) is None:
            return None

        def price(input_tokens: int, output_tokens: int) -> int:
            usage = chat_pb2.Usage(input_tokens=input_tokens, output_tokens=output_tokens)
            return table.price(model, usage).total_nanos

        return price

    def cost(self, event: cost_pb2.UsageEvent) -> int:
        """What a usage event costs, as the cost-tracker's ledger prices it."""
        if event.cache_hit or self.table is None:
            return 0
        model = event.model_served or event.model_requested
        if self.table.price_for(model) is None:
            return 0
        return self.table.price(model, event.usage).total_nanos


@dataclass
class LimiterMetrics:
    """Plain counters on the hot path, read by observable instruments at collection time.

    An OpenTelemetry ``Counter.add`` costs more than the whole admission decision; an
    integer increment costs nothing, and the exporter reads the totals when it scrapes.
    """

    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)
    settlements: Counter[tuple[str, str]] = field(default_factory=Counter)

    def register(self, limiter: OpenCount, meter: metrics.Meter | None = None) -> LimiterMetrics:
        meter = meter or metrics.get_meter("sluice.limiter")

        def observe_open(_options: metrics.CallbackOptions) -> list[metrics.Observation]:
            return [metrics.Observation(limiter.open_reservations)]

        def observe_decisions(_options: metrics.CallbackOptions) -> list[metrics.Observation]:
            return [
                metrics.Observation(
                    n, {"result": result, "policy": policy} if policy else {"result": result}
                )
                for (result, policy), n in list(self.decisions.items())
            ]

        def observe_settlements(_options: metrics.CallbackOptions) -> list[metrics.Observation]:
            return [
                metrics.Observation(n, {"source": source, "result": result})
                for (source, result), n in list(self.settlements.items())
            ]

        meter.create_observable_gauge(
            "sluice.limiter.reservations.open",
            callbacks=[observe_open],
            unit="{reservation}",
            description="Reservations waiting for their usage",
        )
        meter.create_observable_counter(
            "sluice.limiter.decisions",
            callbacks=[observe_decisions],
            unit="{decision}",
            description="Admission decisions by result and refusing policy",
        )
        meter.create_observable_counter(
            "sluice.limiter.settlements",
            callbacks=[observe_settlements],
            unit="{settlement}",
            description="Reservations settled, or not found, by source",
        )
        return self


class Admission:
    """Reserve, commit, usage and quota of one in-memory ``Limiter``, in proto terms.
    Synchronous: nothing here waits, so the NATS handlers answer on the event loop."""

    def __init__(
        self,
        limiter: Limiter,
        metrics_: LimiterMetrics,
        clock: Clock = wall_ms,
        *,
        prices: Prices | None = None,
        batch_share: float = 1.0,
    ) -> None:
        self.limiter = limiter
        self.metrics = metrics_
        self.clock = clock
        self.prices = prices or Prices(None)
        self.batch_share = batch_share

    def reserve(self, request: limiter_pb2.ReserveRequest) -> limiter_pb2.ReserveResponse:
        decision = self.limiter.reserve(
            request.key_id,
            input_tokens=request.input_tokens,
            max_output_tokens=request.max_output_tokens,
            now_ms=self.clock(),
            request_id=request.request_id,
            tokens_per_minute=request.tokens_per_minute,
            requests_per_minute=request.requests_per_minute,
            lease_tokens=request.lease_tokens,
            lease_requests=request.lease_requests,
            levels=levels_of(request),
            share=self._share(request),
            output_estimated=request.output_estimated,
            price=self.prices.pricer(request.model),
            lease_only=request.lease_only,
        )
        span = trace.get_current_span()
        span.set_attribute("sluice.key_id", request.key_id)
        span.set_attribute("sluice.limiter.allowed", decision.allowed)
        if decision.allowed:
            span.set_attribute("sluice.limiter.reserved_tokens", decision.reserved_tokens)
            if decision.lease_tokens:
                span.set_attribute("sluice.limiter.lease_tokens", decision.lease_tokens)
                span.set_attribute("sluice.limiter.lease_requests", decision.lease_requests)
            self.metrics.decisions["allowed", ""] += 1
        elif decision.denied_by == LEASE:
            # A holder's lease asked ahead found no room for one: not a refused request.
            span.set_attribute("sluice.limiter.denied_by", LEASE)
            self.metrics.decisions["no_lease", ""] += 1
        else:
            span.set_attribute("sluice.limiter.denied_by", decision.denied_by)
            span.set_attribute("sluice.limiter.retry_after_ms", decision.retry_after_ms)
            self.metrics.decisions["denied", decision.denied_by] += 1
            code = ErrorCode.BUDGET_EXCEEDED if decision.budget_exceeded else ErrorCode.RATE_LIMITED
            instruments().errors.add(1, {"code": str(code), "service": str(ServiceName.LIMITER)})
        return limiter_pb2.ReserveResponse(
            allowed=decision.allowed,
            reservation_id=decision.reservation_id,
            policies=policy_states(decision.policies),
            denied_by=decision.denied_by,
            retry_after_ms=decision.retry_after_ms,
            reserved_tokens=decision.reserved_tokens,
            lease_tokens=decision.lease_tokens,
            lease_requests=decision.lease_requests,
            lease_input_tokens=decision.lease_input_tokens,
            lease_output_tokens=decision.lease_output_tokens,
            lease_ttl_ms=self.limiter.config.lease_ttl_ms if decision.lease_tokens else 0,
            budget_exceeded=decision.budget_exceeded,
            spend_ceiling_usd_nanos=decision.spend_ceiling_nanos,
            reserved_usd_nanos=decision.reserved_cost_nanos,
            reserved_output_tokens=decision.reserved_output_tokens,
        )

    def _share(self, request: limiter_pb2.ReserveRequest) -> float:
        """Batch work: the tier's share of each limit, else the configured one."""
        if request.priority != PriorityClass.BATCH:
            return 1.0
        if 0 < request.batch_share <= 1:
            return request.batch_share
        return self.batch_share

    def commit(self, request: limiter_pb2.CommitRequest) -> limiter_pb2.CommitResponse:
        if request.close_lease:
            closed = self.limiter.close_lease(
                request.reservation_id,
                request.unused_tokens,
                request.unused_requests,
                self.clock(),
                unused_input_tokens=request.unused_input_tokens,
                unused_output_tokens=request.unused_output_tokens,
            )
            self.metrics.settlements["lease_close", "settled" if closed else "unknown"] += 1
            return limiter_pb2.CommitResponse(found=closed)
        settlement = self._settle(
            request.reservation_id,
            request.actual.input_tokens,
            request.actual.output_tokens,
            0,
            source="commit",
        )
        trace.get_current_span().set_attribute("sluice.key_id", request.key_id)
        return limiter_pb2.CommitResponse(found=settlement is not None)

    def quota(self, request: limiter_pb2.GetQuotaRequest) -> limiter_pb2.GetQuotaResponse:
        """Current TPM and RPM state of one key and its open reservations."""
        if not request.key_id:
            raise SluiceError(ErrorCode.INVALID_REQUEST, "key_id is required", param="key_id")
        trace.get_current_span().set_attribute("sluice.key_id", request.key_id)
        view = self.limiter.quota(request.key_id, self.clock())
        return limiter_pb2.GetQuotaResponse(
            key_id=view.key_id,
            policies=policy_states(view.policies),
            open_reservations=view.open_reservations,
        )

    def apply_usage(
        self, event: cost_pb2.UsageEvent, *, charge_unknown: bool = False
    ) -> Settlement | None:
        """Reconcile one usage event: its reservation is replaced by what the request
        used and cost (a cache hit spent no upstream tokens). With ``charge_unknown`` a
        request this state holds no reservation of is counted as spent now (its
        reservation was made by an owner whose record of it did not reach here)."""
        if event.cache_hit:
            input_tokens = output_tokens = cost = 0
        else:
            input_tokens, output_tokens = event.usage.input_tokens, event.usage.output_tokens
            cost = self.prices.cost(event)
        settlement = self._settle(
            event.reservation_id,
            input_tokens,
            output_tokens,
            cost,
            source="usage",
            learn=event.outcome == "completed" and not event.cache_hit,
        )
        if (
            settlement is None
            and charge_unknown
            and event.reservation_id
            and not self.limiter.holds(event.reservation_id)
            and not self.limiter.forgotten(event.reservation_id)
        ):
            at = event.occurred_unix_nanos // 1_000_000 or self.clock()
            self.limiter.charge_unreserved(
                event.key_id,
                usage_scopes(event),
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cost_nanos=cost,
                now_ms=min(at, self.clock()),
            )
        return settlement

    def _settle(
        self,
        reservation_id: str,
        input_tokens: int,
        output_tokens: int,
        cost: int,
        *,
        source: str,
        learn: bool = False,
    ) -> Settlement | None:
        settlement = (
            self.limiter.settle(
                reservation_id,
                input_tokens + output_tokens,
                self.clock(),
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cost_nanos=cost,
                learn=learn,
            )
            if reservation_id
            else None
        )
        span = trace.get_current_span()
        span.set_attribute("sluice.limiter.reservation_found", settlement is not None)
        if settlement is None:
            self.metrics.settlements[source, "unknown"] += 1
        else:
            span.set_attribute("sluice.limiter.delta_tokens", settlement.delta)
            self.metrics.settlements[source, "settled"] += 1
        return settlement
