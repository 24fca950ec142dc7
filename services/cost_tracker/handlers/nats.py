"""The cost-tracker on NATS: the SLUICE_USAGE consumer, the usage queries the gateway
asks (``sluice.v1.cost.usage``, request/reply, queue group ``cost-tracker``), and the
subscription to every instance's cost events behind the live feed.

**Usage queries** ride NATS request/reply like the limiter's and the cache's, not gRPC:
the gateway already holds its one NATS connection (no address of the cost-tracker to
configure, no second credential), the queue group spreads the queries over the replicas
(all of them read the same ledger when it is on PostgreSQL), and the trace goes on in
the message headers. The answer is a ``UsageQueryReply``: the summary, or a problem
with a stable code (a bad query; the ledger not answering), never an exception's text.

**Usage consumer** (a ``sluice.consumers.DurableConsumer``): each message of a batch is
priced in its own CONSUMER span, continued from the trace in its headers (the worker's,
or the gateway's for a cache hit), so a request's trace runs on into the cost-tracker.
Once the batch is handled, ``after_batch`` commits its entries in one SQLite
transaction, then announces the rows that were new, each inside its message's span so
that cost-event subscribers continue the same trace; only then does the base ack the
messages (``domain.recording`` states the guarantee). Poison (undecodable, no request
id) is terminated; a batch whose commit fails is naked with ``NAK_DELAY_SECONDS`` and
redelivered, and a redelivered event finds its row and counts as a duplicate.

**One ack per event, not AckAll**, although recording is idempotent per request:

- AckAll is safe only for a durable pulled by one process at a time, and two
  cost-trackers on one PostgreSQL ledger share this durable. With
  AckAll, tracker A's ack of its batch also settles every earlier message delivered to
  tracker B; if B dies before its commit, those events are never delivered again and
  their rows are missing from the ledger (lost billing until a ``--rebuild``).
- It buys nothing measurable today: at 100 requests/s (``python -m bench --only
  overhead --rates 100 --seconds 10``, medians of four alternated runs) it takes the
  tracker from 2.04 to 1.15 NATS messages sent per request, and its CPU from 0.485 to
  0.495 ms per request (0.505 to 0.485 streaming), inside the runs' spread.

If acks ever cost enough to matter, the way to one ack per batch with several trackers
is a durable per tracker over disjoint partitions of the usage subjects, not AckAll on
the shared one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import trace
from opentelemetry.trace import Span
from sluice.bus import Bus
from sluice.consumers import ConsumerBroker, Delivery, DurableConsumer
from sluice.cost.v1 import cost_pb2
from sluice.delivery import Poison, Transient
from sluice.errors import ErrorCode, SluiceError
from sluice.topology import ConsumerSpec, Subjects

from services.cost_tracker.domain.alerts import SpendWatch
from services.cost_tracker.domain.recording import UsageRecorder
from services.cost_tracker.domain.usage import (
    InvalidQuery,
    InvalidUsageEvent,
    LedgerEntry,
    LedgerUnavailable,
    ReportSpec,
    UsageReader,
    nanos_to_float,
    summarize,
)

log = logging.getLogger(__name__)

# Redelivery delay after a failed commit (disk full, locked file): long enough not to spin.
NAK_DELAY_SECONDS = 2.0


@dataclass(slots=True)
class _Staged:
    entry: LedgerEntry
    span: Span


class UsageLedger:
    """The handler and batch commit of the usage consumer: ``handle`` prices one event
    and stages its entry; ``commit`` (the consumer's ``after_batch``) records the staged
    entries in one transaction, announces the new rows, then checks the spend of the
    batch's keys and teams against their budgets (``domain.alerts``)."""

    def __init__(self, recorder: UsageRecorder, watch: SpendWatch | None = None) -> None:
        self.recorder = recorder
        self.watch = watch
        self._staged: list[_Staged] = []

    async def handle(self, event: cost_pb2.UsageEvent, delivery: Delivery) -> None:
        try:
            entry = self.recorder.price(
                event, headers=delivery.headers, stream_seq=delivery.stream_sequence
            )
        except InvalidUsageEvent as exc:
            raise Poison(str(exc)) from exc
        delivery.span.set_attributes(
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
        self._staged.append(_Staged(entry, delivery.span))

    async def commit(self) -> None:
        # Taken at once: whatever happens below, the next batch starts empty.
        staged, self._staged = self._staged, []
        try:
            inserted = await self.recorder.record([s.entry for s in staged])
        except Exception as exc:
            # Rolled back as a whole: every message of the batch comes back.
            log.exception("ledger commit failed; %d messages will be redelivered", len(staged))
            for s in staged:
                s.span.record_exception(exc)
            raise Transient(
                f"ledger commit failed: {type(exc).__name__}", delay=NAK_DELAY_SECONDS
            ) from exc
        for s, new in zip(staged, inserted, strict=True):
            s.span.set_attribute("sluice.ledger.inserted", new)
            with trace.use_span(s.span, end_on_exit=False):
                await self.recorder.announce(s.entry, new)
        if self.watch is None or not staged:
            return
        try:
            # Every entry, new or seen before: the check reads the state, so a batch
            # that comes back after a failure here is checked again.
            with trace.use_span(staged[-1].span, end_on_exit=False):
                await self.watch.check([s.entry for s in staged])
        except Exception as exc:
            log.exception("spend alert check failed; %d messages will be redelivered", len(staged))
            raise Transient(
                f"spend alert check failed: {type(exc).__name__}", delay=NAK_DELAY_SECONDS
            ) from exc


def usage_consumer(
    broker: ConsumerBroker,
    recorder: UsageRecorder,
    spec: ConsumerSpec,
    *,
    batch: int,
    window: float,
    fetch_timeout: float,
    tracer: trace.Tracer | None = None,
    watch: SpendWatch | None = None,
) -> DurableConsumer[cost_pb2.UsageEvent]:
    """The durable consumer on ``SLUICE_USAGE`` that records the ledger."""
    ledger = UsageLedger(recorder, watch)
    return DurableConsumer(
        broker,
        spec,
        cost_pb2.UsageEvent,
        ledger.handle,
        after_batch=ledger.commit,
        batch=batch,
        window=window,
        fetch_timeout=fetch_timeout,
        nak_delay=NAK_DELAY_SECONDS,
        tracer=tracer or trace.get_tracer("sluice.cost_tracker"),
        description="Usage priced into the ledger, one transaction per batch.",
    )


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


QUERY_QUEUE = "cost-tracker"


class UsageQueries:
    """``sluice.v1.cost.usage``: a ``UsageQuery`` in, a ``UsageQueryReply`` out."""

    def __init__(self, ledger: UsageReader) -> None:
        self.ledger = ledger
        self._bus: Bus | None = None
        self._sub: Subscription | None = None

    async def answer(self, query: cost_pb2.UsageQuery, _msg: Msg) -> cost_pb2.UsageQueryReply:
        span = trace.get_current_span()
        try:
            report = await self.ledger.report(ReportSpec.from_query(query))
        except InvalidQuery as exc:
            problem = SluiceError(ErrorCode.INVALID_REQUEST, f"{exc}.").to_proto()
            return cost_pb2.UsageQueryReply(problem=problem)
        except LedgerUnavailable:
            return _unavailable("The cost-tracker is shutting down.")
        except Exception:
            # A database error's text can quote the query: logged here, not answered.
            log.exception("usage query failed")
            return _unavailable("The cost ledger did not answer the query.")
        span.set_attribute("sluice.rows", len(report.rows))
        return cost_pb2.UsageQueryReply(summary=summarize(report))

    async def start(self, bus: Bus) -> None:
        self._bus = bus
        self._sub = await bus.serve(
            Subjects.COST_USAGE_QUERY, cost_pb2.UsageQuery, self.answer, queue=QUERY_QUEUE
        )

    async def stop(self) -> None:
        """Take no more queries (the runtime's stop already unsubscribed them; a tracker
        stopped on its own, as in tests, does it here)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                assert self._bus is not None
                await self._bus.unserve(sub)


def _unavailable(detail: str) -> cost_pb2.UsageQueryReply:
    err = SluiceError(ErrorCode.SERVICE_UNAVAILABLE, detail, retry_after_ms=1000)
    return cost_pb2.UsageQueryReply(problem=err.to_proto())
