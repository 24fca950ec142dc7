"""Durable JetStream consumers: faststream pull subscribers on the process's Bus
connection, with one disposition rule, one span convention and one graceful stop.

A consumer is declared by its ``sluice.topology.ConsumerSpec`` (stream, durable, filter,
ack wait, max deliver, max ack pending, ack policy) and a handler of one decoded
protobuf message::

    consumer = DurableConsumer(runtime.consumer_broker(), Consumers.JOB_TRACKER,
                               lifecycle_pb2.LifecycleEvent, tracker.apply)
    await consumer.start()

A fetch returns what the server holds, up to ``batch`` messages (waiting up to
``fetch_timeout`` only while it holds none); after a short batch the consumer waits
``window`` seconds so that the next one gathers. A batch is handled in stream order
(or ``concurrency`` messages at a time with per-message acks); with per-message acks
and no ``after_batch`` each message is settled as soon as it is handled.

**Disposition** (``sluice.delivery``): the handler returns, the message is acked; it
raises ``Poison`` (undecodable messages raise it for the handler), the message is
terminated; it raises ``Transient``, the message is delivered again after the delay;
anything else is logged as a bug and treated as ``Transient``. ``after_batch``, when
given, runs once the batch's messages are handled and before any is settled (one
commit for the batch); what it raises applies to every message the handler accepted.

**Spans**: one CONSUMER span per message, named ``"<filter subject> process"`` (the
name ``Bus.serve`` gives its handlers: low cardinality, the subject pattern rather than
the subject), continued from the trace context in the message headers, with the
messaging attributes of ``sluice.telemetry`` and the disposition. The handler runs with
it as the current span (``Delivery.span`` reaches it later, e.g. from ``after_batch``);
it ends once the message is settled.

**Acks**, two modes, chosen by the spec's ``ack_policy``:

- ``"explicit"``: one ack, nak or term per message.
- ``"all"`` (JetStream's AckAll): acking a message acks every earlier one delivered to
  the consumer, so a batch costs one ack instead of one per message. Found on
  nats-server 2.15 (``tests/consumers/test_ack_all.py`` keeps each finding checked):

  * a term settles only its own message and does not move the ack floor; terms are
    sent before the batch's ack, since a message the ack already covered counts as
    acked, not terminated;
  * a nak, with or without a delay, is overridden by any later ack: a message naked
    with a delay is never delivered again once a later message is acked, whether that
    message came in the same batch or in a later fetch made during the delay;
  * naked messages are delivered again before new ones, in the order they were naked.

  So on the first ``Transient`` at position k the batch stops there: the last message
  accepted before k is acked (which settles everything before it), the rest from k on
  is naked in stream order *without* a server-side delay, and the consumer pauses for
  the delay before it fetches again, so its next batch starts at k and nothing is
  acked past k before k itself is settled. Messages after k count a delivery without
  being attempted (``max_deliver``).

  Only for consumers that tolerate a message processed twice (a redelivery after a
  lost ack re-applies the whole batch's tail), and only for a durable pulled by one
  process at a time: another puller's ack would settle this one's messages in flight.
  JetStream cannot change an existing consumer's ack policy: switching means a new
  durable name.

**Stop**: ``ConsumerBroker.stop`` (``ServiceRuntime.shutdown`` calls it right after
intake stops, before the stop hooks) lets each batch in hand finish and settle, for at
most the broker's graceful timeout; messages fetched but not yet handed to a handler
are left unacked, and JetStream delivers them again after ``ack_wait``. The Bus's
connection is left open for ``Bus.close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

from faststream.message import StreamMessage
from faststream.middlewares import AckPolicy as FaststreamAckPolicy
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.subscriber.usecases import BatchPullStreamSubscriber
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import ServiceUnavailableError
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from sluice import telemetry
from sluice.bus import Bus, consumer_config
from sluice.delivery import Poison, Transient
from sluice.topology import ConsumerSpec

log = logging.getLogger(__name__)

P = TypeVar("P", bound=ProtoMessage)

ACKED = "ack"
NAKED = "nak"
TERMINATED = "term"


class ConsumerBroker(NatsBroker):
    """faststream's NATS broker on the Bus's connection, so that a process keeps one
    connection. It never connects, drains or closes: ``stop`` stops its subscribers
    (each finishing the batch in hand) and lets go of the connection, which the Bus
    closes afterwards."""

    def __init__(self, bus: Bus, *, graceful_timeout: float = 15.0) -> None:
        # No per-message logging or dependency injection: handlers log what they do,
        # and a consumer's handler takes the raw batch (see DurableConsumer).
        super().__init__(
            name=bus.name, logger=None, apply_types=False, graceful_timeout=graceful_timeout
        )
        self.bus = bus

    async def _connect(self) -> NatsClient:
        client = self.bus.connection_for_consumers()
        self.config.connect(client)
        return client

    async def stop(
        self,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
    ) -> None:
        # The base broker's stop (subscribers, gracefully), not NatsBroker's, which
        # would drain the connection the Bus still uses.
        await super(NatsBroker, self).stop(exc_type, exc_val, exc_tb)
        if self._connection is not None:
            self._connection = None
            self.config.disconnect()


class _BatchesAsTheyCome(BatchPullStreamSubscriber):
    """faststream's batch pull subscriber, fetching the way the project's consumers
    always have: one fetch returns what the server has (up to ``batch_size``) at once,
    waiting up to ``pull_sub.timeout`` only while nothing is there; after a short batch
    it lingers ``window`` seconds so the next one gathers at the server.

    faststream's own loop instead re-fetches with the time left until the batch is full
    or its window is over, so nearly every batch ends in a fetch that times out. nats-py
    waits for a message with ``asyncio.wait_for(queue.get(), timeout)``, and on Python
    3.11 a message that arrives as that timeout fires is dropped from the queue: it was
    delivered, so JetStream sends it again only after ``ack_wait`` (seen in the crash
    test: a batch redelivered a third time, one ``ack_wait`` late). Here a fetch times
    out only when the consumer is idle."""

    __slots__ = ()

    window: float
    # Set as a stop begins, so that a pause between batches ends at once.
    stopping: asyncio.Event

    async def start(self) -> None:
        self.stopping.clear()
        await super().start()

    async def stop(self) -> None:
        self.stopping.set()
        await super().stop()

    async def pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    async def _consume_pull(self) -> None:
        assert self.subscription is not None
        batch_size = self.pull_sub.batch_size
        while self.running:
            try:
                messages = await self.subscription.fetch(
                    batch=batch_size, timeout=self.pull_sub.timeout
                )
            except NatsTimeoutError:
                continue
            except (ConnectionClosedError, ServiceUnavailableError):
                await asyncio.sleep(0.5)
                continue
            if not self.running:
                # Fetched as the stop began: hand them back at once rather than after
                # ack_wait.
                for msg in messages:
                    await msg.nak()
                return
            await self.consume(messages)
            if len(messages) < batch_size and self.window > 0:
                await self.pause(self.window)


class Delivery:
    """One delivery of a message, as its handler sees it."""

    __slots__ = ("_msg", "span")

    def __init__(self, msg: Msg, span: Span) -> None:
        self._msg = msg
        self.span = span

    @property
    def subject(self) -> str:
        return str(self._msg.subject)

    @property
    def headers(self) -> Mapping[str, str]:
        return self._msg.headers or {}

    @property
    def attempt(self) -> int:
        """1 for the first delivery, 2 for the first redelivery, ..."""
        return int(self._msg.metadata.num_delivered or 1)

    @property
    def stream_sequence(self) -> int:
        return int(self._msg.metadata.sequence.stream)


def process_span_name(spec: ConsumerSpec) -> str:
    """The name of a consumer's CONSUMER spans (see the module docstring)."""
    return f"{spec.filter_subject} process"


