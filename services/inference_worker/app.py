"""Wiring of the inference worker: runtime, catalogue, prices, providers, the pull
consumer and the ProviderHealthService.

Stop order (after the runtime marks itself not ready): stop pulling, let in-flight work
finish within the grace period, nak the rest, close the provider pools; the runtime then
drains NATS and stops gRPC.
"""

from __future__ import annotations

import logging

import grpc
from sluice.catalog import Catalog
from sluice.inference.v1 import inference_pb2_grpc
from sluice.metrics import instruments
from sluice.pricing import PriceTable
from sluice.service import ServiceRuntime
from sluice.topology import ServiceName

from .circuit import CircuitRegistry
from .consumer import WorkConsumer
from .engine import InferenceEngine
from .grpc_api import ProviderHealthServicer
from .providers import ProviderPool
from .settings import WorkerSettings
from .sink import NatsEventSink

log = logging.getLogger(__name__)


class WorkerService:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        config_dir = settings.common.config_dir
        self.catalog = Catalog.load(config_dir / "providers.yaml")
        self.prices = PriceTable.load(config_dir / "prices.yaml")
        self.circuits = CircuitRegistry(
            settings.circuit_failure_threshold, settings.circuit_cooldown_seconds
        )
        self.pool = ProviderPool(self.catalog)
        self.runtime = ServiceRuntime(
            ServiceName.INFERENCE_WORKER,
            settings.common,
            grpc_port=settings.grpc_port,
            metrics_port=settings.metrics_port,
        )
        self.consumer: WorkConsumer | None = None
        self.engine: InferenceEngine | None = None

    async def start(self) -> None:
        def register(server: grpc.aio.Server) -> None:
            inference_pb2_grpc.add_ProviderHealthServiceServicer_to_server(
                ProviderHealthServicer(self.catalog, self.circuits), server
            )

        bus = await self.runtime.start([register])
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
        await self.pool.close()

    async def stop(self) -> None:
        """Graceful stop, as on SIGTERM."""
        await self.runtime.shutdown()


async def main() -> None:
    service = WorkerService(WorkerSettings())
    await service.start()
    await service.runtime.run_until_stopped()
