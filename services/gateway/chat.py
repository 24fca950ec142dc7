"""One chat completion through the data path: validate against the catalogue, count
tokens, reserve and look up the cache concurrently, then answer from the cache or
enqueue the work and relay the worker's stream events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from nats.aio.subscription import Subscription
from sluice import canonical, tokens
from sluice.bus import Bus
from sluice.catalog import Catalog
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2
from sluice.keys.v1 import keys_pb2
from sluice.limiter.v1 import limiter_pb2
from sluice.metrics import Instruments
from sluice.topology import PriorityClass, Subjects

from services.gateway.adapters import NATS_FAILURES, CacheLookup, JetStreamPublisher, Limiter
from services.gateway.inbox import Inbox
from services.gateway.models import ChatCompletionRequest
from services.gateway.normalize import to_chat_request
from services.gateway.problems import GatewayError, render_problem
from services.gateway.ratelimit import rate_limit_headers
from services.gateway.render import (
    SSE_HEARTBEAT,
    RequestMeta,
    SseRelay,
    completion_body,
    final_sluice,
)
from services.gateway.settings import CacheMode, GatewaySettings

log = logging.getLogger(__name__)

SERVICE = "gateway"


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


@dataclass
class EventReader:
    """Reads one request's stream events: drops duplicate and stale deltas, accepts the
    first terminal event whatever its sequence (a redelivered worker restarts at 1)."""

    inbox: Inbox
    deadline: float
    last_sequence: int = 0
    _seen_terminal: bool = field(default=False)

    async def next(self, max_wait: float) -> inference_pb2.StreamEvent | None:
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded
            msg = await self.inbox.get(min(remaining, max_wait))
            if msg is None:
                if time.monotonic() >= self.deadline:
                    raise DeadlineExceeded
                return None
            event = inference_pb2.StreamEvent()
            try:
                event.ParseFromString(msg.data)
            except DecodeError:
                log.warning("undecodable stream event dropped")
                continue
            if event.HasField("delta"):
                if event.sequence <= self.last_sequence:
                    continue
                self.last_sequence = event.sequence
            elif self._seen_terminal:
                continue
            else:
                self._seen_terminal = True
            return event


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
        limiter: Limiter,
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
    ) -> tuple[limiter_pb2.ReserveResponse, inference_pb2.Final | None]:
        reserve = limiter_pb2.ReserveRequest(
            request_id=meta.request_id,
            key_id=key.key_id,
            team_id=key.team_id,
            model=request.model,
            input_tokens=prompt_tokens,
            max_output_tokens=reserve_tokens,
            tokens_per_minute=key.tokens_per_minute,
            requests_per_minute=key.requests_per_minute,
        )
        if not lookup:
            return await self.limiter.reserve(reserve), None
        lookup_task = asyncio.create_task(self.cache.lookup(cache_key, meta.request_id))
        try:
            reservation = await self.limiter.reserve(reserve)
        except BaseException:
            lookup_task.cancel()
            raise
        status, answer, elapsed_ms = await lookup_task
        meta.cache, meta.cache_ms = status, elapsed_ms
        return reservation, answer

    # --- the request ----------------------------------------------------------------

    async def complete(
        self,
        key: keys_pb2.ApiKeyRecord,
        body: ChatCompletionRequest,
        meta: RequestMeta,
        *,
        cache_control: str = "",
        instance: str = "",
    ) -> ChatResult:
        request = to_chat_request(body)
        meta.model_requested = request.model
        prompt_tokens, reserve_tokens = self._check_model(request)
        policy = cache_policy(self.settings.cache_mode, request.sampling, cache_control)
        cache_key = (
            canonical.cache_key(request, scope=key.team_id) if policy.lookup or policy.store else ""
        )
        meta.cache = "miss" if policy.lookup else "bypass"

        reservation, cached = await self._admit(
            key=key,
            request=request,
            meta=meta,
            prompt_tokens=prompt_tokens,
            reserve_tokens=reserve_tokens,
            cache_key=cache_key,
            lookup=policy.lookup,
        )
        headers = rate_limit_headers(reservation.policies, reservation.denied_by)
        if not reservation.allowed:
            retry_ms = max(reservation.retry_after_ms, 1)
            raise GatewayError(
                ErrorCode.RATE_LIMITED,
                f"The '{reservation.denied_by or 'quota'}' limit of this key is used up.",
                details={"policy": reservation.denied_by, "retry_after_ms": retry_ms},
                retry_after_ms=retry_ms,
                headers=headers,
            )
        headers["x-sluice-cache"] = meta.cache

        if cached is not None:
            return await self._answer_from_cache(
                key=key,
                request=request,
                meta=meta,
                reservation=reservation,
                cached=cached,
                headers=headers,
            )

        return await self._run(
            key=key,
            request=request,
            meta=meta,
            reservation_id=reservation.reservation_id,
            store_key=cache_key if policy.store else "",
            headers=headers,
            instance=instance,
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
            return ChatResult(headers, body=completion_body(meta, cached, cache_hit=True))
        relay = SseRelay(meta, include_usage=request.include_usage)
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
            priority=chat_pb2.PRIORITY_INTERACTIVE,
            stream_subject=subject,
            reservation_id=reservation_id,
            enqueued_unix_nanos=now_ns,
            deadline_unix_nanos=now_ns + int(settings.request_timeout_seconds * 1e9),
        )
        if store_key:
            work.cache_key = store_key
            work.cache_ttl_seconds = settings.cache_ttl_seconds

        # Subscribe before publishing: the first event can beat the publish ack.
        try:
            sub = await self.bus.nc.subscribe(subject, cb=inbox.push)
        except NATS_FAILURES:
            self.limiter.release(reservation_id, key.key_id, meta.request_id)
            raise GatewayError(
                ErrorCode.SERVICE_UNAVAILABLE,
                "The message bus is not connected.",
                retry_after_ms=1000,
            ) from None
        try:
            await self.publisher.enqueue(work, str(PriorityClass.INTERACTIVE))
        except BaseException:
            await _unsubscribe(sub)
            self.limiter.release(reservation_id, key.key_id, meta.request_id)
            raise

        reader = EventReader(inbox, deadline)
        if not request.stream:
            try:
                return ChatResult(headers, body=await self._wait_final(reader, meta, headers))
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
            raise
        if first is not None and first.HasField("failure"):
            await _unsubscribe(sub)
            raise failure_error(first.failure, headers)
        relay = SseRelay(meta, include_usage=request.include_usage)
        return ChatResult(
            _sse_headers(headers),
            stream=self._relay(
                sub=sub, reader=reader, relay=relay, meta=meta, first=first, instance=instance
            ),
        )

    async def _wait_final(
        self, reader: EventReader, meta: RequestMeta, headers: dict[str, str]
    ) -> bytes:
        while True:
            try:
                event = await reader.next(3600.0)
            except DeadlineExceeded:
                raise _timeout_error(headers) from None
            if event is None:
                continue
            if event.HasField("final"):
                return completion_body(meta, event.final, cache_hit=False)
            if event.HasField("failure"):
                raise failure_error(event.failure, headers)

    async def _relay(
        self,
        *,
        sub: Subscription,
        reader: EventReader,
        relay: SseRelay,
        meta: RequestMeta,
        first: inference_pb2.StreamEvent | None,
        instance: str,
    ) -> AsyncIterator[bytes]:
        self.open_streams += 1
        self.instruments.open_streams.add(1)
        heartbeat = self.settings.sse_heartbeat_seconds
        try:
            event = first
            while True:
                if event is None:
                    yield SSE_HEARTBEAT
                elif event.HasField("delta"):
                    if meta.ttft_ms is None:
                        meta.ttft_ms = (time.perf_counter() - meta.started) * 1000
                    yield relay.delta(event.sequence, event.delta)
                elif event.HasField("final"):
                    sluice = final_sluice(meta, event.final, cache_hit=False)
                    yield relay.final(event.sequence, event.final, sluice)
                    return
                elif event.HasField("failure"):
                    err = failure_error(event.failure, {})
                    yield relay.failure(event.sequence, self._stream_problem(err, meta, instance))
                    return
                try:
                    event = await reader.next(heartbeat)
                except DeadlineExceeded:
                    err = _timeout_error({})
                    problem = self._stream_problem(err, meta, instance)
                    yield relay.failure(reader.last_sequence + 1, problem)
                    return
        finally:
            self.open_streams -= 1
            self.instruments.open_streams.add(-1)
            await _unsubscribe(sub)

    def _stream_problem(self, err: SluiceError, meta: RequestMeta, instance: str) -> bytes:
        self.instruments.errors.add(1, {"code": str(err.code), "service": SERVICE})
        return render_problem(
            err, instance=instance, request_id=meta.request_id, trace_id=meta.trace_id
        )


def _timeout_error(headers: dict[str, str]) -> GatewayError:
    return GatewayError(
        ErrorCode.UPSTREAM_TIMEOUT,
        "No answer arrived before the request deadline.",
        headers=headers,
    )


def _sse_headers(headers: dict[str, str]) -> dict[str, str]:
    headers["cache-control"] = "no-cache"
    headers["x-accel-buffering"] = "no"
    return headers


async def _unsubscribe(sub: Subscription) -> None:
    with contextlib.suppress(*NATS_FAILURES):
        await sub.unsubscribe()