MessageHandler = Callable[[P, Delivery], Awaitable[None]]
BatchHook = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class _Item:
    msg: Msg
    span: Span | None = None
    # None: accepted; otherwise why not.
    failure: Poison | Transient | None = None
    settled: str = field(default="")
    span_ended: bool = False


class DurableConsumer(Generic[P]):
    """One durable pull consumer: ``handler(message, delivery)`` per message."""

    def __init__(
        self,
        broker: ConsumerBroker,
        spec: ConsumerSpec,
        payload: type[P],
        handler: MessageHandler[P],
        *,
        batch: int = 64,
        window: float = 0.05,
        fetch_timeout: float = 5.0,
        nak_delay: float = 1.0,
        concurrency: int = 1,
        after_batch: BatchHook | None = None,
        tracer: trace.Tracer | None = None,
        description: str | None = None,
    ) -> None:
        if spec.ack_policy not in ("explicit", "all"):
            raise ValueError(f"{spec.durable}: ack policy {spec.ack_policy!r} is not supported")
        if spec.ack_policy == "all" and concurrency != 1:
            raise ValueError(f"{spec.durable}: acking a batch at once needs stream order")
        self.broker = broker
        self.spec = spec
        self.payload = payload
        self.handler = handler
        self.nak_delay = nak_delay
        self.after_batch = after_batch
        self._ack_all = spec.ack_policy == "all"
        self._concurrency = asyncio.Semaphore(concurrency) if concurrency > 1 else None
        self._tracer = tracer or trace.get_tracer("sluice.consumers")
        self._span_name = process_span_name(spec)
        subscriber = broker.subscriber(
            spec.filter_subject,
            stream=JStream(spec.stream, declare=False),
            durable=spec.durable,
            config=consumer_config(spec),
            pull_sub=PullSub(batch_size=batch, timeout=fetch_timeout, batch=True),
            ack_policy=FaststreamAckPolicy.MANUAL,
            decoder=_raw_batch,
            title=f"{spec.durable}:{spec.filter_subject}",
            description=description,
        )
        if type(subscriber) is not BatchPullStreamSubscriber:
            raise TypeError(f"faststream made a {type(subscriber).__name__} for a batch pull")
        # The subscriber faststream built and registered, with the fetch loop above (a
        # subclass adding no state, so the object stays what faststream set up).
        subscriber.__class__ = _BatchesAsTheyCome
        self._subscriber = cast(_BatchesAsTheyCome, subscriber)
        self._subscriber.window = window
        self._subscriber.stopping = asyncio.Event()
        self._subscriber(self.handle_batch)
        self.settled: dict[str, int] = {ACKED: 0, NAKED: 0, TERMINATED: 0}

    @property
    def running(self) -> bool:
        return bool(self._subscriber.running)

    async def start(self) -> None:
        """Create (or update) the consumer from its spec, then start pulling."""
        await self.broker.bus.ensure_consumer(self.spec)
        await self.broker.connect()
        await self._subscriber.start()

    async def stop(self) -> None:
        """Stop pulling; the batch in hand is finished and settled first."""
        await self._subscriber.stop()

    # --- one batch --------------------------------------------------------------------

    async def handle_batch(self, msgs: Sequence[Msg]) -> None:
        items = [_Item(msg) for msg in msgs]
        # Per-message acks without a batch commit settle each message as soon as it is
        # handled: a crash mid-batch then redelivers only what was not yet handled.
        settle_at_once = not self._ack_all and self.after_batch is None
        try:
            if self._ack_all:
                for item in items:
                    await self._handle(item)
                    if isinstance(item.failure, Transient):
                        break
            elif self._concurrency is not None:
                await asyncio.gather(
                    *(self._handle_limited(item, settle_at_once) for item in items)
                )
            else:
                for item in items:
                    await self._handle(item)
                    if settle_at_once:
                        await self._settle_one(item)
            if settle_at_once:
                return
            await self._after_batch(items)
            if self._ack_all:
                await self._settle_all(items)
            else:
                for item in items:
                    await self._settle_one(item)
        finally:
            for item in items:
                _end_span(item)

    async def _handle_limited(self, item: _Item, settle: bool) -> None:
        assert self._concurrency is not None
        async with self._concurrency:
            await self._handle(item)
            if settle:
                await self._settle_one(item)

    async def _handle(self, item: _Item) -> None:
        msg = item.msg
        span = item.span = self._tracer.start_span(
            self._span_name,
            context=telemetry.extract(msg.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                **telemetry.messaging_attributes(msg.subject, "process"),
                "messaging.consumer.group.name": self.spec.durable,
            },
        )
        with trace.use_span(span, end_on_exit=False):
            try:
                message = self.payload()
                try:
                    message.ParseFromString(msg.data)
                except DecodeError as exc:
                    raise Poison(f"undecodable {self.payload.DESCRIPTOR.full_name}") from exc
                await self.handler(message, Delivery(msg, span))
            except Poison as exc:
                # Said once here, for every consumer: the message is gone for good.
                log.warning(
                    "%s: terminating a message on %s: %s", self.spec.durable, msg.subject, exc
                )
                item.failure = exc
            except Transient as exc:
                item.failure = exc
            except Exception as exc:
                log.exception("%s: handler failed on %s", self.spec.durable, msg.subject)
                item.failure = Transient(type(exc).__name__)
            if item.failure is not None:
                span.set_status(Status(StatusCode.ERROR, type(item.failure).__name__))
                span.set_attribute("sluice.consumer.failure", str(item.failure))

    async def _after_batch(self, items: list[_Item]) -> None:
        accepted = [item for item in items if item.span is not None and item.failure is None]
        if self.after_batch is None or not accepted:
            return
        try:
            await self.after_batch()
        except (Poison, Transient) as exc:
            failure: Poison | Transient = exc
        except Exception as exc:
            log.exception("%s: after_batch failed", self.spec.durable)
            failure = Transient(type(exc).__name__)
        else:
            return
        for item in accepted:
            item.failure = failure
            assert item.span is not None
            item.span.set_status(Status(StatusCode.ERROR, type(failure).__name__))

    # --- settling ---------------------------------------------------------------------

    def _delay(self, failure: Transient) -> float:
        return self.nak_delay if failure.delay is None else failure.delay

    async def _settle_one(self, item: _Item) -> None:
        if item.failure is None:
            await self._send(item, ACKED, item.msg.ack())
        elif isinstance(item.failure, Poison):
            await self._send(item, TERMINATED, item.msg.term())
        else:
            await self._send(item, NAKED, item.msg.nak(delay=self._delay(item.failure)))
        _end_span(item)

    async def _settle_all(self, items: list[_Item]) -> None:
        """AckAll: terms, then one ack, then the naks from the first transient on, then
        a pause (see the module docstring for why in this order)."""
        first_transient = next(
            (i for i, item in enumerate(items) if isinstance(item.failure, Transient)),
            len(items),
        )
        for item in items:
            if isinstance(item.failure, Poison):
                await self._send(item, TERMINATED, item.msg.term())
        covered = [item for item in items[:first_transient] if item.failure is None]
        if covered:
            await self._send(covered[-1], ACKED, covered[-1].msg.ack())
            if covered[-1].settled == ACKED:
                for item in covered[:-1]:
                    item.settled = ACKED
                self.settled[ACKED] += len(covered) - 1
        pause = 0.0
        for item in items[first_transient:]:
            if isinstance(item.failure, Poison):
                continue
            if isinstance(item.failure, Transient):
                pause = max(pause, self._delay(item.failure))
            await self._send(item, NAKED, item.msg.nak())
        for item in items:
            _end_span(item)
        if pause > 0:
            # Before the next fetch, ending early when the consumer stops.
            await self._subscriber.pause(pause)

    async def _send(self, item: _Item, disposition: str, sending: Awaitable[None]) -> None:
        try:
            await sending
        except Exception:
            # Not settled: JetStream delivers it again after ack_wait.
            log.warning(
                "%s: %s of a message on %s failed",
                self.spec.durable,
                disposition,
                item.msg.subject,
                exc_info=True,
            )
            return
        item.settled = disposition
        self.settled[disposition] += 1


def _end_span(item: _Item) -> None:
    """End a handled message's span once, with what became of the message."""
    if item.span is not None and not item.span_ended:
        item.span.set_attribute("sluice.consumer.disposition", item.settled or "none")
        item.span.end()
        item.span_ended = True


async def _raw_batch(message: StreamMessage[Any]) -> Any:
    """The decoder of every consumer: the batch of nats-py messages as fetched (each
    handler decodes its own protobuf, inside its message's span)."""
    return message.raw_message


__all__ = [
    "ConsumerBroker",
    "Delivery",
    "DurableConsumer",
    "MessageHandler",
    "Poison",
    "Transient",
    "process_span_name",
]
