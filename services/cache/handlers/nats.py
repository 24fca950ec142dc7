"""The cache on NATS: lookup (request/reply) and store (plain publish), queue group
``cache``.

A lookup that carries a semantic text and scope goes on to the semantic index after an
exact miss. That work (an embedding, a Qdrant search) takes milliseconds, and a NATS
subscription runs its callback one message at a time, so such a lookup is answered
from a task of its own: exact lookups behind it are not held up.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.msg import Msg
from opentelemetry import trace
from sluice.bus import Bus
from sluice.cache.v1 import cache_pb2
from sluice.topology import Subjects

from services.cache.domain import Cache

QUEUE = "cache"
tracer = trace.get_tracer("sluice.cache")


class CacheHandlers:
    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self._replies: set[asyncio.Task[Any]] = set()

    async def lookup(
        self, request: cache_pb2.LookupRequest, msg: Msg
    ) -> cache_pb2.LookupResponse | None:
        """Exact lookups answer inline; semantic ones reply from a task."""
        if not msg.reply or not self.cache.wants_semantic(request):
            return await self.cache.lookup(request)

        async def reply() -> None:
            # The bus's span ends when this handler returns; the reply gets its own.
            with tracer.start_as_current_span("sluice.v1.cache.lookup semantic"):
                response = await self.cache.lookup(request)
            await msg.respond(response.SerializeToString())

        task = asyncio.create_task(reply())
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)
        return None

    async def store(self, request: cache_pb2.StoreRequest, _msg: Msg) -> None:
        await self.cache.store_answer(request)

    async def stats(self, _request: cache_pb2.StatsRequest, _msg: Msg) -> cache_pb2.StatsResponse:
        """This instance's counters since start, and the entries in the bucket."""
        stats = self.cache.stats
        return cache_pb2.StatsResponse(
            lookups=stats.lookups,
            hits=stats.hits,
            stores=stats.stores,
            entries=await self.cache.store.count(),
            semantic_lookups=stats.semantic_lookups,
            semantic_hits=stats.semantic_hits,
        )

    async def invalidate(
        self, request: cache_pb2.InvalidateRequest, _msg: Msg
    ) -> cache_pb2.InvalidateResponse:
        """One entry (with its semantic point), or every entry for an empty key."""
        return cache_pb2.InvalidateResponse(removed=await self.cache.invalidate(request.cache_key))

    async def serve(self, bus: Bus) -> None:
        await bus.serve(Subjects.CACHE_LOOKUP, cache_pb2.LookupRequest, self.lookup, queue=QUEUE)
        await bus.serve(Subjects.CACHE_STORE, cache_pb2.StoreRequest, self.store, queue=QUEUE)
        await bus.serve(Subjects.CACHE_STATS, cache_pb2.StatsRequest, self.stats, queue=QUEUE)
        await bus.serve(
            Subjects.CACHE_INVALIDATE, cache_pb2.InvalidateRequest, self.invalidate, queue=QUEUE
        )

    async def finish(self) -> None:
        """Wait for the semantic replies still running (part of a graceful stop)."""
        if self._replies:
            await asyncio.gather(*self._replies, return_exceptions=True)
