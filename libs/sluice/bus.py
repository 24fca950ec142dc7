"""One NATS connection per process, the JetStream topology, and traced messaging.

Every publish and request carries W3C trace context in NATS headers; every handler
registered through :meth:`Bus.serve` runs inside a CONSUMER span continued from them
(the pattern of faststream's OpenTelemetry middleware, without its per-message cost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import UTC, datetime
from enum import Enum
from typing import Any, TypeVar

import nats
import nats.errors
import orjson
from google.protobuf.message import Message as ProtoMessage
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue
from nats.protocol import command as nats_command
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from sluice import telemetry
from sluice.topology import Buckets, BucketSpec, ConsumerSpec, Streams, StreamSpec

log = logging.getLogger(__name__)

P = TypeVar("P", bound=ProtoMessage)

# What "the other side did not answer" looks like from nats-py: a timeout, no responders,
# a closed or reconnecting connection, a JetStream API error.
NATS_FAILURES = (TimeoutError, nats.errors.Error)
MessageCallback = Callable[[Msg], Awaitable[None]]


class PullStatus(Enum):
    """A status message the server sends to a pull's reply subject instead of a message."""

    # An idle heartbeat: the pull is still open.
    HEARTBEAT = "heartbeat"
    # The pull is over and found the queue empty (no messages, or the long poll expired).
    EMPTY = "empty"
    # The pull is over for another reason (409: limits reached, consumer deleted, ...).
    ENDED = "ended"


class CoalescingClient(NatsClient):
    """nats-py's client with a flusher that lets the event loop turn ``flush_yields``
    more times before it writes. nats-py writes what is pending at the first turn after
    a publish; on loopback each write is a system call that also wakes the server, and a
    request's publishes (its answer, its usage, its ack, the next pull) come a turn or two
    apart. Waiting a turn lets them, and other requests' in the same turns, leave in one
    write. The cost is a turn of latency per write.

    It also delivers the messages of ``direct`` subscriptions (``Bus.subscribe_data``)
    straight from the read loop: their payload goes to a plain function as it is read,
    without nats-py's per-subscription task and queue, and without parsing headers."""

    # How long an unsubscribe may wait for another write to carry it (``end_direct``).
    UNSUBSCRIBE_WRITE_WAIT_SECONDS = 0.05

    def __init__(self, flush_yields: int = 0) -> None:
        super().__init__()
        self.flush_yields = flush_yields
        # Subscription id -> the function each payload of that subscription goes to.
        self.direct: dict[int, Callable[[bytes], None]] = {}
        self._unsubscribe_kick: asyncio.TimerHandle | None = None

    def end_direct(self, sub: Subscription) -> None:
        """End a direct subscription at once on this side, and tell the server with the
        next write instead of a write of its own.

        Every request ends its stream subscription, and nats-py writes each UNSUB alone
        when its flusher next runs: on loopback a system call and a wake-up of the server
        per request. Here the UNSUB joins what is pending and leaves with the next
        publish, or within ``UNSUBSCRIBE_WRITE_WAIT_SECONDS`` when nothing else is
        written. Until the server reads it, a message on the subject still reaches this
        connection and is dropped here: the subscription is already gone from nats-py's
        table (so a reconnect does not subscribe it again) and from ``direct``."""
        self.direct.pop(sub._id, None)
        if sub._closed:
            return
        sub._closed = True
        sub._stop_processing()
        self._remove_sub(sub._id)
        if self.is_closed or self.is_reconnecting or not self.is_connected:
            # A reconnect subscribes again only what is in the table.
            return
        command = nats_command.unsub_cmd(sub._id, 0)
        self._pending.append(command)
        self._pending_data_size += len(command)
        if self._unsubscribe_kick is None:
            self._unsubscribe_kick = asyncio.get_running_loop().call_later(
                self.UNSUBSCRIBE_WRITE_WAIT_SECONDS, self._write_unsubscribes
            )

    def _write_unsubscribes(self) -> None:
        self._unsubscribe_kick = None
        queue = self._flush_queue
        if self._pending_data_size and self.is_connected and queue and not queue.full():
            queue.put_nowait(asyncio.get_running_loop().create_future())

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        deliver = self.direct.get(sid)
        if deliver is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        deliver(data)

    async def _flusher(self) -> None:
        # nats-py's own loop (client.py, ``_flusher``), with the turns let pass first
        # and the flush requests queued meanwhile answered by the same write.
        assert self._transport, "Client.connect must be called first"
        assert self._flush_queue, "Client.connect must be called first"
        while True:
            if not self.is_connected or self.is_connecting:
                break
            future: asyncio.Future[None] = await self._flush_queue.get()
            try:
                for _ in range(self.flush_yields):
                    await asyncio.sleep(0)
                if self._pending_data_size > 0:
                    self._transport.writelines(self._pending[:])
                    self._pending = []
                    self._pending_data_size = 0
                    await self._transport.drain()  # type: ignore[no-untyped-call]
            except OSError as e:
                await self._error_cb(e)
                await self._process_op_err(e)
                break
            except (asyncio.CancelledError, RuntimeError, AttributeError):
                break
            finally:
                if not future.done():
                    future.set_result(None)
                while not self._flush_queue.empty():
                    queued = self._flush_queue.get_nowait()
                    if not queued.done():
                        queued.set_result(None)


