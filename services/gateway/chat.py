"""One chat completion through the data path: validate against the catalogue, count
tokens, reserve and look up the cache concurrently, then answer from the cache or
enqueue the work and relay the worker's stream events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

from google.protobuf.message import DecodeError
from nats.aio.subscription import Subscription
from sluice import canonical, tokens
from sluice.bus import Bus
from sluice.catalog import Catalog
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.deltas import can_join, mergeable
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2
from sluice.keys.v1 import keys_pb2
from sluice.limiter.v1 import limiter_pb2
from sluice.metrics import Instruments
from sluice.replay import read_events
from sluice.topology import PriorityClass, Subjects

from services.gateway.adapters import NATS_FAILURES, Admission, CacheLookup, JetStreamPublisher
from services.gateway.inbox import Inbox
from services.gateway.problems import GatewayError, render_problem
from services.gateway.ratelimit import rate_limit_headers
from services.gateway.render import (
    OPENAI,
    Dialect,
    ErrorRenderer,
    LimitHeaders,
    RequestMeta,
    StreamRenderer,
    final_sluice,
    sse_retry,
)
from services.gateway.settings import CacheMode, GatewaySettings, SemanticCacheMode

log = logging.getLogger(__name__)

SERVICE = "gateway"
# The work item's class, as the proto enum (the subject carries it as text).
_PRIORITY_PROTO = {
    PriorityClass.INTERACTIVE: chat_pb2.PRIORITY_INTERACTIVE,
    PriorityClass.BATCH: chat_pb2.PRIORITY_BATCH,
    PriorityClass.SYSTEM: chat_pb2.PRIORITY_SYSTEM,
}


@dataclass
class ChatResult:
    """Either a finished JSON body or an SSE byte stream, with the headers to send."""

    headers: dict[str, str]
    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None


@dataclass
class CachePolicy:
    lookup: bool
    store: bool


class DeadlineExceeded(Exception):
    pass


class DisconnectPolicy(StrEnum):
    """What happens to a generation whose client goes away (``x-sluice-on-disconnect``).

    ``continue``: it completes, is billed, and stays resumable from ``SLUICE_STREAMS``.
    ``cancel``: the gateway publishes on ``Subjects.cancel(request_id)``; the worker stops
    the upstream call and bills only what was produced.
    """

    CONTINUE = "continue"
    CANCEL = "cancel"


DISCONNECT_HEADER = "x-sluice-on-disconnect"


def disconnect_policy(value: str | None) -> DisconnectPolicy:
    if not value:
        return DisconnectPolicy.CONTINUE
    try:
        return DisconnectPolicy(value.strip().lower())
    except ValueError:
        raise SluiceError(
            ErrorCode.INVALID_REQUEST,
            f"{DISCONNECT_HEADER} must be 'continue' or 'cancel'.",
            param=DISCONNECT_HEADER,
        ) from None


SEMANTIC_HEADER = "x-sluice-semantic-cache"


def semantic_wanted(mode: SemanticCacheMode, value: str | None) -> bool:
    """Whether this request asks the semantic cache (``X-Sluice-Semantic-Cache``)."""
    if value is None:
        return mode is SemanticCacheMode.ON
    choice = value.strip().lower()
    if choice not in ("on", "off"):
        raise SluiceError(
            ErrorCode.INVALID_REQUEST,
            f"{SEMANTIC_HEADER} must be 'on' or 'off'.",
            param=SEMANTIC_HEADER,
        )
    return choice == "on" and mode is not SemanticCacheMode.OFF


@dataclass(frozen=True)
class SemanticQuery:
    """The last user message and the hash of the rest of the request (empty: exact only)."""

    text: str = ""
    scope: str = ""


NO_SEMANTIC = SemanticQuery()


def semantic_query(request: chat_pb2.ChatRequest, team_id: str) -> SemanticQuery:
    text = canonical.semantic_text(request)
    if text is None:
        return NO_SEMANTIC
    return SemanticQuery(text, canonical.semantic_scope(request, team_id))


# Reads what ``SLUICE_STREAMS`` holds for the request after a sequence.
Backfill = Callable[[int], Awaitable[list[inference_pb2.StreamEvent]]]
# A gap may be a publish the stream has not stored yet: look again this often.
_BACKFILL_ATTEMPTS = 3
_BACKFILL_PAUSE_SECONDS = 0.05
# At most this many events already waiting are written to the client in one send.
_COALESCE_MAX_EVENTS = 64


@dataclass
class EventReader:
    """Reads one request's stream events: skips the opening record, drops duplicate and
    stale deltas (sequence at or below the last one relayed), accepts the first terminal
    event whatever its sequence.

    The live subscription is a core NATS subscription: a connection that was cut, or
    one the server dropped as a slow consumer, misses events that ``SLUICE_STREAMS``
    still holds. With ``backfill`` the reader fills such gaps from the stream before
    going on (an event numbered past the next one expected), and looks there when the
    subject has been quiet for a whole wait, so a lost terminal event cannot leave the
    request hanging until its deadline. Every event then reaches the client once, in
    order."""

    inbox: Inbox
    deadline: float
    last_sequence: int = 0
    backfill: Backfill | None = None
    backfilled: int = 0
    _seen_terminal: bool = field(default=False)
    _ready: deque[inference_pb2.StreamEvent] = field(default_factory=deque)

    async def next(
        self, max_wait: float, *, look_in_store: bool = True
    ) -> inference_pb2.StreamEvent | None:
        """The next event, or None after ``max_wait`` without one. ``look_in_store``
        False skips the store after a quiet wait (short waits, such as token batching)."""
        while True:
            while self._ready:
                event = self._ready.popleft()
                if self._accept(event):
                    return event
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded
            msg = await self.inbox.get(min(remaining, max_wait))
            if msg is None:
                if time.monotonic() >= self.deadline:
                    raise DeadlineExceeded
                if look_in_store and self.backfill is not None and await self._fill_idle():
                    continue
                return None
            event = inference_pb2.StreamEvent()
            try:
                event.ParseFromString(msg.data)
            except DecodeError:
                log.warning("undecodable stream event dropped")
                continue
            if self.backfill is not None and self._skips_ahead(event):
                await self._fill_gap(event)
                continue
            if self._accept(event):
                return event

    def has_ready(self) -> bool:
        """True when an event can be read without waiting."""
        return bool(self._ready) or self.inbox.ready()

    def _accept(self, event: inference_pb2.StreamEvent) -> bool:
        kind = event.WhichOneof("body")
        if kind == "delta":
            if event.sequence <= self.last_sequence:
                return False
            self.last_sequence = event.sequence
            return True
        if kind not in ("final", "failure") or self._seen_terminal:
            # The opening record (sequence 0) or a second terminal event.
            return False
        self._seen_terminal = True
        return True

    def _skips_ahead(self, event: inference_pb2.StreamEvent) -> bool:
        if self._seen_terminal or event.WhichOneof("body") not in ("delta", "final", "failure"):
            return False
        return event.sequence > self.last_sequence + 1

    async def _fill_gap(self, event: inference_pb2.StreamEvent) -> None:
        """Queue the stored events between the last one relayed and ``event``, then it."""
        wanted = event.sequence - self.last_sequence - 1
        found: dict[int, inference_pb2.StreamEvent] = {}
        for attempt in range(_BACKFILL_ATTEMPTS):
            stored = await self._read_store()
            if stored is None:
                break  # the live event still goes out; the gap is logged below
            for e in stored:
                if self.last_sequence < e.sequence < event.sequence and e.HasField("delta"):
                    found.setdefault(e.sequence, e)
            if len(found) >= wanted or attempt == _BACKFILL_ATTEMPTS - 1:
                break
            await asyncio.sleep(_BACKFILL_PAUSE_SECONDS)
        if len(found) < wanted:
            log.warning("stream gap: %d of %d events not in the store", wanted - len(found), wanted)
        self.backfilled += len(found)
        self._ready.extend(found[s] for s in sorted(found))
        self._ready.append(event)

    async def _read_store(self) -> list[inference_pb2.StreamEvent] | None:
        """The stored events after the last one relayed; None when the store failed."""
        assert self.backfill is not None
        try:
            return await self.backfill(self.last_sequence)
        except Exception as exc:
            log.warning("stream backfill failed: %s", type(exc).__name__)
            return None

    async def _fill_idle(self) -> bool:
        """After a quiet wait: queue whatever the store holds past the last event."""
        stored = await self._read_store()
        if stored is None:
            return False
        fresh = sorted(
            (e for e in stored if e.WhichOneof("body") in ("delta", "final", "failure")),
            key=lambda e: e.sequence,
        )
        self.backfilled += len(fresh)
        self._ready.extend(fresh)
        return bool(fresh)


def cache_policy(
    mode: CacheMode, sampling: chat_pb2.SamplingParams, cache_control: str
) -> CachePolicy:
    if mode is CacheMode.OFF:
        return CachePolicy(False, False)
    if mode is CacheMode.DETERMINISTIC:
        deterministic = (
            sampling.HasField("temperature") and sampling.temperature == 0
        ) or sampling.HasField("seed")
        if not deterministic:
            return CachePolicy(False, False)
    directives = {d.strip().lower() for d in cache_control.split(",")} if cache_control else set()
    return CachePolicy(lookup="no-cache" not in directives, store="no-store" not in directives)


def reserve_request(
    key: keys_pb2.ApiKeyRecord,
    request: chat_pb2.ChatRequest,
    request_id: str,
    prompt_tokens: int,
    reserve_tokens: int,
) -> limiter_pb2.ReserveRequest:
    """What the limiter must hold before any upstream cost: the prompt as counted and
    the most the answer may use, under the key's own quotas."""
    return limiter_pb2.ReserveRequest(
        request_id=request_id,
        key_id=key.key_id,
        team_id=key.team_id,
        model=request.model,
        input_tokens=prompt_tokens,
        max_output_tokens=reserve_tokens,
        tokens_per_minute=key.tokens_per_minute,
        requests_per_minute=key.requests_per_minute,
    )


