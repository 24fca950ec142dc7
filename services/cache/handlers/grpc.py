"""gRPC ``sluice.cache.v1.CacheAdminService``: statistics and invalidation, for operators
(behind the shared edge's service token, like every RPC)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry import trace
from sluice.cache.v1 import cache_pb2, cache_pb2_grpc
from sluice.errors import ErrorCode, SluiceError

from services.cache.domain import Cache


class CacheAdminServicer(cache_pb2_grpc.CacheAdminServiceServicer):
    def __init__(self, cache: Callable[[], Cache | None]) -> None:
        self._get_cache = cache

    def _cache(self) -> Cache:
        cache = self._get_cache()
        if cache is None:
            raise SluiceError(ErrorCode.SERVICE_UNAVAILABLE, "The cache is starting.")
        return cache

    async def Stats(self, request: cache_pb2.StatsRequest, context: Any) -> cache_pb2.StatsResponse:
        """Lookups, hits and stores of this instance since start; entries in the bucket."""
        cache = self._cache()
        stats = cache.stats
        return cache_pb2.StatsResponse(
            lookups=stats.lookups,
            hits=stats.hits,
            stores=stats.stores,
            entries=await cache.store.count(),
            semantic_lookups=stats.semantic_lookups,
            semantic_hits=stats.semantic_hits,
        )

    async def Invalidate(
        self, request: cache_pb2.InvalidateRequest, context: Any
    ) -> cache_pb2.InvalidateResponse:
        """Remove one entry, or every entry when ``cache_key`` is empty (with their
        semantic points)."""
        removed = await self._cache().invalidate(request.cache_key)
        trace.get_current_span().set_attribute("sluice.cache.removed", removed)
        return cache_pb2.InvalidateResponse(removed=removed)


def cache_admin_service(cache: Callable[[], Cache | None]) -> Callable[[grpc.aio.Server], None]:
    """Registers ``CacheAdminService``. The gRPC server starts before the KV handle
    exists: the servicer reads the cache when called and answers UNAVAILABLE until it is
    in place."""

    def register(server: grpc.aio.Server) -> None:
        cache_pb2_grpc.add_CacheAdminServiceServicer_to_server(CacheAdminServicer(cache), server)

    return register
