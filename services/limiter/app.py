"""Wiring of the limiter: settings -> snapshot store, leases, journal, usage log ->
replica -> partition server, usage feed and ``QuotaService`` on the runtime.

Start order: the usage feed starts at the stream's current end (a partition taken later
reads what it lacks up to there itself), then ownership rounds run every
``renew_seconds``: each takes, rebuilds and serves the partitions this replica is
preferred for, and hands over the others. Ready once the first round is done. Stop
order (after the runtime stops taking requests): the rounds stop, the usage feed stops,
each partition is handed over with a final snapshot, and the replica leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sluice.pricing import PriceTable
from sluice.service import GrpcServer, ServiceRuntime
from sluice.topology import LIMITER_PARTITIONS, Buckets, ServiceName

from services.limiter.adapters import BusJournal, KvLeases, KvSnapshotStore, UsageLog
from services.limiter.domain.admission import Clock, LimiterMetrics, Prices, wall_ms
from services.limiter.domain.partitions import Ownership
from services.limiter.domain.replica import Replica
from services.limiter.handlers.nats import PartitionServer, UsageFeed
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
        self.metrics = LimiterMetrics()
        self.prices = Prices(PriceTable.load(settings.prices_file))
        self.replica: Replica | None = None
        self.feed: UsageFeed | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    def _grpc_services(self, server: GrpcServer) -> None:
        # Made with the first gRPC connection (sluice.grpc_door): grpc loads there.
        from services.limiter.handlers.grpc import quota_service

        quota_service(lambda: self.replica)(server)

    async def start(self) -> None:
        bus = await self.runtime.start([self._grpc_services])
        await bus.set_bucket_ttl(Buckets.LIMITER_OWNERS, self.settings.lease_seconds)
        journal = BusJournal(bus)
        usage = UsageLog(bus)
        ownership = Ownership(
            await KvLeases.open(bus),
            self.settings.common.instance_id,
            LIMITER_PARTITIONS,
            self.settings.lease_seconds,
        )
        self.replica = replica = Replica(
            config=self.settings.limiter_config(),
            prices=self.prices,
            batch_share=self.settings.batch_share,
            metrics=self.metrics,
            clock=self.clock,
            ownership=ownership,
            snapshots=await KvSnapshotStore.open(bus),
            journal=journal,
            usage=usage,
            partitions=LIMITER_PARTITIONS,
        )
        replica.server = PartitionServer(bus)
        # After the runtime set up telemetry, so the instruments reach its meter.
        self.metrics.register(replica)
        replica.usage_position = await usage.last_sequence()
        self.feed = UsageFeed(
            bus,
            replica,
            batch=self.settings.reconcile_batch,
            window=self.settings.reconcile_window_seconds,
            fetch_timeout=self.settings.fetch_timeout_seconds,
        )
        await self.feed.start(replica.usage_position)
        await replica.round()
        await replica.settled()
        self._tasks = [
            asyncio.create_task(self._rounds(), name="limiter-ownership"),
            asyncio.create_task(self._snapshots(), name="limiter-snapshots"),
        ]
        self.runtime.on_stop(self._on_stop)
        await self.runtime.mark_ready()

    async def _rounds(self) -> None:
        assert self.replica is not None
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.renew_seconds)
            if self._stopping.is_set():
                return
            try:
                await self.replica.round()
            except Exception:
                log.exception("limiter ownership round failed")

    async def _snapshots(self) -> None:
        assert self.replica is not None
        interval = self.settings.snapshot_interval_seconds
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)
            if self._stopping.is_set():
                return
            try:
                await self.replica.save_snapshots(self.settings.snapshot_max_age_seconds)
            except Exception:
                log.warning("limiter snapshots failed; will retry", exc_info=True)

    async def stop(self) -> None:
        """Graceful stop, as on SIGTERM."""
        await self.runtime.shutdown()

    async def _on_stop(self) -> None:
        # Intake is stopped (the runtime ended the partitions' subscriptions): no new
        # reservation; the final snapshots hold every one made.
        self._stopping.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.feed is not None:
            await self.feed.stop()
        if self.replica is not None:
            await self.replica.stop()
            log.info("limiter partitions handed over with their final snapshots")


async def main() -> None:
    service = LimiterService(LimiterSettings())
    await service.start()
    await service.runtime.run_until_stopped()