def admitted_headers(
    reservation: limiter_pb2.ReserveResponse, limit_headers: LimitHeaders = rate_limit_headers
) -> dict[str, str]:
    """The rate-limit headers of an admitted request; a refusal raises ``rate_limited``."""
    headers = limit_headers(reservation.policies, reservation.denied_by)
    if not reservation.allowed:
        retry_ms = max(reservation.retry_after_ms, 1)
        raise GatewayError(
            ErrorCode.RATE_LIMITED,
            f"The '{reservation.denied_by or 'quota'}' limit of this key is used up.",
            details={"policy": reservation.denied_by, "retry_after_ms": retry_ms},
            retry_after_ms=retry_ms,
            headers=headers,
        )
    return headers


def failure_error(failure: inference_pb2.Failure, headers: dict[str, str]) -> GatewayError:
    err = SluiceError.from_proto(failure.problem)
    details = dict(err.details)
    if failure.HasField("partial_usage"):
        details["partial_usage"] = {
            "input_tokens": failure.partial_usage.input_tokens,
            "output_tokens": failure.partial_usage.output_tokens,
        }
    return GatewayError(
        err.code,
        err.detail,
        details=details,
        param=err.param,
        retry_after_ms=err.retry_after_ms,
        status_override=err.status_override,
        headers=headers,
    )


