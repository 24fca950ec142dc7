"""Wiring of the cache: runtime, KV bucket, NATS subjects, admin gRPC."""

from __future__ import annotations

import grpc
from sluice.cache.v1 import cache_pb2, cache_pb2_grpc
from sluice.service import ServiceRuntime
from sluice.topology import Buckets, ServiceName, Subjects

from services.cache.grpc_api import CacheAdminServicer
from services.cache.handlers import CacheHandlers
from services.cache.settings import CacheSettings
from services.cache.store import KvEntryStore

QUEUE = "cache"


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

    async def start(self) -> None:
        def register(server: grpc.aio.Server) -> None:
            # The gRPC server starts before the KV handle exists: the servicer reads the
            # handlers when called and answers UNAVAILABLE until they are in place.
            cache_pb2_grpc.add_CacheAdminServiceServicer_to_server(
                CacheAdminServicer(lambda: self.handlers), server
            )

        bus = await self.runtime.start([register])
        kv = await bus.kv(Buckets.EXACT_CACHE)
        self.handlers = CacheHandlers(
            KvEntryStore(kv, bus.js, Buckets.EXACT_CACHE.name),
            default_ttl_seconds=self.settings.default_ttl_seconds,
            max_ttl_seconds=int(Buckets.EXACT_CACHE.ttl_seconds),
        )
        self.handlers.register_metrics()
        await bus.serve(
            Subjects.CACHE_LOOKUP, cache_pb2.LookupRequest, self.handlers.lookup, queue=QUEUE
        )
        await bus.serve(
            Subjects.CACHE_STORE, cache_pb2.StoreRequest, self.handlers.store_answer, queue=QUEUE
        )
        self.runtime.on_stop(self.handlers.finish)
        await self.runtime.mark_ready()

    async def stop(self) -> None:
        """Graceful stop, as on SIGTERM."""
        await self.runtime.shutdown()


async def main() -> None:
    service = CacheService(CacheSettings())
    await service.start()
    await service.runtime.run_until_stopped()
