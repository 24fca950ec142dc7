"""Wiring of the cache: settings -> KV entry store and semantic index -> ``Cache`` ->
NATS lookup and store, and ``CacheAdminService``, on the runtime."""

from __future__ import annotations

import asyncio
import contextlib

from sluice.service import GrpcServer, ServiceRuntime
from sluice.topology import Buckets, Collections, ServiceName

from services.cache.adapters.semantic import LazySemanticIndex, open_semantic_index
from services.cache.adapters.store import KvEntryStore
from services.cache.domain import Cache
from services.cache.handlers.nats import CacheHandlers
from services.cache.settings import CacheSettings


class CacheService:
    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self.runtime = ServiceRuntime(
            ServiceName.CACHE,
            settings.common,
            grpc_port=settings.grpc_port,
            metrics_port=settings.metrics_port,
        )
        self.cache: Cache | None = None
        self.semantic: LazySemanticIndex | None = None
        self._purge: asyncio.Task[None] | None = None

    def _grpc_services(self, server: GrpcServer) -> None:
        # Made with the first gRPC connection (sluice.grpc_door): grpc loads there.
        from services.cache.handlers.grpc import cache_admin_service

        cache_admin_service(lambda: self.cache)(server)

    async def start(self) -> None:
        bus = await self.runtime.start([self._grpc_services])
        settings = self.settings
        if settings.semantic_enabled:
            key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
            # Opened on the first semantic request (adapters/semantic.py: the model and
            # qdrant-client are most of this process's memory, for an opt-in layer).
            self.semantic = LazySemanticIndex(
                lambda: open_semantic_index(
                    threads=settings.semantic_threads,
                    threshold=settings.semantic_threshold,
                    qdrant_url=settings.qdrant_url,
                    qdrant_api_key=key,
                    local_path=settings.common.state_dir / Collections.LOCAL_DIRNAME,
                )
            )
        cache = Cache(
            await KvEntryStore.open(bus),
            default_ttl_seconds=settings.default_ttl_seconds,
            max_ttl_seconds=int(Buckets.EXACT_CACHE.ttl_seconds),
            semantic=self.semantic,
            semantic_max_pending=settings.semantic_max_pending,
        )
        cache.register_metrics()
        handlers = CacheHandlers(cache)
        await handlers.serve(bus)
        self.cache = cache
        # Semantic replies first: they may still leave deletions and indexing behind.
        self.runtime.on_stop(handlers.finish)
        self.runtime.on_stop(cache.finish)
        if self.semantic is not None:
            self._purge = asyncio.create_task(
                cache.purge_expired_points(settings.semantic_purge_seconds)
            )
            self.runtime.on_stop(self._close_semantic)
        await self.runtime.mark_ready()

    async def _close_semantic(self) -> None:
        if self._purge is not None:
            self._purge.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purge
        if self.semantic is not None:
            await self.semantic.settled()
            # Local mode writes its storage on close.
            await asyncio.to_thread(self.semantic.close)

    async def stop(self) -> None:
        """Graceful stop, as on SIGTERM."""
        await self.runtime.shutdown()


async def main() -> None:
    service = CacheService(CacheSettings())
    await service.start()
    await service.runtime.run_until_stopped()
