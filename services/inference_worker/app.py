"""Wiring of the inference worker: settings -> catalogue, prices, provider pool and NATS
event sink -> engine and circuits -> the pull dispatcher and ``ProviderHealthService``.

Stop order (after the runtime marks itself not ready): stop pulling, let in-flight work
finish within the grace period, nak the rest, close the provider pools; the runtime then
drains NATS and stops gRPC.
"""

from __future__ import annotations

import logging

from sluice.catalog import Catalog
from sluice.metrics import instruments
from sluice.pricing import PriceTable
from sluice.service import GrpcServer, ServiceRuntime
from sluice.topology import ServiceName

from services.inference_worker.adapters.breakers import SharedBreakers, breaker_gauge
from services.inference_worker.adapters.providers import ProviderPool
from services.inference_worker.adapters.sink import NatsEventSink
from services.inference_worker.domain.circuit import BreakerPolicy, CircuitRegistry
from services.inference_worker.domain.engine import InferenceEngine
from services.inference_worker.handlers.nats import WorkConsumer
from services.inference_worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class WorkerService:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        config_dir = settings.common.config_dir
        self.catalog = Catalog.load(config_dir / "providers.yaml")
        self.prices = PriceTable.load(config_dir / "prices.yaml")
        self.circuits = CircuitRegistry(
            BreakerPolicy(
                window=settings.circuit_window,
                min_calls=settings.circuit_min_calls,
                failure_rate=settings.circuit_failure_rate,
                consecutive=settings.circuit_failure_threshold,
                cooldown_seconds=settings.circuit_cooldown_seconds,
                probes=settings.circuit_probes,
            )
        )
        self.shared: SharedBreakers | None = None
        self.pool = ProviderPool(self.catalog)
        self.runtime = ServiceRuntime(
            ServiceName.INFERENCE_WORKER,
            settings.common,
            grpc_port=settings.grpc_port,
            metrics_port=settings.metrics_port,
        )
        self.consumer: WorkConsumer | None = None
        self.engine: InferenceEngine | None = None

    def _grpc_services(self, server: GrpcServer) -> None:
        # Made with the first gRPC connection (sluice.grpc_door): grpc loads there.
        from services.inference_worker.handlers.grpc import provider_health_service

        provider_health_service(self.catalog, self.circuits)(server)

    async def start(self) -> None:
        bus = await self.runtime.start([self._grpc_services])
        self.shared = SharedBreakers(bus, self.circuits, self.settings.common.instance_id)
        await self.shared.start()
        breaker_gauge(self.circuits)
        sink = NatsEventSink(
            bus,
            usage_timeout=self.settings.usage_publish_timeout_seconds,
            usage_attempts=self.settings.usage_publish_attempts,
        )
        self.engine = InferenceEngine(
            catalog=self.catalog,
            prices=self.prices,
            pool=self.pool,
            circuits=self.circuits,
            retry=self.settings.retry,
            max_deliveries=self.settings.max_deliveries,
            sink=sink,
            instruments=instruments(),
            worker_id=self.settings.common.instance_id,
        )
        self.consumer = WorkConsumer(bus, self.engine, self.settings)
        await self.consumer.start()
        self.runtime.on_stop(self._on_stop)
        await self.runtime.mark_ready()
        log.info(
            "worker ready: concurrency=%d providers=%s",
            self.settings.concurrency,
            sorted(self.catalog.providers),
        )

    async def _on_stop(self) -> None:
        if self.consumer is not None:
            # Leave a second of the runtime's grace for the nak and pool closing.
            grace = max(0.0, self.settings.common.shutdown_grace_seconds - 1.0)
            await self.consumer.stop(grace)
        if self.shared is not None:
            await self.shared.stop()
        await self.pool.close()

    async def stop(self) -> None:
        """Graceful stop, as on SIGTERM."""
        await self.runtime.shutdown()


async def main() -> None:
    service = WorkerService(WorkerSettings())
    await service.start()
    await service.runtime.run_until_stopped()