class ChatService:
    def __init__(
        self,
        *,
        settings: GatewaySettings,
        bus: Bus,
        catalog: Catalog,
        limiter: Admission,
        cache: CacheLookup,
        publisher: JetStreamPublisher,
        instruments: Instruments,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.catalog = catalog
        self.limiter = limiter
        self.cache = cache
        self.publisher = publisher
        self.instruments = instruments
        self.open_streams = 0

    # --- admission ------------------------------------------------------------------

    def _check_model(self, request: chat_pb2.ChatRequest) -> tuple[int, int]:
        """Returns (prompt tokens, output tokens to reserve) or raises."""
        model = self.catalog.model(request.model)
        if model is None:
            raise SluiceError(
                ErrorCode.MODEL_NOT_FOUND,
                f"The model '{request.model[:100]}' is not served here.",
                param="model",
            )
        prompt = tokens.count_chat(request)
        asked = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 0
        limits = {
            "prompt_tokens": prompt,
            "max_tokens": asked,
            "max_output_tokens": model.max_output_tokens,
            "context_window": model.context_window,
        }
        if asked > model.max_output_tokens:
            raise SluiceError(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"max_tokens {asked} is above this model's limit of "
                f"{model.max_output_tokens} output tokens.",
                param="max_tokens",
                details=limits,
            )
        if prompt + asked > model.context_window or prompt >= model.context_window:
            raise SluiceError(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"The prompt ({prompt} tokens) plus max_tokens ({asked}) exceeds the "
                f"context window of {model.context_window} tokens.",
                param="messages",
                details=limits,
            )
        reserve = asked or min(
            self.settings.default_max_output_tokens,
            model.max_output_tokens,
            model.context_window - prompt,
        )
        return prompt, reserve

    async def _admit(
        self,
        *,
        key: keys_pb2.ApiKeyRecord,
        request: chat_pb2.ChatRequest,
        meta: RequestMeta,
        prompt_tokens: int,
        reserve_tokens: int,
        cache_key: str,
        lookup: bool,
        semantic: SemanticQuery = NO_SEMANTIC,
    ) -> tuple[limiter_pb2.ReserveResponse, inference_pb2.Final | None]:
        reserve = reserve_request(key, request, meta.request_id, prompt_tokens, reserve_tokens)
        if not lookup:
            return await self.limiter.reserve(reserve), None
        lookup_task = asyncio.create_task(
            self.cache.lookup(cache_key, meta.request_id, semantic.text, semantic.scope)
        )
        try:
            reservation = await self.limiter.reserve(reserve)
        except BaseException:
            lookup_task.cancel()
            raise
        found = await lookup_task
        meta.cache, meta.cache_ms = found.status, found.elapsed_ms
        meta.cache_similarity = found.similarity
        return reservation, found.answer

    # --- the request ----------------------------------------------------------------

    async def complete(
        self,
        key: keys_pb2.ApiKeyRecord,
        request: chat_pb2.ChatRequest,
        meta: RequestMeta,
        *,
        dialect: Dialect = OPENAI,
        cache_control: str = "",
        instance: str = "",
        on_disconnect: DisconnectPolicy = DisconnectPolicy.CONTINUE,
        priority: PriorityClass = PriorityClass.INTERACTIVE,
        lifecycle_events: bool = False,
        semantic: bool = False,
    ) -> ChatResult:
        """A request already normalised by its front door (``to_chat_request``,
        ``anthropic_to_chat_request``), answered in ``dialect``. ``semantic``: the
        request asked for the semantic cache (``semantic_wanted``)."""
        meta.model_requested = request.model
        prompt_tokens, reserve_tokens = self._check_model(request)
        meta.prompt_tokens = prompt_tokens
        policy = cache_policy(self.settings.cache_mode, request.sampling, cache_control)
        cacheable = policy.lookup or policy.store
        cache_key = canonical.cache_key(request, scope=key.team_id) if cacheable else ""
        # Only for requests the exact cache takes, and only when asked: otherwise the
        # messages carry empty fields and nobody embeds anything.
        query = semantic_query(request, key.team_id) if semantic and cacheable else NO_SEMANTIC
        meta.cache = "miss" if policy.lookup else "bypass"

        reservation, cached = await self._admit(
            key=key,
            request=request,
            meta=meta,
            prompt_tokens=prompt_tokens,
            reserve_tokens=reserve_tokens,
            cache_key=cache_key,
            lookup=policy.lookup,
            semantic=query,
        )
        headers = admitted_headers(reservation, dialect.limit_headers)
        headers["x-sluice-cache"] = meta.cache

        if cached is not None:
            return await self._answer_from_cache(
                key=key,
                request=request,
                meta=meta,
                reservation=reservation,
                cached=cached,
                headers=headers,
                dialect=dialect,
            )

        return await self._run(
            key=key,
            request=request,
            meta=meta,
            reservation_id=reservation.reservation_id,
            store_key=cache_key if policy.store else "",
            headers=headers,
            instance=instance,
            on_disconnect=on_disconnect,
            priority=priority,
            lifecycle_events=lifecycle_events,
            semantic=query,
            dialect=dialect,
        )

    async def _answer_from_cache(
        self,
        *,
        key: keys_pb2.ApiKeyRecord,
        request: chat_pb2.ChatRequest,
        meta: RequestMeta,
        reservation: limiter_pb2.ReserveResponse,
        cached: inference_pb2.Final,
        headers: dict[str, str],
        dialect: Dialect,
    ) -> ChatResult:
        event = cost_pb2.UsageEvent(
            request_id=meta.request_id,
            key_id=key.key_id,
            team_id=key.team_id,
            model_requested=request.model,
            model_served=cached.model_served,
            provider=cached.provider,
            usage=cached.usage,
            occurred_unix_nanos=time.time_ns(),
            reservation_id=reservation.reservation_id,
            cache_hit=True,
            outcome="completed",
            trace_id=meta.trace_id,
        )
        try:
            await self.publisher.usage(event)
        except SluiceError:
            # The answer is already paid for; only the reservation must not leak.
            self.limiter.release(reservation.reservation_id, key.key_id, meta.request_id)
        if not request.stream:
            return ChatResult(headers, body=dialect.body(meta, cached, cache_hit=True))
        relay = dialect.stream(meta, include_usage=request.include_usage)
        payload = relay.replay(cached, final_sluice(meta, cached, cache_hit=True))

        async def replay() -> AsyncIterator[bytes]:
            yield payload

        return ChatResult(_sse_headers(headers), stream=replay())

    async def _run(
        self,
        *,
        key: keys_pb2.ApiKeyRecord,
        request: chat_pb2.ChatRequest,
        meta: RequestMeta,
        reservation_id: str,
        store_key: str,
        headers: dict[str, str],
        instance: str,
        on_disconnect: DisconnectPolicy = DisconnectPolicy.CONTINUE,
        priority: PriorityClass = PriorityClass.INTERACTIVE,
        lifecycle_events: bool = False,
        semantic: SemanticQuery = NO_SEMANTIC,
        dialect: Dialect = OPENAI,
    ) -> ChatResult:
        settings = self.settings
        subject = Subjects.stream(meta.request_id)
        inbox = Inbox()
        now_ns = time.time_ns()
        deadline = time.monotonic() + settings.request_timeout_seconds
        work = inference_pb2.InferenceWork(
            request_id=meta.request_id,
            key_id=key.key_id,
            team_id=key.team_id,
            request=request,
            priority=_PRIORITY_PROTO[priority],
            stream_subject=subject,
            reservation_id=reservation_id,
            enqueued_unix_nanos=now_ns,
            deadline_unix_nanos=now_ns + int(settings.request_timeout_seconds * 1e9),
            lifecycle_events=lifecycle_events,
        )
        if store_key:
            work.cache_key = store_key
            work.cache_ttl_seconds = settings.cache_ttl_seconds
            if semantic.text:
                work.semantic_text = semantic.text
                work.semantic_scope = semantic.scope

        # Sequence 0, stored before the work exists: who may resume this stream, and what
        # a replay needs to render it (ownership lives only in JetStream).
        opened = inference_pb2.StreamEvent(
            request_id=meta.request_id,
            sequence=0,
            opened=inference_pb2.StreamOpened(
                key_id=key.key_id,
                team_id=key.team_id,
                model_requested=request.model,
                created_unix=meta.created,
                stream=request.stream,
                include_usage=request.include_usage,
            ),
        )
        # The opened record is a plain publish that SLUICE_STREAMS captures, like every
        # other stream event, so only the work waits for a JetStream acknowledgement.
        # The record, the subscription and the work leave on this connection in that
        # order: the record is with the server before the work is, and published before
        # the subscription exists it is not echoed back (one message fewer per request).
        # The subscription precedes the work, since the first event can beat its ack.
        try:
            await self.bus.nc.publish(
                subject,
                opened.SerializeToString(),
                headers={"Nats-Msg-Id": f"{meta.request_id}:opened"},
            )
            sub = await self.bus.nc.subscribe(subject, cb=inbox.push)
        except NATS_FAILURES:
            self.limiter.release(reservation_id, key.key_id, meta.request_id)
            raise GatewayError(
                ErrorCode.SERVICE_UNAVAILABLE,
                "The message bus is not connected.",
                retry_after_ms=1000,
            ) from None
        try:
            await self.publisher.enqueue(work, str(priority))
        except BaseException:
            await _unsubscribe(sub)
            self.limiter.release(reservation_id, key.key_id, meta.request_id)
            raise

        reader = EventReader(inbox, deadline, backfill=self.backfill(meta.request_id))
        if not request.stream:
            try:
                body = await self._wait_final(reader, meta, headers, dialect)
                return ChatResult(headers, body=body)
            except asyncio.CancelledError:
                # The client went away while waiting for the whole answer.
                if on_disconnect is DisconnectPolicy.CANCEL:
                    await self.cancel(meta.request_id)
                raise
            finally:
                await _unsubscribe(sub)

        # Hold the status line until the first event so that a request failing before any
        # token gets a real HTTP error, not a 200 with an error event.
        try:
            first = await reader.next(settings.sse_heartbeat_seconds)
        except DeadlineExceeded:
            await _unsubscribe(sub)
            raise _timeout_error(headers) from None
        except BaseException:
            await _unsubscribe(sub)
            if on_disconnect is DisconnectPolicy.CANCEL:
                await self.cancel(meta.request_id)
            raise
        if first is not None and first.HasField("failure"):
            await _unsubscribe(sub)
            raise failure_error(first.failure, headers)
        relay = dialect.stream(meta, include_usage=request.include_usage)
        return ChatResult(
            _sse_headers(headers),
            stream=self.relay(
                sub=sub,
                reader=reader,
                relay=relay,
                meta=meta,
                first=first,
                instance=instance,
                on_disconnect=on_disconnect,
                render_error=dialect.error,
            ),
        )

    async def _wait_final(
        self, reader: EventReader, meta: RequestMeta, headers: dict[str, str], dialect: Dialect
    ) -> bytes:
        while True:
            try:
                # Quiet for a heartbeat's time: the reader looks in the store, then waits on.
                event = await reader.next(self.settings.sse_heartbeat_seconds)
            except DeadlineExceeded:
                raise _timeout_error(headers) from None
            finally:
                self._count_backfilled(reader)
            if event is None:
                continue
            if event.HasField("final"):
                return dialect.body(meta, event.final, cache_hit=False)
            if event.HasField("failure"):
                raise failure_error(event.failure, headers)

    async def relay(
        self,
        *,
        sub: Subscription,
        reader: EventReader,
        relay: StreamRenderer,
        meta: RequestMeta,
        first: inference_pb2.StreamEvent | None,
        instance: str,
        prelude: bytes = b"",
        on_disconnect: DisconnectPolicy = DisconnectPolicy.CONTINUE,
        wait_first: bool = False,
        render_error: ErrorRenderer = render_problem,
    ) -> AsyncIterator[bytes]:
        """The SSE body: the ``retry:`` hint, ``prelude`` (events replayed to a resuming
        client), then the live events until the terminal one, with heartbeats while idle.
        A client that leaves early under the ``cancel`` policy cancels the generation.
        ``render_error`` writes the body of a mid-stream ``error`` event."""
        self.open_streams += 1
        self.instruments.open_streams.add(1)
        heartbeat = self.settings.sse_heartbeat_seconds
        ended = False
        try:
            # The retry hint rides on the first event that carries data.
            hint = sse_retry(self.settings.sse_retry_ms)
            if prelude:
                yield hint + prelude
                hint = b""
            event = first
            # With wait_first (a resumed stream) the first wait is for an event, and a
            # heartbeat only follows if none comes.
            read = first is None and wait_first
            while True:
                if read:
                    try:
                        event = await reader.next(heartbeat)
                    except DeadlineExceeded:
                        ended = True
                        err = _timeout_error({})
                        problem = self.stream_problem(err, meta, instance, render_error)
                        yield hint + relay.failure(reader.last_sequence + 1, problem)
                        return
                read = True
                if event is None:
                    yield relay.heartbeat()
                    continue
                # The events already here go out in one write: nothing waits for them,
                # and a burst costs one send instead of one per event.
                out = [hint]
                hint = b""
                while True:
                    pending: inference_pb2.StreamEvent | None = None
                    if event.HasField("delta"):
                        if meta.ttft_ms is None:
                            meta.ttft_ms = (time.perf_counter() - meta.started) * 1000
                        event, pending = await self._batch(reader, event)
                        out.append(relay.delta(event.sequence, event.delta))
                    elif event.HasField("final"):
                        ended = True
                        sluice = final_sluice(meta, event.final, cache_hit=False)
                        out.append(relay.final(event.sequence, event.final, sluice))
                        break
                    elif event.HasField("failure"):
                        ended = True
                        err = failure_error(event.failure, {})
                        problem = self.stream_problem(err, meta, instance, render_error)
                        out.append(relay.failure(event.sequence, problem))
                        break
                    if pending is not None:
                        event = pending
                        continue
                    if len(out) > _COALESCE_MAX_EVENTS or not reader.has_ready():
                        break
                    ready = await reader.next(0.0, look_in_store=False)
                    if ready is None:
                        break
                    event = ready
                yield b"".join(out)
                if ended:
                    return
        finally:
            self._count_backfilled(reader)
            self.open_streams -= 1
            self.instruments.open_streams.add(-1)
            await _unsubscribe(sub)
            if not ended and on_disconnect is DisconnectPolicy.CANCEL:
                await self.cancel(meta.request_id)

    async def _batch(
        self, reader: EventReader, event: inference_pb2.StreamEvent
    ) -> tuple[inference_pb2.StreamEvent, inference_pb2.StreamEvent | None]:
        """Token batching: merges the text deltas that follow ``event`` (same choice) up
        to ``sse_batch_max_deltas`` or ``sse_batch_max_ms``. Returns the event to send
        and the first event read that could not be merged."""
        limit = self.settings.sse_batch_max_deltas
        if limit <= 1 or not mergeable(event.delta):
            return event, None
        until = time.monotonic() + self.settings.sse_batch_max_ms / 1000
        merged: inference_pb2.StreamEvent | None = None
        count = 1
        while count < limit:
            try:
                nxt = await reader.next(max(0.0, until - time.monotonic()), look_in_store=False)
            except DeadlineExceeded:
                break
            if nxt is None:
                break
            if not (nxt.HasField("delta") and can_join(event.delta, nxt.delta)):
                return merged or event, nxt
            if merged is None:
                merged = inference_pb2.StreamEvent()
                merged.CopyFrom(event)
            merged.delta.content += nxt.delta.content
            merged.sequence = nxt.sequence
            count += 1
        return merged or event, None

    def backfill(self, request_id: str) -> Backfill:
        """Reads the events ``SLUICE_STREAMS`` holds for ``request_id`` after a sequence."""
        bus = self.bus
        wait = self.settings.resume_read_timeout_seconds

        async def stored_after(sequence: int) -> list[inference_pb2.StreamEvent]:
            events = await read_events(bus, request_id, wait_seconds=wait)
            return [e for e in events or () if e.sequence > sequence]

        return stored_after

    def _count_backfilled(self, reader: EventReader) -> None:
        if reader.backfilled:
            self.instruments.stream_backfilled.add(reader.backfilled)
            reader.backfilled = 0

    async def cancel(self, request_id: str) -> None:
        """Ask the worker running ``request_id`` (or the next to pick it up) to stop."""
        with contextlib.suppress(*NATS_FAILURES):
            await self.bus.nc.publish(Subjects.cancel(request_id), b"client_disconnected")

    def stream_problem(
        self,
        err: SluiceError,
        meta: RequestMeta,
        instance: str,
        render_error: ErrorRenderer = render_problem,
    ) -> bytes:
        self.instruments.errors.add(1, {"code": str(err.code), "service": SERVICE})
        return render_error(
            err, instance=instance, request_id=meta.request_id, trace_id=meta.trace_id
        )


def _timeout_error(headers: dict[str, str]) -> GatewayError:
    return GatewayError(
        ErrorCode.UPSTREAM_TIMEOUT,
        "No answer arrived before the request deadline.",
        headers=headers,
    )


SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _sse_headers(headers: dict[str, str]) -> dict[str, str]:
    headers.update(SSE_HEADERS)
    return headers


async def _unsubscribe(sub: Subscription) -> None:
    with contextlib.suppress(*NATS_FAILURES):
        await sub.unsubscribe()
