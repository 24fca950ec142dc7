"""Wiring of the limiter: settings -> snapshot store -> limiter and admission -> NATS
handlers, usage consumer and ``QuotaService`` on the runtime.

Start order: restore the snapshot *before* serving, so a restarted limiter never admits
against an empty window. Stop order (after the runtime stops taking requests): finish the
usage batch in hand, take a final snapshot, then the runtime drains NATS.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from sluice.consumers import DurableConsumer
from sluice.cost.v1 import cost_pb2
from sluice.pricing import PriceTable
from sluice.service import ServiceRuntime
from sluice.topology import Consumers, ServiceName

from services.limiter.adapters import KvSnapshotStore
from services.limiter.domain.admission import Admission, Clock, LimiterMetrics, Prices, wall_ms
from services.limiter.domain.snapshots import Snapshots
from services.limiter.domain.windows import Limiter
from services.limiter.handlers.grpc import quota_service
from services.limiter.handlers.nats import AdmissionHandlers, usage_reconciler
from services.limiter.settings import LimiterSettings

log = logging.getLogger(__name__)


class LimiterService:
    def __init__(self, settings: LimiterSettings, clock: Clock = wall_ms) -> None:
        self.settings = settings
        self.clock = clock
        self.runtime = ServiceRuntime(
            ServiceName.LIMITER,
            settings.common,
            grpc_port=settings.grpc_port,
            metrics_port=settings.metrics_port,
        )
        self.limiter = Limiter(settings.limiter_config())
        self.admission = Admission(
            self.limiter,
            LimiterMetrics(),
            clock,
            prices=Prices(PriceTable.load(settings.prices_file)),
            batch_share=settings.batch_share,
        )
        self.snapshots: Snapshots | None = None
        self.reconciler: DurableConsumer[cost_pb2.UsageEvent] | None = None
        self._snapshot_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        bus = await self.runtime.start([quota_service(self.admission)])
        self.snapshots = Snapshots(
            self.limiter,
            await KvSnapshotStore.open(bus, self.settings.snapshot_key),
            self.clock,
            interval_seconds=self.settings.snapshot_interval_seconds,
        )
        await self.snapshots.restore()
        # After the runtime set up telemetry, so the instruments reach its meter.
        self.admission.metrics.register(self.limiter)
        await AdmissionHandlers(self.admission).serve(bus)
        self.reconciler = usage_reconciler(
            self.runtime.consumer_broker(),
            self.admission,
            dataclasses.replace(Consumers.LIMITER_USAGE, durable=self.settings.consumer_durable),
            batch=self.settings.reconcile_batch,
            fetch_timeout=self.settings.fetch_timeout_seconds,
            window=self.settings.reconcile_window_seconds,
        )
        await self.reconciler.start()
        self._snapshot_task = asyncio.create_task(
            self.snapshots.run(self._stopping), name="limiter-snapshots"
        )
        self.runtime.on_stop(self._on_stop)
        await self.runtime.mark_ready()

    async def stop(self) -> None:
        """Graceful stop, as on SIGTERM."""
        await self.runtime.shutdown()

    async def _on_stop(self) -> None:
        # Intake is stopped, and the runtime has stopped the usage consumer, settling the
        # batch in hand (its broker stops before the stop hooks): the snapshot below
        # holds every settlement whose ack was sent.
        self._stopping.set()
        if self._snapshot_task is not None:
            await asyncio.gather(self._snapshot_task, return_exceptions=True)
        if self.snapshots is not None:
            await self.snapshots.save()
            log.info("limiter final snapshot written")


async def main() -> None:
    service = LimiterService(LimiterSettings())
    await service.start()
    await service.runtime.run_until_stopped()
