"""The limiter on NATS: each served partition's reserve and commit subjects
(request/reply, answered by the partition's owner alone) and the usage feed.

**The usage feed** is an ephemeral ordered consumer on ``SLUICE_USAGE`` that every
replica runs from the position it started at: each replica sees every usage event in
stream order and applies those of the partitions it serves (``Replica.on_usage``). No
acks and no durable: where a partition stands in the stream is part of its snapshot
(its usage mark), so a replica that takes a partition over reads the events it lacks
from there, and nothing depends on which replica saw what. (Before partitions the
limiter settled usage from a durable consumer shared by its replicas, which hands each
event to one of them: with partitions, that one need not own the event's partition.)
"""

from __future__ import annotations

import logging

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from sluice import telemetry
from sluice.bus import Bus
from sluice.cost.v1 import cost_pb2
from sluice.limiter.v1 import limiter_pb2
from sluice.topology import Streams, Subjects

from services.limiter.domain.partitions import Partition
from services.limiter.domain.replica import Replica

log = logging.getLogger(__name__)


class PartitionServer:
    """``Server``: subscribes a partition's subjects when it is served, ends them when
    it is not."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._subs: dict[int, list[Subscription]] = {}

    async def serve(self, partition: Partition) -> None:
        async def reserve(
            request: limiter_pb2.ReserveRequest, _msg: Msg
        ) -> limiter_pb2.ReserveResponse:
            return await partition.reserve(request)

        async def commit(
            request: limiter_pb2.CommitRequest, _msg: Msg
        ) -> limiter_pb2.CommitResponse:
            return await partition.commit(request)

        number = partition.number
        await self.unserve(number)
        self._subs[number] = [
            await self.bus.serve(
                Subjects.limiter_reserve(number), limiter_pb2.ReserveRequest, reserve
            ),
            await self.bus.serve(
                Subjects.limiter_commit(number), limiter_pb2.CommitRequest, commit
            ),
        ]

    async def unserve(self, number: int) -> None:
        for sub in self._subs.pop(number, []):
            try:
                await self.bus.unserve(sub)
            except Exception:  # a connection already gone has nothing left to end
                log.debug("unserve failed", exc_info=True)


class UsageFeed:
    """Every usage event from the stream position given, to ``Replica.on_usage``. The
    replica serving the event's partition settles it in a CONSUMER span continued from
    the event's headers (the request's trace reaches the limiter); the others skip it
    without one."""

    def __init__(self, bus: Bus, replica: Replica) -> None:
        self.bus = bus
        self.replica = replica
        self._sub: Subscription | None = None
        self._tracer = trace.get_tracer("sluice.limiter")

    async def start(self, after: int) -> None:
        name = f"{Subjects.USAGE_ALL} process"

        async def on_message(msg: Msg) -> None:
            event = cost_pb2.UsageEvent()
            try:
                event.ParseFromString(msg.data)
            except Exception:  # an undecodable event counts for nobody
                log.warning("undecodable usage event skipped")
                return
            sequence = msg.metadata.sequence.stream
            if not self.replica.serves(event):
                self.replica.on_usage(sequence, event)
                return
            with self._tracer.start_as_current_span(
                name,
                context=telemetry.extract(msg.headers),
                kind=SpanKind.CONSUMER,
                attributes={
                    **telemetry.messaging_attributes(msg.subject, "process"),
                    "sluice.key_id": event.key_id,
                    "sluice.request_id": event.request_id,
                },
            ):
                self.replica.on_usage(sequence, event)

        self._sub = await self.bus.follow(
            Subjects.USAGE_ALL, Streams.USAGE.name, on_message, start_sequence=after + 1
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self.bus.unsubscribe(self._sub)
            self._sub = None