class Bus:
    """The process's NATS connection with JetStream, KV handles and traced helpers."""

    def __init__(self, nc: NatsClient, name: str) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.name = name
        self._kv: dict[str, KeyValue] = {}
        self._subs: list[Subscription] = []
        self._tracer = trace.get_tracer("sluice.bus")

    @classmethod
    async def connect(
        cls, url: str, name: str, *, connect_timeout: float = 5.0, flush_yields: int = 0
    ) -> Bus:
        async def on_error(exc: Exception) -> None:
            log.warning("nats error: %s", exc)

        async def on_disconnect() -> None:
            log.warning("nats disconnected")

        async def on_reconnect() -> None:
            log.info("nats reconnected")

        nc = CoalescingClient(flush_yields)
        # Client.connect annotates these seconds as int; it takes fractions (nats.connect,
        # used before, passed them through untyped).
        await nc.connect(
            url,
            name=name,
            connect_timeout=connect_timeout,  # type: ignore[arg-type]
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,  # type: ignore[arg-type]
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            # Large pending buffers: token streams burst.
            pending_size=64 * 1024 * 1024,
        )
        return cls(nc, name)

    # --- topology -------------------------------------------------------------------

    async def ensure_topology(self) -> None:
        """Create (or update) every stream and bucket declared in ``sluice.topology``."""
        for spec in Streams.ALL:
            await self.ensure_stream(spec)
        for bucket in Buckets.ALL:
            await self.kv(bucket)

    async def ensure_stream(self, spec: StreamSpec) -> None:
        config = StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            retention=RetentionPolicy(spec.retention),
            storage=StorageType.FILE,
            max_age=spec.max_age_seconds or None,
            duplicate_window=spec.duplicate_window_seconds,
            max_bytes=spec.max_bytes,
            description=spec.description or None,
        )
        try:
            await self.js.add_stream(config)
        except BadRequestError:
            await self.js.update_stream(config)

    async def ensure_consumer(self, spec: ConsumerSpec, **overrides: Any) -> None:
        await self.js.add_consumer(spec.stream, consumer_config(spec, **overrides))

    async def stream_subjects(
        self, stream: str, subjects_filter: str, *, timeout: float = 5.0
    ) -> list[str]:
        """The subjects holding messages in ``stream`` that match ``subjects_filter``, from
        the server's own per-subject index (``STREAM.INFO``, paged), in one round trip
        per page and without creating a consumer."""
        found: list[str] = []
        while True:
            request = {"subjects_filter": subjects_filter, "offset": len(found)}
            reply = await self.nc.request(
                f"$JS.API.STREAM.INFO.{stream}", orjson.dumps(request), timeout=timeout
            )
            body = orjson.loads(reply.data)
            if "error" in body:
                raise nats.errors.Error(f"stream info for {stream}: {body['error']}")
            page = (body.get("state") or {}).get("subjects") or {}
            found.extend(page)
            if not page or len(found) >= int(body.get("total") or 0):
                return found

    async def kv(self, bucket: BucketSpec) -> KeyValue:
        handle = self._kv.get(bucket.name)
        if handle is not None:
            return handle
        try:
            handle = await self.js.key_value(bucket.name)
        except (NotFoundError, BadRequestError):
            handle = await self.js.create_key_value(
                KeyValueConfig(
                    bucket=bucket.name,
                    history=bucket.history,
                    ttl=bucket.ttl_seconds or None,
                    description=bucket.description or None,
                    storage=StorageType.FILE,
                )
            )
        self._kv[bucket.name] = handle
        return handle

    async def set_bucket_ttl(self, bucket: BucketSpec, seconds: float) -> None:
        """Make a bucket's TTL follow a setting (the bucket may predate it)."""
        try:
            info = await self.js.stream_info(bucket.stream_name)
        except NATS_FAILURES:
            return
        wanted = float(seconds)
        if info.config.max_age is not None and abs(float(info.config.max_age) - wanted) < 1e-3:
            return
        info.config.max_age = wanted
        # JetStream refuses a duplicate window longer than max_age (the KV default: 2 min).
        window = info.config.duplicate_window
        if wanted > 0 and (window is None or window > wanted):
            info.config.duplicate_window = wanted
        try:
            await self.js.update_stream(info.config)
        except NATS_FAILURES:
            log.warning("could not set the TTL of bucket %s", bucket.name, exc_info=True)

    # --- stored messages ------------------------------------------------------------

    async def last_message(self, stream: str, subject: str) -> bytes | None:
        """The payload of the last message ``stream`` holds on ``subject``; None when it
        holds none (or the stream does not answer)."""
        try:
            raw = await self.js.get_last_msg(stream, subject)
        except (NotFoundError, *NATS_FAILURES):
            return None
        return raw.data or b""

    async def last_sequence(self, stream: str, subject: str) -> int | None:
        """The stream sequence of the last message on ``subject``; None when there is
        none. Other failures raise: a reader must not take "no answer" for "empty"."""
        try:
            raw = await self.js.get_last_msg(stream, subject)
        except NotFoundError:
            return None
        return int(raw.seq or 0)

    async def delete_message(self, stream: str, sequence: int) -> bool:
        """Remove one stored message by its stream sequence; False when it is gone."""
        try:
            return bool(await self.js.delete_msg(stream, sequence))
        except NATS_FAILURES:
            return False

    async def follow(
        self,
        subject: str,
        stream: str,
        cb: MessageCallback,
        *,
        new_only: bool = False,
        start_sequence: int = 0,
    ) -> Subscription:
        """Every message ``stream`` holds on ``subject``, from the first (``new_only``:
        from the next one stored; ``start_sequence``: from that stream sequence), then
        each new one as it is stored: an ephemeral ordered consumer (no acks, nothing
        left behind)."""
        if start_sequence:
            sub = await self.js.subscribe(
                subject,
                stream=stream,
                cb=cb,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                config=ConsumerConfig(opt_start_seq=start_sequence),
            )
            return sub
        sub = await self.js.subscribe(
            subject,
            stream=stream,
            cb=cb,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW if new_only else DeliverPolicy.ALL,
        )
        return sub

    async def pull_ephemeral(
        self, stream: str, subject: str, *, start_sequence: int, inactive_seconds: float = 60.0
    ) -> JetStreamContext.PullSubscription:
        """An ephemeral pull consumer of ``subject`` from stream sequence
        ``start_sequence``, without acks (the caller keeps its own position); the server
        removes it after ``inactive_seconds`` without a fetch."""
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, start_sequence),
            ack_policy=AckPolicy.NONE,
            inactive_threshold=inactive_seconds,
        )
        return await self.js.pull_subscribe(subject, stream=stream, config=config)

    async def stream_last_sequence(self, stream: str) -> int:
        """The sequence of the last message ``stream`` stored (0: none yet)."""
        info = await self.js.stream_info(stream)
        return int(info.state.last_seq or 0)

    async def read_stream(
        self,
        stream: str,
        subject: str,
        *,
        start_sequence: int = 0,
        start_time: datetime | None = None,
        idle_timeout: float = 5.0,
    ) -> AsyncGenerator[Msg, None]:
        """The messages ``stream`` holds on ``subject`` (wildcards allowed), from stream
        sequence ``start_sequence`` or the first stored at or after ``start_time`` (else
        from the first), up to the last one stored when the read starts. Like ``replay``
        it reads with an ephemeral ordered consumer and raises ``TimeoutError`` on a
        stall; the caller stops whenever it has enough (use ``contextlib.aclosing``)."""
        info = await self.js.stream_info(stream)
        last = int(info.state.last_seq or 0)
        if last == 0 or (start_sequence and start_sequence > last):
            return
        if start_sequence:
            options: dict[str, Any] = {
                "deliver_policy": DeliverPolicy.BY_START_SEQUENCE,
                "config": ConsumerConfig(opt_start_seq=start_sequence),
            }
        elif start_time is not None:
            options = {
                "deliver_policy": DeliverPolicy.BY_START_TIME,
                "config": ConsumerConfig(opt_start_time=start_time.astimezone(UTC)),
            }
        else:
            options = {"deliver_policy": DeliverPolicy.ALL}
        sub = await self.js.subscribe(subject, stream=stream, ordered_consumer=True, **options)
        try:
            # The server sends nothing for the messages the filter leaves out, so the
            # consumer's pending count, not a timeout, says when the read is done.
            info_c = await sub.consumer_info()
            # What it delivered before this answer is already in the subscription's queue.
            delivered = info_c.delivered.consumer_seq if info_c.delivered else 0
            if not info_c.num_pending and not delivered:
                return
            while True:
                try:
                    msg = await sub.next_msg(timeout=idle_timeout)
                except nats.errors.TimeoutError:
                    raise TimeoutError(f"no message from {stream} for {idle_timeout}s") from None
                sequence = msg.metadata.sequence.stream
                if sequence > last:
                    return
                yield msg
                if sequence >= last or not msg.metadata.num_pending:
                    return
        finally:
            await self.unsubscribe(sub)

    # --- messaging ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    def new_inbox(self) -> str:
        return str(self.nc.new_inbox())

    async def flush(self, timeout: float = 2.0) -> None:
        """Returns once the server has processed everything sent so far."""
        await self.nc.flush(timeout=int(max(1, timeout)))

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra) if extra else {}
        telemetry.inject(headers)
        return headers

    async def publish(
        self,
        subject: str,
        message: ProtoMessage | bytes,
        headers: dict[str, str] | None = None,
        *,
        traced: bool = True,
    ) -> None:
        """Core NATS publish, with trace context unless ``traced`` is False; no span (hot
        path for token events)."""
        payload = message if isinstance(message, bytes) else message.SerializeToString()
        await self.nc.publish(
            subject, payload, headers=self._headers(headers) if traced else headers
        )

    async def publish_durable(
        self,
        subject: str,
        message: ProtoMessage | bytes,
        *,
        msg_id: str,
        timeout: float = 2.0,
        span_name: str | None = None,
    ) -> int:
        """JetStream publish in a PRODUCER span with trace context, deduplicated by
        ``msg_id`` (``Nats-Msg-Id``); returns the stream sequence. ``span_name`` names
        the span when the subject holds an id (span names stay low-cardinality, as the
        messaging conventions ask). Raises one of ``NATS_FAILURES`` when not stored."""
        payload = message if isinstance(message, bytes) else message.SerializeToString()
        with self._tracer.start_as_current_span(
            f"{span_name or subject} publish",
            kind=SpanKind.PRODUCER,
            attributes={
                **telemetry.messaging_attributes(subject, "publish"),
                "messaging.message.id": msg_id,
                "messaging.message.body.size": len(payload),
            },
        ) as span:
            headers = {"Nats-Msg-Id": msg_id}
            telemetry.inject(headers)
            try:
                return await self._store(subject, payload, headers, timeout)
            except NATS_FAILURES as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise

    async def _store(
        self, subject: str, payload: bytes, headers: dict[str, str], timeout: float
    ) -> int:
        """nats-py's ``JetStreamContext.publish`` without its stdlib JSON decode of the
        ack and the ``PubAck`` built from it: every request stores its work and its
        usage this way, and only the sequence is read."""
        try:
            msg = await self.nc.request(subject, payload, timeout=timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise nats.js.errors.NoStreamResponseError from None
        ack = orjson.loads(msg.data)
        if "error" in ack:
            raise nats.js.errors.APIError.from_error(ack["error"])
        return int(ack["seq"])

    async def subscribe(
        self, subject: str, cb: MessageCallback, *, queue: str = ""
    ) -> Subscription:
        """A plain core subscription whose callback gets each raw message (a request's
        own stream subject, a reply inbox); ``serve`` is for handlers of a subject."""
        return await self.nc.subscribe(subject, queue=queue, cb=cb)

    async def subscribe_data(self, subject: str, deliver: Callable[[bytes], None]) -> Subscription:
        """A core subscription whose payloads go to ``deliver`` as the read loop reads
        them (a request's own stream subject, one per request): nats-py's callback
        subscription costs a task and a queue hop per message, and a task to start and
        cancel per subscription. ``deliver`` must not block; headers are not read."""
        sub = await self.nc.subscribe(subject)
        if isinstance(self.nc, CoalescingClient):
            self.nc.direct[sub._id] = deliver
        else:  # pragma: no cover - Bus.connect always makes a CoalescingClient
            raise TypeError("subscribe_data needs the bus's own client")
        # Anything that arrived before the function was in place (the server answers
        # only after the subscription went out, but the loop may have turned meanwhile).
        while not sub._pending_queue.empty():
            deliver(sub._pending_queue.get_nowait().data)
        return sub

    @staticmethod
    async def unsubscribe(sub: Subscription) -> None:
        """End a subscription; one whose connection is already gone ends quietly. A
        direct one (``subscribe_data``) ends without a write of its own
        (``CoalescingClient.end_direct``)."""
        conn = sub._conn
        if isinstance(conn, CoalescingClient) and sub._id in conn.direct:
            conn.end_direct(sub)
            return
        with contextlib.suppress(*NATS_FAILURES):
            await sub.unsubscribe()

    async def request_raw(self, subject: str, payload: bytes, *, timeout: float) -> bytes:
        """Request/reply without span or trace context (probes would bury the traces)."""
        reply = await self.nc.request(subject, payload, timeout=timeout)
        return bytes(reply.data)

    async def request(
        self,
        subject: str,
        message: ProtoMessage,
        reply_type: type[P],
        *,
        timeout: float = 2.0,
        span_name: str | None = None,
    ) -> P:
        """Request/reply in a CLIENT span; raises ``asyncio.TimeoutError`` or NoResponders."""
        with self._tracer.start_as_current_span(
            span_name or f"{subject} request",
            kind=SpanKind.CLIENT,
            attributes=telemetry.messaging_attributes(subject, "send"),
        ):
            reply = await self.nc.request(
                subject, message.SerializeToString(), timeout=timeout, headers=self._headers()
            )
        out = reply_type()
        out.ParseFromString(reply.data)
        return out

    async def serve(
        self,
        subject: str,
        request_type: type[P],
        handler: Callable[[P, Msg], Awaitable[ProtoMessage | None]],
        *,
        queue: str | None = None,
        traced: bool = True,
    ) -> Subscription:
        """Serve request/reply (or plain publishes) on ``subject`` inside CONSUMER spans.

        A handler's return value, when not None, is the reply. Decoding failures and
        handler errors are logged and answered with no reply, so callers time out rather
        than receive garbage; handlers map domain errors into their reply messages.
        """

        async def untraced(msg: Msg) -> None:
            try:
                request = request_type()
                request.ParseFromString(msg.data)
                reply = await handler(request, msg)
                if reply is not None and msg.reply:
                    await msg.respond(reply.SerializeToString())
            except Exception:
                log.exception("handler for %s failed", subject)

        async def on_message(msg: Msg) -> None:
            parent = telemetry.extract(msg.headers)
            with self._tracer.start_as_current_span(
                f"{subject} process",
                context=parent,
                kind=SpanKind.CONSUMER,
                attributes=telemetry.messaging_attributes(subject, "process"),
            ) as span:
                try:
                    request = request_type()
                    request.ParseFromString(msg.data)
                    reply = await handler(request, msg)
                    if reply is not None and msg.reply:
                        await msg.respond(reply.SerializeToString())
                except Exception as exc:
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                    log.exception("handler for %s failed", subject)

        sub = await self.nc.subscribe(
            subject, queue=queue or "", cb=on_message if traced else untraced
        )
        self._subs.append(sub)
        return sub

    async def unserve(self, sub: Subscription) -> None:
        """Stop one subscription that ``serve`` started."""
        if sub in self._subs:
            self._subs.remove(sub)
        await sub.unsubscribe()

    async def stop_serving(self) -> None:
        """Stop taking new requests (first step of a graceful shutdown)."""
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # already closed connection: nothing left to stop
                log.debug("unsubscribe failed", exc_info=True)
        self._subs.clear()

    # --- the connection shared with the durable consumers (sluice.consumers) ---------

    def connection_for_consumers(self) -> NatsClient:
        """This bus's own connection, for the faststream broker of ``sluice.consumers``
        (one connection per process). The bus keeps owning it: the broker never drains
        or closes it, and ``close`` below does, after the consumers have stopped."""
        return self.nc

    async def close(self) -> None:
        """Drain (flush pending publishes, finish callbacks) and close."""
        if self.nc.is_closed:
            return
        await self._drop_unread_subscriptions()
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=10)
        except Exception:
            log.debug("drain failed; closing", exc_info=True)
            await self.nc.close()

    async def _drop_unread_subscriptions(self) -> None:
        """Unsubscribe, rather than drain, the subscriptions no callback reads (JetStream
        pull subscriptions). nats-py's ``fetch`` takes stale status messages off such a
        queue without marking them done, so draining it waits out the whole drain timeout
        after any fetch that timed out. Whatever such a queue still holds was never
        acknowledged, so JetStream delivers it again to the next consumer anyway."""
        for sub in list(self.nc._subs.values()):
            if sub._cb is None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    # --- operations particular services need ------------------------------------------
    # The worker's pull dispatcher and queue gauge, the cost-tracker's ledger rebuild, the
    # cache's invalidation. (Durable batch consumers are sluice.consumers.)

    async def request_next(
        self, spec: ConsumerSpec, reply: str, *, batch: int = 1, expires: float | None = None
    ) -> None:
        """Ask the durable pull consumer ``spec`` for up to ``batch`` messages, delivered
        to ``reply`` (a subscription of the caller's): the raw
        ``$JS.API.CONSUMER.MSG.NEXT`` request under nats-py's ``fetch``, for a caller
        that keeps its own pulls open. ``expires``: seconds the server may hold the pull
        open (a long poll); None: it answers at once, with "no messages" when the queue
        is empty. Besides messages, ``reply`` receives status messages
        (``pull_status``). No span and no trace context: a worker sends one per free
        slot, and each message it brings carries its own."""
        if expires is None:
            request: dict[str, int | bool] = {"batch": batch, "no_wait": True}
        else:
            request = {"batch": batch, "expires": int(expires * 1e9)}
        await self.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}",
            orjson.dumps(request),
            reply=reply,
        )

    @staticmethod
    def pull_status(msg: Msg) -> PullStatus | None:
        """What a message on a ``request_next`` reply subject is: None for a stream
        message, else the status the server sent in its place."""
        if msg.data or not msg.headers:
            return None
        status = msg.headers.get("Status")
        if status is None:
            return None
        if status == "100":
            return PullStatus.HEARTBEAT
        # 404: no messages (an answer at once); 408: the long poll expired.
        if status in ("404", "408"):
            return PullStatus.EMPTY
        return PullStatus.ENDED

    async def consumer_pending(self, spec: ConsumerSpec) -> int:
        """Messages of the consumer's stream not yet delivered to it: its backlog. Raises
        one of ``NATS_FAILURES`` when the server does not answer."""
        info = await self.js.consumer_info(spec.stream, spec.durable)
        return int(info.num_pending or 0)

    async def replay(
        self, stream: str, subject: str, *, idle_timeout: float = 10.0
    ) -> AsyncGenerator[Msg, None]:
        """Every message ``stream`` holds on ``subject`` (wildcards allowed), in order, up
        to the last one stored when the replay starts; later ones are left to the live
        consumers. An ephemeral ordered consumer reads them: no acks, no durable state
        touched. Raises ``TimeoutError`` when nothing arrives for ``idle_timeout``
        seconds before that last message, so a stall is never taken for the end. Use it
        in ``contextlib.aclosing`` so the consumer goes when the reader stops early."""
        last = await self.last_sequence(stream, subject)
        if last is None:
            return
        sub = await self.js.subscribe(
            subject, stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        try:
            while True:
                msg = await sub.next_msg(timeout=idle_timeout)
                yield msg
                if msg.metadata.sequence.stream >= last:
                    return
        finally:
            await self.unsubscribe(sub)

    async def purge_bucket(self, bucket: BucketSpec) -> None:
        """Remove every key of ``bucket``, delete markers included, in one stream purge."""
        await self.js.purge_stream(bucket.stream_name)


def consumer_config(spec: ConsumerSpec, **overrides: Any) -> ConsumerConfig:
    """The server-side configuration of a durable consumer, from its one declaration."""
    return ConsumerConfig(
        durable_name=spec.durable,
        filter_subject=spec.filter_subject,
        ack_policy=AckPolicy(spec.ack_policy),
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=spec.ack_wait_seconds,
        max_deliver=spec.max_deliver,
        max_ack_pending=spec.max_ack_pending,
        **overrides,
    )
