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

from opentelemetry import metrics, trace
from sluice.cost.v1 import cost_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.limiter.v1 import limiter_pb2
from sluice.metrics import instruments
from sluice.topology import ServiceName

from services.limiter.domain.windows import Limiter, PolicyView, Settlement

Clock = Callable[[], int]


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
        )
        for v in views
    ]


@dataclass
class LimiterMetrics:
    """Plain counters on the hot path, read by observable instruments at collection time.

    An OpenTelemetry ``Counter.add`` costs more than the whole admission decision; an
    integer increment costs nothing, and the exporter reads the totals when it scrapes.
    """

    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)
    settlements: Counter[tuple[str, str]] = field(default_factory=Counter)

    def register(self, limiter: Limiter, meter: metrics.Meter | None = None) -> LimiterMetrics:
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

    def __init__(self, limiter: Limiter, metrics_: LimiterMetrics, clock: Clock = wall_ms) -> None:
        self.limiter = limiter
        self.metrics = metrics_
        self.clock = clock

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
        else:
            span.set_attribute("sluice.limiter.denied_by", decision.denied_by)
            span.set_attribute("sluice.limiter.retry_after_ms", decision.retry_after_ms)
            self.metrics.decisions["denied", decision.denied_by] += 1
            instruments().errors.add(
                1, {"code": str(ErrorCode.RATE_LIMITED), "service": str(ServiceName.LIMITER)}
            )
        return limiter_pb2.ReserveResponse(
            allowed=decision.allowed,
            reservation_id=decision.reservation_id,
            policies=policy_states(decision.policies),
            denied_by=decision.denied_by,
            retry_after_ms=decision.retry_after_ms,
            reserved_tokens=decision.reserved_tokens,
            lease_tokens=decision.lease_tokens,
            lease_requests=decision.lease_requests,
            lease_ttl_ms=self.limiter.config.lease_ttl_ms if decision.lease_tokens else 0,
        )

    def commit(self, request: limiter_pb2.CommitRequest) -> limiter_pb2.CommitResponse:
        if request.close_lease:
            closed = self.limiter.close_lease(
                request.reservation_id,
                request.unused_tokens,
                request.unused_requests,
                self.clock(),
            )
            self.metrics.settlements["lease_close", "settled" if closed else "unknown"] += 1
            return limiter_pb2.CommitResponse(found=closed)
        actual = request.actual.input_tokens + request.actual.output_tokens
        settlement = self._settle(request.reservation_id, actual, source="commit")
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

    def apply_usage(self, event: cost_pb2.UsageEvent) -> Settlement | None:
        """Reconcile one usage event; a cache hit spent no upstream tokens."""
        actual = 0 if event.cache_hit else event.usage.input_tokens + event.usage.output_tokens
        return self._settle(event.reservation_id, actual, source="usage")

    def _settle(self, reservation_id: str, actual: int, *, source: str) -> Settlement | None:
        settlement = (
            self.limiter.settle(reservation_id, actual, self.clock()) if reservation_id else None
        )
        span = trace.get_current_span()
        span.set_attribute("sluice.limiter.reservation_found", settlement is not None)
        if settlement is None:
            self.metrics.settlements[source, "unknown"] += 1
        else:
            span.set_attribute("sluice.limiter.delta_tokens", settlement.delta)
            self.metrics.settlements[source, "settled"] += 1
        return settlement
