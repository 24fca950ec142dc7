"""Cost events on NATS: ``sluice.v1.cost.recorded.<key_id>``, for every subscriber (the
feeds of every cost-tracker replica, billing, alerting)."""

from __future__ import annotations

from sluice.bus import Bus
from sluice.cost.v1 import cost_pb2
from sluice.topology import Subjects


class NatsCostEvents:
    """``CostEventSink`` over the bus: a core publish with the current trace context."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def publish(self, event: cost_pb2.CostEvent) -> None:
        await self._bus.publish(Subjects.cost_recorded(event.key_id), event)
