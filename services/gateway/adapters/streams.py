"""Request streams on NATS: events are core publishes on ``sluice.v1.stream.<id>``,
captured by ``SLUICE_STREAMS`` for replay; a cancel is a core publish every worker
hears."""

from __future__ import annotations

import contextlib
import logging

from nats.aio.subscription import Subscription
from sluice.bus import NATS_FAILURES, Bus
from sluice.errors import ErrorCode
from sluice.inference.v1 import inference_pb2
from sluice.replay import decode_event, read_events
from sluice.topology import Streams, Subjects

from services.gateway.domain.problems import GatewayError, unavailable
from services.gateway.domain.relay.inbox import Inbox

log = logging.getLogger(__name__)


class LiveSubscription(Inbox):
    """A request's live events (``LiveEvents``): the inbox of one core subscription."""

    def __init__(self, bus: Bus) -> None:
        super().__init__()
        self._bus = bus
        self._sub: Subscription | None = None

    async def subscribe(self, subject: str) -> LiveSubscription:
        # Each event straight into the inbox from the NATS read loop (Bus.subscribe_data).
        self._sub = await self._bus.subscribe_data(subject, self.put)
        return self

    async def close(self) -> None:
        if self._sub is not None:
            await self._bus.unsubscribe(self._sub)


def _bus_down() -> GatewayError:
    return GatewayError(
        ErrorCode.SERVICE_UNAVAILABLE, "The message bus is not connected.", retry_after_ms=1000
    )


class NatsStreams:
    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def open(self, opened: inference_pb2.StreamEvent) -> LiveSubscription:
        # The opened record is a plain publish that SLUICE_STREAMS captures, like every
        # other stream event, so only the work waits for a JetStream acknowledgement.
        # Published before the subscription exists, on the same connection, it is with
        # the server before the work is and is not echoed back (one message fewer). No
        # Nats-Msg-Id: it is published once, and an id would sit in the stream's
        # duplicate window in the server's memory.
        subject = Subjects.stream(opened.request_id)
        try:
            await self._bus.publish(subject, opened, traced=False)
            return await LiveSubscription(self._bus).subscribe(subject)
        except NATS_FAILURES:
            raise _bus_down() from None

    async def watch(self, request_id: str) -> LiveSubscription:
        try:
            return await LiveSubscription(self._bus).subscribe(Subjects.stream(request_id))
        except NATS_FAILURES:
            raise _bus_down() from None

    async def stored(
        self, request_id: str, *, wait_seconds: float
    ) -> list[inference_pb2.StreamEvent] | None:
        try:
            return await read_events(self._bus, request_id, wait_seconds=wait_seconds)
        except NATS_FAILURES:
            raise unavailable("The stream store did not answer.") from None

    async def last_event(self, request_id: str) -> inference_pb2.StreamEvent | None:
        data = await self._bus.last_message(Streams.STREAMS.name, Subjects.stream(request_id))
        return None if data is None else decode_event(data)

    async def cancel(self, request_id: str, reason: str) -> None:
        with contextlib.suppress(*NATS_FAILURES):
            await self._bus.publish(Subjects.cancel(request_id), reason.encode(), traced=False)
