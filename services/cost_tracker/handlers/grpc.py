"""``sluice.cost.v1.UsageService`` over grpc.aio, thin over the ledger and the feed.

Every team's cost is an operator's view: like every RPC, it is behind the shared edge
(``sluice.grpc_edge``), which also opens each call's span from the caller's trace
context and turns the ``SluiceError``s raised here into gRPC statuses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from opentelemetry import trace
from sluice.cost.v1 import cost_pb2, cost_pb2_grpc
from sluice.errors import ErrorCode, SluiceError

from services.cost_tracker.domain.feed import CostFeed
from services.cost_tracker.domain.usage import (
    InvalidQuery,
    LedgerUnavailable,
    ReportSpec,
    UsageReader,
    summarize,
)

# Sent as initial metadata once a watcher is registered: from then on no event is
# missed, which a client that must not miss one (a test, a billing sync) can wait for.
WATCHING_METADATA_KEY = "sluice-watching"


class UsageServicer(cost_pb2_grpc.UsageServiceServicer):
    def __init__(self, ledger: UsageReader, feed: CostFeed) -> None:
        self.ledger = ledger
        self.feed = feed

    async def QueryUsage(self, request: cost_pb2.UsageQuery, context: Any) -> cost_pb2.UsageSummary:
        """Usage, cost and cache savings grouped by the query's dimensions (key and model
        when it names none), filtered by key, team, model, provider, end user, tag and
        an ``[since, until)`` range of occurrence times."""
        try:
            report = await self.ledger.report(ReportSpec.from_query(request))
        except InvalidQuery as exc:
            raise SluiceError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        except LedgerUnavailable:
            raise SluiceError(
                ErrorCode.SERVICE_UNAVAILABLE, "The cost-tracker is shutting down."
            ) from None
        trace.get_current_span().set_attribute("sluice.rows", len(report.rows))
        return summarize(report)

    async def WatchCostEvents(
        self, request: cost_pb2.WatchCostEventsRequest, context: Any
    ) -> AsyncIterator[cost_pb2.CostEvent]:
        """Every cost event recorded after the call starts (for one key when given),
        until the client cancels or the service stops."""
        trace.get_current_span().set_attribute("sluice.key_id", request.key_id)
        watcher = await self.feed.open(request.key_id)
        sent = 0
        try:
            await context.send_initial_metadata(((WATCHING_METADATA_KEY, "1"),))
            async for event in watcher:
                yield event
                sent += 1
        finally:
            watcher.close()
            trace.get_current_span().set_attributes(
                {"sluice.events_sent": sent, "sluice.dropped": watcher.dropped}
            )


def usage_service(ledger: UsageReader, feed: CostFeed) -> Callable[[grpc.aio.Server], None]:
    """Registers ``UsageService`` on a gRPC server behind the edge."""

    def register(server: grpc.aio.Server) -> None:
        cost_pb2_grpc.add_UsageServiceServicer_to_server(UsageServicer(ledger, feed), server)

    return register
