"""The cache service's lookup over NATS request/reply.

A cache that does not answer costs a request nothing but its lookup's budget, run beside
admission: a dead cache answers "no responders" at once, a hung one (alive, not
replying) costs the budget. After ``skip_after`` lookups in a row ran out of budget the
client stops asking for ``skip_seconds`` (each request is then answered without a
lookup, as a failed one), lets one lookup through, and stops again if that one fails
too: a hung cache costs a few requests the budget, not every request.
"""

from __future__ import annotations

import logging
import time
from typing import Any, TypeVar

from google.protobuf.message import Message
from sluice.bus import NATS_FAILURES, Bus
from sluice.cache.v1 import cache_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.topology import Subjects

from services.gateway.domain.console import CacheCounters
from services.gateway.domain.ports import CacheResult

R = TypeVar("R", bound=Message)

log = logging.getLogger(__name__)


class CacheClient:
    def __init__(
        self,
        bus: Bus,
        timeout: float,
        *,
        skip_after: int = 3,
        skip_seconds: float = 5.0,
    ) -> None:
        self._bus = bus
        self._timeout = timeout
        self._skip_after = skip_after
        self._skip_seconds = skip_seconds
        self._timeouts = 0
        self._skip_until = 0.0

    @property
    def skipping(self) -> bool:
        return time.monotonic() < self._skip_until

    async def lookup(
        self, cache_key: str, request_id: str, semantic_text: str = "", semantic_scope: str = ""
    ) -> CacheResult:
        if self.skipping:
            return CacheResult("error", None, 0.0)
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
        except TimeoutError:
            self._timeouts += 1
            if self._skip_after and self._timeouts >= self._skip_after:
                # The next lookup after the pause is a probe: one more timeout pauses again.
                self._timeouts = self._skip_after - 1
                self._skip_until = time.monotonic() + self._skip_seconds
                log.warning(
                    "cache lookups ran out of budget %d times in a row: not asked for %.1fs",
                    self._skip_after,
                    self._skip_seconds,
                )
            return CacheResult("error", None, (time.perf_counter() - started) * 1000)
        except NATS_FAILURES as exc:
            log.warning("cache lookup failed: %s", type(exc).__name__)
            return CacheResult("error", None, (time.perf_counter() - started) * 1000)
        self._timeouts = 0
        elapsed = (time.perf_counter() - started) * 1000
        if reply.hit and reply.HasField("answer"):
            if reply.semantic:
                return CacheResult("semantic-hit", reply.answer, elapsed, reply.similarity)
            return CacheResult("hit", reply.answer, elapsed)
        return CacheResult("miss", None, elapsed)


class CacheAdminClient:
    """The cache's statistics and invalidation over NATS request/reply (any instance
    answers: counters are that instance's since its start, entries the shared bucket's)."""

    def __init__(self, bus: Bus, timeout: float) -> None:
        self._bus = bus
        self._timeout = timeout

    async def _ask(self, subject: str, request: Any, reply_type: type[R]) -> R:
        try:
            return await self._bus.request(subject, request, reply_type, timeout=self._timeout)
        except (TimeoutError, *NATS_FAILURES):
            raise SluiceError(
                ErrorCode.SERVICE_UNAVAILABLE,
                "The cache service did not answer; try again in a moment.",
                retry_after_ms=1000,
            ) from None

    async def stats(self) -> CacheCounters:
        reply = await self._ask(
            Subjects.CACHE_STATS, cache_pb2.StatsRequest(), cache_pb2.StatsResponse
        )
        return CacheCounters(
            lookups=reply.lookups,
            hits=reply.hits,
            stores=reply.stores,
            entries=reply.entries,
            semantic_lookups=reply.semantic_lookups,
            semantic_hits=reply.semantic_hits,
        )

    async def invalidate(self, cache_key: str) -> int:
        reply = await self._ask(
            Subjects.CACHE_INVALIDATE,
            cache_pb2.InvalidateRequest(cache_key=cache_key),
            cache_pb2.InvalidateResponse,
        )
        return reply.removed
