"""The SLUICE_USAGE pull consumer: fetch a batch, price it, commit it, then ack it.

Per message a CONSUMER span ``sluice.v1.usage process`` continues the trace carried in
the message headers (the worker's, or the gateway's for a cache hit), so a request's
trace runs on into the cost-tracker. Cost events are published inside that span, so
their subscribers continue the same trace.

Delivery guarantees: a message is acked only after the transaction holding its entry
commits, so a crash before then redelivers it; the ledger ignores a request id it has
already recorded and only new rows publish a ``CostEvent``. A crash between commit and
publish therefore loses that one live cost event (core NATS is at-most-once anyway),
never a ledger row. Poison messages (undecodable, no request id) are terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import metrics, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from sluice import telemetry
from sluice.bus import Bus, linger
from sluice.cost.v1 import cost_pb2
from sluice.metrics import instruments
from sluice.topology import PREFIX, ConsumerSpec, Subjects

from services.cost_tracker.domain import (
    InvalidUsageEvent,
    LedgerEntry,
    Pricer,
    nanos_to_float,
)
from services.cost_tracker.ledger import Ledger

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
        ledger: Ledger,
        pricer: Pricer,
        spec: ConsumerSpec,
        *,
        batch_size: int = 256,
        fetch_timeout: float = 1.0,
        batch_window: float = 0.0,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.bus = bus
        self.ledger = ledger
        self.pricer = pricer
        self.spec = spec
        self.batch_size = batch_size
        self.fetch_timeout = fetch_timeout
        self.batch_window = batch_window
        self.recorded = 0
        self.duplicates = 0
        self._tracer = tracer or trace.get_tracer("sluice.cost_tracker")
        self._sub: JetStreamContext.PullSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # True while a fetched batch is being processed: stop() lets it finish.
        self._busy = False
        self._cost_counter = instruments().cost_usd
        self._unpriced_counter = metrics.get_meter("sluice.cost_tracker").create_counter(
            "sluice.cost.unpriced",
            unit="{event}",
            description="Usage events of models without a price, recorded at zero cost",
        )

    async def start(self) -> None:
        await self.bus.ensure_consumer(self.spec)
        self._sub = await self.bus.js.pull_subscribe_bind(
            durable=self.spec.durable, stream=self.spec.stream
        )
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
            inserted = await self.ledger.record([p.entry for p in pending])
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
                await self._finish(p, new)
            finally:
                p.span.end()

    async def _prepare(self, msg: Msg) -> _Pending | None:
        parent = telemetry.extract(msg.headers)
        span = self._tracer.start_span(
            PROCESS_SPAN_NAME,
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=telemetry.messaging_attributes(msg.subject, "process"),
        )
        try:
            event = cost_pb2.UsageEvent()
            event.ParseFromString(msg.data)
            entry = price_message(self.pricer, event, msg)
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
        if not entry.priced:
            self._unpriced_counter.add(1, {"model": entry.model})
            if self.pricer.first_time_unpriced(entry.model):
                log.warning(
                    "model %r has no price in the price table (version %s); "
                    "its usage is recorded at zero cost",
                    entry.model,
                    entry.price_version,
                )
        return _Pending(msg, span, entry)

    async def _finish(self, p: _Pending, new: bool) -> None:
        p.span.set_attribute("sluice.ledger.inserted", new)
        if new:
            self.recorded += 1
            self._cost_counter.add(
                nanos_to_float(p.entry.total_cost_nanos),
                {"model": p.entry.model, "key_id": p.entry.key_id},
            )
            with trace.use_span(p.span, end_on_exit=False):
                try:
                    await self.bus.publish(
                        Subjects.cost_recorded(p.entry.key_id), p.entry.to_cost_event()
                    )
                except Exception:
                    # The row is committed; the live event is best effort (see module doc).
                    log.warning("cost event publish failed for %s", p.entry.request_id)
        else:
            self.duplicates += 1
        await self.ack(p.msg)

    async def ack(self, msg: Msg) -> None:
        """Ack after commit. An ack lost in transit only causes a harmless redelivery."""
        try:
            await msg.ack()
        except Exception:
            log.warning("ack failed; the message will be redelivered", exc_info=True)


def price_message(pricer: Pricer, event: cost_pb2.UsageEvent, msg: Msg) -> LedgerEntry:
    """The ledger entry of a usage message, as the live consumer and a rebuild make it.

    An event without a trace id keeps the trace it travelled in (the ``traceparent``
    header), so its row still leads to a trace; taken from the message, not from a new
    span, a rebuild reproduces it.
    """
    entry = pricer.price(event, stream_seq=_stream_seq(msg))
    if not entry.trace_id:
        ctx = trace.get_current_span(telemetry.extract(msg.headers)).get_span_context()
        if ctx.is_valid:
            entry = replace(entry, trace_id=f"{ctx.trace_id:032x}")
    return entry


def _stream_seq(msg: Msg) -> int:
    try:
        return int(msg.metadata.sequence.stream)
    except Exception:  # not a JetStream message (no ack metadata in the reply subject)
        return 0
