"""``sluice.cost.v1.UsageService`` over grpc.aio: a thin layer on the ledger and the feed.

Incoming calls continue the caller's trace from the ``traceparent`` metadata when there
is one. Domain errors become gRPC status codes in one place (``_status_for``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from sluice import telemetry
from sluice.cost.v1 import cost_pb2, cost_pb2_grpc

from services.cost_tracker.domain import InvalidQuery, UsageFilter, summarize
from services.cost_tracker.feed import CostFeed
from services.cost_tracker.ledger import Ledger, LedgerClosedError

log = logging.getLogger(__name__)

SERVICE = "sluice.cost.v1.UsageService"
# Sent as initial metadata once a watcher is registered: from then on no event is
# missed, which a client that must not miss one (a test, a billing sync) can wait for.
WATCHING_METADATA_KEY = "sluice-watching"


def _status_for(exc: Exception) -> tuple[Any, str] | None:
    if isinstance(exc, InvalidQuery):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, LedgerClosedError):
        return grpc.StatusCode.UNAVAILABLE, "cost-tracker is shutting down"
    return None


def _parent_context(context: Any) -> Any:
    metadata = context.invocation_metadata() or ()
    carrier = {k: v for k, v in metadata if isinstance(v, str)}
    return telemetry.extract(carrier)


class UsageServicer(cost_pb2_grpc.UsageServiceServicer):
    def __init__(self, ledger: Ledger, feed: CostFeed, tracer: trace.Tracer | None = None) -> None:
        self.ledger = ledger
        self.feed = feed
        self._tracer = tracer or trace.get_tracer("sluice.cost_tracker")

    async def QueryUsage(self, request: cost_pb2.UsageQuery, context: Any) -> cost_pb2.UsageSummary:
        """Usage and cost grouped by key and model, filtered by key, team, model and an
        ``[since, until)`` range of occurrence times."""
        with self._tracer.start_as_current_span(
            f"{SERVICE}/QueryUsage",
            context=_parent_context(context),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": "QueryUsage"},
        ) as span:
            try:
                rows = await self.ledger.totals(UsageFilter.from_query(request))
            except Exception as exc:
                mapped = _status_for(exc)
                if mapped is None:
                    raise
                span.set_status(Status(StatusCode.ERROR, mapped[1]))
                await context.abort(*mapped)
                raise  # abort raises; this keeps type checkers and readers sure of it
            span.set_attribute("sluice.rows", len(rows))
            return summarize(rows)

    async def WatchCostEvents(
        self, request: cost_pb2.WatchCostEventsRequest, context: Any
    ) -> AsyncIterator[cost_pb2.CostEvent]:
        """Every cost event recorded after the call starts (for one key when given),
        until the client cancels or the service stops."""
        # A plain (not current) span: the stream outlives many event loop turns and
        # must not leave its context attached when the generator is closed elsewhere.
        span = self._tracer.start_span(
            f"{SERVICE}/WatchCostEvents",
            context=_parent_context(context),
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": SERVICE,
                "rpc.method": "WatchCostEvents",
                "sluice.key_id": request.key_id,
            },
        )
        watcher = await self.feed.open(request.key_id)
        sent = 0
        try:
            await context.send_initial_metadata(((WATCHING_METADATA_KEY, "1"),))
            async for event in watcher:
                yield event
                sent += 1
        finally:
            watcher.close()
            span.set_attributes({"sluice.events_sent": sent, "sluice.dropped": watcher.dropped})
            span.end()
