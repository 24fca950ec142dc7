"""The limiter on NATS: each served partition's reserve and commit subjects
(request/reply, answered by the partition's owner alone) and the usage feed.

**The usage feed** is an ephemeral consumer on ``SLUICE_USAGE`` that every replica runs
from the position it started at: each replica sees every usage event in stream order
and applies those of the partitions it serves (``Replica.on_usage``). No acks and no
durable: where a partition stands in the stream is part of its snapshot
(its usage mark), so a replica that takes a partition over reads the events it lacks
from there, and nothing depends on which replica saw what. (Before partitions the
limiter settled usage from a durable consumer shared by its replicas, which hands each
event to one of them: with partitions, that one need not own the event's partition.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from sluice import telemetry
from sluice.bus import NATS_FAILURES, Bus
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
    """Every usage event from the stream position given, to ``Replica.on_usage``, in
    stream order. The replica serving the event's partition settles it in a CONSUMER
    span continued from the event's headers (the request's trace reaches the limiter);
    the others skip it without one.

    An ephemeral pull consumer without acks, fetched in batches: after a batch smaller
    than ``batch`` the feed waits ``window`` seconds, so that events are handled many
    per wake-up rather than one (the limiter's CPU per request is mostly per wake-up).
    A reservation is settled up to that much later and holds what it reserved until
    then: the safe side. Should the consumer's sequence skip (a lost batch) or the
    consumer go (the server removes an idle one), the feed starts a new one after the
    last event it handled.
    """

    def __init__(
        self,
        bus: Bus,
        replica: Replica,
        *,
        batch: int = 256,
        window: float = 0.25,
        fetch_timeout: float = 1.0,
    ) -> None:
        self.bus = bus
        self.replica = replica
        self.batch = batch
        self.window = window
        self.fetch_timeout = fetch_timeout
        self._tracer = trace.get_tracer("sluice.limiter")
        self._name = f"{Subjects.USAGE_ALL} process"
        self._next = 1
        self._task: asyncio.Task[None] | None = None
        self.restarts = 0

    async def start(self, after: int) -> None:
        self._next = after + 1
        sub = await self._subscribe()
        self._task = asyncio.create_task(self._run(sub), name="limiter-usage-feed")

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        return await self.bus.pull_ephemeral(
            Streams.USAGE.name, Subjects.USAGE_ALL, start_sequence=self._next
        )

    async def _run(self, sub: JetStreamContext.PullSubscription) -> None:
        consumer_seq = 0
        while True:
            try:
                msgs = await sub.fetch(self.batch, timeout=self.fetch_timeout)
            except NatsTimeoutError:
                msgs = []
            except NATS_FAILURES:
                log.warning("usage feed fetch failed; starting over", exc_info=True)
                sub, consumer_seq = await self._restart(sub), 0
                continue
            for msg in msgs:
                meta = msg.metadata
                if consumer_seq and meta.sequence.consumer != consumer_seq + 1:
                    break  # a skipped delivery: start over after the last one handled
                consumer_seq = meta.sequence.consumer
                self._handle(msg, meta.sequence.stream)
                self._next = meta.sequence.stream + 1
            else:
                if len(msgs) < self.batch and self.window:
                    await asyncio.sleep(self.window)
                continue
            log.warning("usage feed skipped a delivery; starting over at %d", self._next)
            sub, consumer_seq = await self._restart(sub), 0

    async def _restart(
        self, sub: JetStreamContext.PullSubscription
    ) -> JetStreamContext.PullSubscription:
        self.restarts += 1
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        while True:
            try:
                return await self._subscribe()
            except NATS_FAILURES:
                await asyncio.sleep(1.0)

    def _handle(self, msg: Msg, sequence: int) -> None:
        event = cost_pb2.UsageEvent()
        try:
            event.ParseFromString(msg.data)
        except Exception:  # an undecodable event counts for nobody
            log.warning("undecodable usage event skipped")
            return
        if not self.replica.serves(event):
            self.replica.on_usage(sequence, event)
            return
        with self._tracer.start_as_current_span(
            self._name,
            context=telemetry.extract(msg.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                **telemetry.messaging_attributes(msg.subject, "process"),
                "sluice.key_id": event.key_id,
                "sluice.request_id": event.request_id,
            },
        ):
            self.replica.on_usage(sequence, event)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
