"""NATS handlers of the cache: lookup (request/reply) and store (plain publish)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from nats.aio.msg import Msg
from opentelemetry import metrics, trace
from sluice.cache.v1 import cache_pb2

from services.cache.domain import (
    CacheStats,
    EntryStore,
    age_if_fresh,
    decode_entry,
    effective_ttl,
    encode_entry,
    valid_key,
)

log = logging.getLogger(__name__)

Clock = Callable[[], int]


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class CacheHandlers:
    def __init__(
        self,
        store: EntryStore,
        *,
        default_ttl_seconds: int,
        max_ttl_seconds: int,
        clock: Clock = wall_ms,
    ) -> None:
        self.store = store
        self.default_ttl_seconds = default_ttl_seconds
        self.max_ttl_seconds = max_ttl_seconds
        self.clock = clock
        self.stats = CacheStats()
        # Plain counts on the hot path, read by an observable counter at collection time
        # (an OpenTelemetry Counter.add per lookup costs tens of microseconds of CPU).
        self.results: Counter[str] = Counter()
        # Deletions of expired entries run beside the reply, not before it.
        self._cleanups: set[asyncio.Task[None]] = set()

    async def lookup(
        self, request: cache_pb2.LookupRequest, _msg: Msg | None = None
    ) -> cache_pb2.LookupResponse:
        """One KV get; a hit returns the stored answer and its age."""
        self.stats.lookups += 1
        result, reply = await self._lookup(request.cache_key)
        trace.get_current_span().set_attribute("sluice.cache.result", result)
        self.results[result] += 1
        if reply.hit:
            self.stats.hits += 1
        return reply

    async def _lookup(self, key: str) -> tuple[str, cache_pb2.LookupResponse]:
        if not valid_key(key):
            return "miss", cache_pb2.LookupResponse(hit=False)
        found = await self.store.get(key)
        if found is None:
            return "miss", cache_pb2.LookupResponse(hit=False)
        data, revision = found
        entry = decode_entry(data)
        age = age_if_fresh(entry, self.clock()) if entry is not None else None
        if entry is None or age is None:
            self._cleanup(key, revision)
            return "expired" if entry is not None else "miss", cache_pb2.LookupResponse(hit=False)
        return "hit", cache_pb2.LookupResponse(hit=True, answer=entry.answer, age_seconds=age)

    def _cleanup(self, key: str, revision: int) -> None:
        task = asyncio.create_task(self.store.delete_if_unchanged(key, revision))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    def register_metrics(self, meter: metrics.Meter | None = None) -> None:
        def observe(_options: metrics.CallbackOptions) -> list[metrics.Observation]:
            return [metrics.Observation(n, {"result": r}) for r, n in list(self.results.items())]

        (meter or metrics.get_meter("sluice.cache")).create_observable_counter(
            "sluice.cache.lookups",
            callbacks=[observe],
            unit="{lookup}",
            description="Exact-cache lookups by result (hit, miss, expired)",
        )

    async def store_answer(self, request: cache_pb2.StoreRequest, _msg: Msg | None = None) -> None:
        """Write (or overwrite) the entry for a cache key; invalid requests are dropped."""
        if not valid_key(request.cache_key) or not request.HasField("answer"):
            log.warning("cache store ignored: invalid key or no answer")
            return
        ttl = effective_ttl(request.ttl_seconds, self.default_ttl_seconds, self.max_ttl_seconds)
        await self.store.put(request.cache_key, encode_entry(request.answer, self.clock(), ttl))
        self.stats.stores += 1
        trace.get_current_span().set_attribute("sluice.cache.ttl_seconds", ttl)

    async def finish(self) -> None:
        """Wait for expired-entry deletions still running (part of a graceful stop)."""
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
