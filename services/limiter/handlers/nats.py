"""The limiter on NATS: reserve and commit (request/reply, queue group ``limiter``) and
the ``SLUICE_USAGE`` consumer that settles reservations with actual usage.

The consumer fetches batches from its durable, settles each event inside a CONSUMER
span continued from the event's headers, and acks it after applying it: a redelivery (a
lost ack) finds the reservation already settled and changes nothing. An undecodable
event can never be applied and is terminated. After a batch smaller than ``batch``, it
lingers ``window`` seconds so that usage is settled in batches, not one fetch per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from sluice import telemetry
from sluice.bus import Bus, linger
from sluice.cost.v1 import cost_pb2
from sluice.limiter.v1 import limiter_pb2
from sluice.topology import ConsumerSpec, Subjects

from services.limiter.domain.admission import Admission

log = logging.getLogger(__name__)

QUEUE = "limiter"


class AdmissionHandlers:
    """``Bus.serve`` handlers: proto in, ``Admission`` call, proto out."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    async def reserve(
        self, request: limiter_pb2.ReserveRequest, _msg: Msg
    ) -> limiter_pb2.ReserveResponse:
        return self.admission.reserve(request)

    async def commit(
        self, request: limiter_pb2.CommitRequest, _msg: Msg
    ) -> limiter_pb2.CommitResponse:
        return self.admission.commit(request)

    async def serve(self, bus: Bus) -> None:
        await bus.serve(
            Subjects.LIMITER_RESERVE, limiter_pb2.ReserveRequest, self.reserve, queue=QUEUE
        )
        await bus.serve(
            Subjects.LIMITER_COMMIT, limiter_pb2.CommitRequest, self.commit, queue=QUEUE
        )


class UsageReconciler:
    """The durable consumer on ``SLUICE_USAGE`` that settles reservations."""

    def __init__(
        self,
        bus: Bus,
        admission: Admission,
        spec: ConsumerSpec,
        *,
        batch: int,
        fetch_timeout: float,
        window: float,
    ) -> None:
        self.bus = bus
        self.admission = admission
        self.spec = spec
        self.batch = batch
        self.fetch_timeout = fetch_timeout
        self.window = window
        self._sub: JetStreamContext.PullSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._tracer = trace.get_tracer("sluice.limiter")

    async def start(self) -> None:
        await self.bus.ensure_consumer(self.spec)
        self._sub = await self.bus.pull_subscription(self.spec)
        self._task = asyncio.create_task(self._run(), name="limiter-reconcile")

    async def stop(self) -> None:
        """Stop fetching; the batch in hand is settled and acked first."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _run(self) -> None:
        sub = self._sub
        assert sub is not None
        while not self._stopping.is_set():
            try:
                msgs = await sub.fetch(self.batch, timeout=self.fetch_timeout)
            except NatsTimeoutError:
                continue
            except Exception:
                # A reconnect in progress or a consumer being recreated: try again soon.
                log.warning("usage fetch failed", exc_info=True)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                await self._on_usage(msg)
            if len(msgs) < self.batch:
                await linger(self._stopping, self.window)

    async def _on_usage(self, msg: Msg) -> None:
        with self._tracer.start_as_current_span(
            f"{Subjects.USAGE_ALL} process",
            context=telemetry.extract(msg.headers),
            kind=SpanKind.CONSUMER,
            attributes=telemetry.messaging_attributes(msg.subject, "process"),
        ) as span:
            event = cost_pb2.UsageEvent()
            try:
                event.ParseFromString(msg.data)
            except DecodeError:
                # Never decodable, so never worth a redelivery.
                span.set_status(Status(StatusCode.ERROR, "undecodable usage event"))
                log.error("undecodable usage event on %s; terminated", msg.subject)
                await msg.term()
                return
            span.set_attribute("sluice.key_id", event.key_id)
            span.set_attribute("sluice.request_id", event.request_id)
            self.admission.apply_usage(event)
            # Ack after applying; a redelivery (lost ack) finds the reservation settled.
            await msg.ack()
