"""Wiring of the cache: runtime, KV bucket, semantic index, NATS subjects, admin gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from sluice.cache.v1 import cache_pb2, cache_pb2_grpc
from sluice.embedding import Embedder
from sluice.service import ServiceRuntime
from sluice.topology import Buckets, Collections, ServiceName, Subjects

from services.cache.grpc_api import CacheAdminServicer
from services.cache.handlers import CacheHandlers
from services.cache.semantic import SemanticIndex, open_client
from services.cache.settings import CacheSettings
from services.cache.store import KvEntryStore

QUEUE = "cache"
log = logging.getLogger(__name__)


def open_semantic_index(settings: CacheSettings) -> SemanticIndex:
    """Loads the embedder and opens (or creates) the collection; blocking, once at start."""
    started = time.perf_counter()
    embedder = Embedder.load(threads=settings.semantic_threads)
    url = settings.qdrant_url
    key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
    path = settings.common.state_dir / Collections.LOCAL_DIRNAME
    index = SemanticIndex(
        open_client(path, url, key),
        embedder,
        Collections.SEMANTIC_CACHE,
        threshold=settings.semantic_threshold,
        server=bool(url),
    )
    index.ensure_collection()
    # The URL may carry credentials in its userinfo: name only the mode.
    log.info(
        "semantic cache ready in %.2f s: collection %s, Qdrant %s, threshold %.3f",
        time.perf_counter() - started,
        index.collection,
        "server" if url else f"local mode in {path}",
        settings.semantic_threshold,
    )
    return index


class CacheService:
    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self.runtime = ServiceRuntime(
            ServiceName.CACHE,
            settings.common,
            grpc_port=settings.grpc_port,
            metrics_port=settings.metrics_port,
        )
        self.handlers: CacheHandlers | None = None
        self.semantic: SemanticIndex | None = None
        self._purge: asyncio.Task[None] | None = None

    async def start(self) -> None:
        def register(server: grpc.aio.Server) -> None:
            # The gRPC server starts before the KV handle exists: the servicer reads the
            # handlers when called and answers UNAVAILABLE until they are in place.
            cache_pb2_grpc.add_CacheAdminServiceServicer_to_server(
                CacheAdminServicer(lambda: self.handlers), server
            )

        bus = await self.runtime.start([register])
        if self.settings.semantic_enabled:
            # Off the loop: the runtime answers health checks (not ready yet) meanwhile.
            self.semantic = await asyncio.to_thread(open_semantic_index, self.settings)
        kv = await bus.kv(Buckets.EXACT_CACHE)
        self.handlers = CacheHandlers(
            KvEntryStore(kv, bus.js, Buckets.EXACT_CACHE.name),
            default_ttl_seconds=self.settings.default_ttl_seconds,
            max_ttl_seconds=int(Buckets.EXACT_CACHE.ttl_seconds),
            semantic=self.semantic,
            semantic_max_pending=self.settings.semantic_max_pending,
        )
        self.handlers.register_metrics()
        await bus.serve(
            Subjects.CACHE_LOOKUP, cache_pb2.LookupRequest, self.handlers.serve_lookup, queue=QUEUE
        )
        await bus.serve(
            Subjects.CACHE_STORE, cache_pb2.StoreRequest, self.handlers.store_answer, queue=QUEUE
        )
        self.runtime.on_stop(self.handlers.finish)
        if self.semantic is not None:
            self._purge = asyncio.create_task(
                self.handlers.purge_expired_points(self.settings.semantic_purge_seconds)
            )
            self.runtime.on_stop(self._close_semantic)
        await self.runtime.mark_ready()

    async def _close_semantic(self) -> None:
        if self._purge is not None:
            self._purge.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purge
        if self.semantic is not None:
            # Local mode writes its storage on close.
            await asyncio.to_thread(self.semantic.close)

    async def stop(self) -> None:
        """Graceful stop, as on SIGTERM."""
        await self.runtime.shutdown()


async def main() -> None:
    service = CacheService(CacheSettings())
    await service.start()
    await service.runtime.run_until_stopped()
