"""gRPC ``sluice.cache.v1.CacheAdminService``: statistics and invalidation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from sluice import telemetry
from sluice.cache.v1 import cache_pb2, cache_pb2_grpc

from services.cache.handlers import CacheHandlers


class CacheAdminServicer(cache_pb2_grpc.CacheAdminServiceServicer):
    def __init__(self, handlers: Callable[[], CacheHandlers | None]) -> None:
        self._get_handlers = handlers
        self._tracer = trace.get_tracer("sluice.cache.grpc")

    async def _handlers(self, context: Any) -> CacheHandlers:
        handlers = self._get_handlers()
        if handlers is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "cache is starting")
        assert handlers is not None  # abort raises
        return handlers

    def _span(self, method: str, context: Any) -> trace.Span:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        return self._tracer.start_span(
            f"sluice.cache.v1.CacheAdminService/{method}",
            context=telemetry.extract(metadata),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc"},
        )

    async def Stats(self, request: cache_pb2.StatsRequest, context: Any) -> cache_pb2.StatsResponse:
        """Lookups, hits and stores of this instance since start; entries in the bucket."""
        with trace.use_span(self._span("Stats", context), end_on_exit=True):
            handlers = await self._handlers(context)
            stats = handlers.stats
            return cache_pb2.StatsResponse(
                lookups=stats.lookups,
                hits=stats.hits,
                stores=stats.stores,
                entries=await handlers.store.count(),
                semantic_lookups=stats.semantic_lookups,
                semantic_hits=stats.semantic_hits,
            )

    async def Invalidate(
        self, request: cache_pb2.InvalidateRequest, context: Any
    ) -> cache_pb2.InvalidateResponse:
        """Remove one entry, or every entry when ``cache_key`` is empty (with their
        semantic points)."""
        with trace.use_span(self._span("Invalidate", context), end_on_exit=True) as span:
            handlers = await self._handlers(context)
            removed = await handlers.invalidate(request.cache_key)
            span.set_attribute("sluice.cache.removed", removed)
            return cache_pb2.InvalidateResponse(removed=removed)
