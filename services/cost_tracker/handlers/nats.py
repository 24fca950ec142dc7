"""The cost-tracker on NATS: the SLUICE_USAGE consumer, and the subscription to every
instance's cost events behind the live feed.

**Usage consumer.** Fetch a batch, price it, commit it, then ack it
(``domain.recording`` states the guarantee). Per message a CONSUMER span
``sluice.v1.usage process`` continues the trace carried in the message headers (the
worker's, or the gateway's for a cache hit), so a request's trace runs on into the
cost-tracker; cost events are published inside that span, so their subscribers continue
the same trace. Poison messages (undecodable, no request id) are terminated; a batch
whose commit fails is naked with a delay and redelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from sluice import telemetry
from sluice.bus import Bus, linger
from sluice.cost.v1 import cost_pb2
from sluice.topology import PREFIX, ConsumerSpec, Subjects

from services.cost_tracker.domain.recording import UsageRecorder
from services.cost_tracker.domain.usage import InvalidUsageEvent, LedgerEntry, nanos_to_float

log = logging.getLogger(__name__)

# One span name for every key: the key is an attribute, not part of the name, so that
# span names stay a small, fixed set.
PROCESS_SPAN_NAME = f"{PREFIX}.usage process"
# Redelivery delay after a failed commit (disk full, locked file): long enough not to spin.
NAK_DELAY_SECONDS = 2.0


@dataclass
class _Pending:
    msg: Msg
    span: Span
    entry: LedgerEntry


class UsageConsumer:
    """Runs the fetch loop of one durable consumer on SLUICE_USAGE."""

    def __init__(
        self,
        bus: Bus,
        recorder: UsageRecorder,
        spec: ConsumerSpec,
        *,
        batch_size: int = 256,
        fetch_timeout: float = 1.0,
        batch_window: float = 0.0,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.bus = bus
        self.recorder = recorder
        self.spec = spec
        self.batch_size = batch_size
        self.fetch_timeout = fetch_timeout
        self.batch_window = batch_window
        self._tracer = tracer or trace.get_tracer("sluice.cost_tracker")
        self._sub: JetStreamContext.PullSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # True while a fetched batch is being processed: stop() lets it finish.
        self._busy = False

    async def start(self) -> None:
        await self.bus.ensure_consumer(self.spec)
        self._sub = await self.bus.pull_subscription(self.spec)
        self._task = asyncio.create_task(self._run(), name=f"usage-consumer-{self.spec.durable}")

    async def stop(self) -> None:
        """Stop fetching; a batch in progress is committed and acked first."""
        self._stopping.set()
        task = self._task
        if task is None:
            return
        if not self._busy:
            # Waiting in fetch: nothing in hand, messages left are redelivered later.
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _run(self) -> None:
        assert self._sub is not None
        while not self._stopping.is_set():
            try:
                msgs = await self._sub.fetch(self.batch_size, timeout=self.fetch_timeout)
            except TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception:
                # Connection trouble: nats-py reconnects by itself; try again shortly.
                log.warning("usage fetch failed", exc_info=True)
                await asyncio.sleep(0.5)
                continue
            self._busy = True
            try:
                await self.handle_batch(msgs)
            except Exception:
                log.exception("usage batch failed")
            finally:
                self._busy = False
            if len(msgs) < self.batch_size:
                await linger(self._stopping, self.batch_window)

    async def handle_batch(self, msgs: list[Msg]) -> None:
        """Price, commit in one transaction, publish cost events for new rows, ack."""
        pending: list[_Pending] = []
        for msg in msgs:
            item = await self._prepare(msg)
            if item is not None:
                pending.append(item)
        if not pending:
            return
        try:
            inserted = await self.recorder.record([p.entry for p in pending])
        except Exception as exc:
            log.exception("ledger commit failed; %d messages will be redelivered", len(pending))
            for p in pending:
                p.span.record_exception(exc)
                p.span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                p.span.end()
                with contextlib.suppress(Exception):
                    await p.msg.nak(delay=NAK_DELAY_SECONDS)
            return
        for p, new in zip(pending, inserted, strict=True):
            try:
                p.span.set_attribute("sluice.ledger.inserted", new)
                with trace.use_span(p.span, end_on_exit=False):
                    await self.recorder.announce(p.entry, new)
                await self.ack(p.msg)
            finally:
                p.span.end()

    async def _prepare(self, msg: Msg) -> _Pending | None:
        span = self._tracer.start_span(
            PROCESS_SPAN_NAME,
            context=telemetry.extract(msg.headers),
            kind=SpanKind.CONSUMER,
            attributes=telemetry.messaging_attributes(msg.subject, "process"),
        )
        try:
            event = cost_pb2.UsageEvent()
            event.ParseFromString(msg.data)
            entry = self.recorder.price(event, headers=msg.headers, stream_seq=_stream_seq(msg))
        except (DecodeError, InvalidUsageEvent) as exc:
            log.error("terminating poison usage message on %s: %s", msg.subject, exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
            with contextlib.suppress(Exception):
                await msg.term()
            return None
        span.set_attributes(
            {
                "sluice.request_id": entry.request_id,
                "sluice.key_id": entry.key_id,
                "sluice.cache_hit": entry.cache_hit,
                "sluice.outcome": entry.outcome,
                "sluice.cost_usd": nanos_to_float(entry.total_cost_nanos),
                "sluice.price_version": entry.price_version,
                "gen_ai.response.model": entry.model,
            }
        )
        return _Pending(msg, span, entry)

    async def ack(self, msg: Msg) -> None:
        """Ack after commit. An ack lost in transit only causes a harmless redelivery."""
        try:
            await msg.ack()
        except Exception:
            log.warning("ack failed; the message will be redelivered", exc_info=True)


def _stream_seq(msg: Msg) -> int:
    try:
        return int(msg.metadata.sequence.stream)
    except Exception:  # not a JetStream message (no ack metadata in the reply subject)
        return 0


class CostEventListener:
    """Every instance's cost events (``Subjects.COST_RECORDED_ALL``) to ``deliver`` (the
    feed): a watcher sees all spend whichever replica its gRPC call landed on."""

    def __init__(self, bus: Bus, deliver: Callable[[cost_pb2.CostEvent], None]) -> None:
        self._bus = bus
        self._deliver = deliver
        self._sub: Subscription | None = None

    async def _on_event(self, event: cost_pb2.CostEvent, _msg: Msg) -> None:
        self._deliver(event)

    async def start(self) -> None:
        self._sub = await self._bus.serve(
            Subjects.COST_RECORDED_ALL, cost_pb2.CostEvent, self._on_event, traced=False
        )
        # The server knows of the interest before a watcher is told it is watching.
        await self._bus.flush()

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            await self._bus.unserve(sub)
