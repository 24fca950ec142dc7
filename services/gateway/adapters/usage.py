"""The cost-tracker's ledger as the gateway reads it: ``sluice.v1.cost.usage``, NATS
request/reply to the cost-trackers' queue group (why NATS and not gRPC:
``services/cost_tracker/handlers/nats.py``)."""

from __future__ import annotations

import logging

from sluice.bus import NATS_FAILURES, Bus
from sluice.cost.v1 import cost_pb2
from sluice.errors import SluiceError
from sluice.topology import Subjects

from services.gateway.domain.problems import unavailable

log = logging.getLogger(__name__)


class UsageClient:
    def __init__(self, bus: Bus, timeout: float) -> None:
        self._bus = bus
        self._timeout = timeout

    async def query(self, query: cost_pb2.UsageQuery) -> cost_pb2.UsageSummary:
        try:
            reply = await self._bus.request(
                Subjects.COST_USAGE_QUERY,
                query,
                cost_pb2.UsageQueryReply,
                timeout=self._timeout,
            )
        except NATS_FAILURES as exc:
            log.warning("usage query failed: %s", type(exc).__name__)
            raise unavailable("The cost-tracker did not answer.") from None
        if reply.HasField("problem") and reply.problem.code:
            raise SluiceError.from_proto(reply.problem)
        return reply.summary
