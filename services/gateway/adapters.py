"""The gateway's NATS conversations: limiter, cache, work queue, usage stream, health."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NamedTuple, Protocol

import nats.errors
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from sluice import telemetry
from sluice.bus import Bus
from sluice.cache.v1 import cache_pb2
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.inference.v1 import inference_pb2
from sluice.limiter.v1 import limiter_pb2
from sluice.topology import ALL_SERVICES, Subjects

from services.gateway.problems import unavailable

log = logging.getLogger(__name__)

# What "the other side did not answer" looks like from nats-py.
NATS_FAILURES = (TimeoutError, nats.errors.Error)


class Admission(Protocol):
    """What the request path needs of the limiter (``Limiter``, or ``LeasingLimiter``
    in front of it)."""

    async def reserve(self, request: limiter_pb2.ReserveRequest) -> limiter_pb2.ReserveResponse: ...

    def release(self, reservation_id: str, key_id: str, request_id: str) -> None: ...

    async def drain(self) -> None: ...


class Limiter:
    def __init__(self, bus: Bus, timeout: float) -> None:
        self._bus = bus
        self._timeout = timeout
        self._background: set[asyncio.Task[None]] = set()

    async def reserve(self, request: limiter_pb2.ReserveRequest) -> limiter_pb2.ReserveResponse:
        try:
            return await self._bus.request(
                Subjects.LIMITER_RESERVE,
                request,
                limiter_pb2.ReserveResponse,
                timeout=self._timeout,
            )
        except NATS_FAILURES as exc:
            # Fail closed: without the limiter nobody knows what a request may spend.
            log.warning("limiter reserve failed: %s", type(exc).__name__)
            raise unavailable("The rate limiter did not answer.") from None

    def release(self, reservation_id: str, key_id: str, request_id: str) -> None:
        """Give back a reservation that will not be used, off the response path."""
        if not reservation_id:
            return
        commit = limiter_pb2.CommitRequest(
            reservation_id=reservation_id,
            key_id=key_id,
            actual=chat_pb2.Usage(),
            request_id=request_id,
        )
        self._in_background(commit, "releasing reservation")

    def close_lease(
        self, lease_id: str, key_id: str, unused_tokens: int, unused_requests: int
    ) -> None:
        """Hand back what an admission lease never admitted, off the response path."""
        commit = limiter_pb2.CommitRequest(
            reservation_id=lease_id,
            key_id=key_id,
            close_lease=True,
            unused_tokens=unused_tokens,
            unused_requests=unused_requests,
        )
        self._in_background(commit, "closing a lease")

    def _in_background(self, commit: limiter_pb2.CommitRequest, what: str) -> None:
        task = asyncio.create_task(self._commit(commit, what))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _commit(self, commit: limiter_pb2.CommitRequest, what: str) -> None:
        try:
            await self._bus.request(
                Subjects.LIMITER_COMMIT, commit, limiter_pb2.CommitResponse, timeout=self._timeout
            )
        except NATS_FAILURES as exc:
            log.warning("%s failed: %s", what, type(exc).__name__)

    async def drain(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


class CacheResult(NamedTuple):
    """``status``: hit, semantic-hit, miss, or error (a silent cache, treated as a miss)."""

    status: str
    answer: inference_pb2.Final | None
    elapsed_ms: float
    # Of a semantic hit: cosine similarity of the stored text to this request's.
    similarity: float | None = None


class CacheLookup:
    def __init__(self, bus: Bus, timeout: float) -> None:
        self._bus = bus
        self._timeout = timeout

    async def lookup(
        self,
        cache_key: str,
        request_id: str,
        semantic_text: str = "",
        semantic_scope: str = "",
    ) -> CacheResult:
        """Exact lookup; with a semantic text and scope the cache also looks for an
        answer to a paraphrase after an exact miss."""
        started = time.perf_counter()
        try:
            reply = await self._bus.request(
                Subjects.CACHE_LOOKUP,
                cache_pb2.LookupRequest(
                    cache_key=cache_key,
                    request_id=request_id,
                    semantic_text=semantic_text,
                    semantic_scope=semantic_scope,
                ),
                cache_pb2.LookupResponse,
                timeout=self._timeout,
            )
        except NATS_FAILURES as exc:
            log.warning("cache lookup failed: %s", type(exc).__name__)
            return CacheResult("error", None, (time.perf_counter() - started) * 1000)
        elapsed = (time.perf_counter() - started) * 1000
        if reply.hit and reply.HasField("answer"):
            if reply.semantic:
                return CacheResult("semantic-hit", reply.answer, elapsed, reply.similarity)
            return CacheResult("hit", reply.answer, elapsed)
        return CacheResult("miss", None, elapsed)


class JetStreamPublisher:
    """Durable publishes with ``Nats-Msg-Id`` dedup, in PRODUCER spans with trace context."""

    def __init__(self, bus: Bus, timeout: float) -> None:
        self._bus = bus
        self._timeout = timeout
        self._tracer = trace.get_tracer("sluice.gateway")

    async def publish(
        self, subject: str, payload: bytes, msg_id: str, *, destination: str = ""
    ) -> None:
        """``destination`` names the span when the subject holds an id (span names stay
        low-cardinality, as the messaging conventions ask)."""
        with self._tracer.start_as_current_span(
            f"{destination or subject} publish",
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
                await self._bus.js.publish(subject, payload, timeout=self._timeout, headers=headers)
            except NATS_FAILURES as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                log.warning("publish to %s failed: %s", subject, type(exc).__name__)
                raise unavailable("The work queue did not accept the request.") from None

    async def enqueue(self, work: inference_pb2.InferenceWork, priority: str) -> None:
        await self.publish(Subjects.infer(priority), work.SerializeToString(), work.request_id)

    async def usage(self, event: cost_pb2.UsageEvent) -> None:
        await self.publish(
            Subjects.usage(event.key_id), event.SerializeToString(), event.request_id
        )


class Readiness:
    """Asks every service over NATS whether it is ready; answers are reused for a second."""

    def __init__(self, bus: Bus, cache_seconds: float, timeout: float = 0.5) -> None:
        self._bus = bus
        self._cache_seconds = cache_seconds
        self._timeout = timeout
        self._checked_at = -1e9
        self._last: dict[str, bool] = {}
        self._lock = asyncio.Lock()

    async def _ask(self, service: str) -> bool:
        try:
            # Raw request, no span: probes would bury the request traces.
            reply = await self._bus.nc.request(Subjects.health(service), b"", timeout=self._timeout)
        except NATS_FAILURES:
            return False
        status = chat_pb2.ServiceStatus()
        status.ParseFromString(reply.data)
        return status.ready

    async def check(self) -> dict[str, bool]:
        async with self._lock:
            now = time.monotonic()
            if now - self._checked_at < self._cache_seconds:
                return self._last
            if not self._bus.nc.is_connected:
                result = {str(s): False for s in ALL_SERVICES}
            else:
                answers = await asyncio.gather(*(self._ask(str(s)) for s in ALL_SERVICES))
                result = {str(s): ok for s, ok in zip(ALL_SERVICES, answers, strict=True)}
            self._last = result
            self._checked_at = time.monotonic()
            return result
