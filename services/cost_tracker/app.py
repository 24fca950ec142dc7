"""Wiring of the cost-tracker: settings -> price table, ledger (SQLite or PostgreSQL),
cost-event publisher, budget directory and alert sink -> recorder, spend watch and feed
-> usage consumer, usage queries, cost-event listener and ``UsageService``.

``python -m services.cost_tracker`` runs the service; with ``--rebuild`` it recreates
the ledger from the usage stream and exits (see ``services.cost_tracker.adapters.rebuild``).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, TypeAlias

from opentelemetry import trace
from sluice.bus import Bus
from sluice.consumers import ConsumerBroker, DurableConsumer
from sluice.cost.v1 import cost_pb2
from sluice.logging import configure_logging
from sluice.pricing import PriceTable
from sluice.service import GrpcServer, ServiceRuntime
from sluice.topology import Consumers, ConsumerSpec, ServiceName

from services.cost_tracker.adapters.alerts import NatsAlertSink
from services.cost_tracker.adapters.directory import KvBudgetDirectory
from services.cost_tracker.adapters.events import NatsCostEvents
from services.cost_tracker.adapters.ledger import SqliteLedger, sqlite_rebuilding
from services.cost_tracker.adapters.rebuild import rebuild_ledger
from services.cost_tracker.domain.alerts import AlertSettings, SpendWatch
from services.cost_tracker.domain.feed import CostFeed
from services.cost_tracker.domain.recording import UsageRecorder
from services.cost_tracker.domain.usage import Pricer, usd_to_nanos
from services.cost_tracker.handlers.nats import (
    CostEventListener,
    UsageQueries,
    usage_consumer,
)
from services.cost_tracker.settings import CostTrackerSettings

if TYPE_CHECKING:
    from services.cost_tracker.adapters.postgres import PostgresLedger

log = logging.getLogger(__name__)

Ledger: TypeAlias = "SqliteLedger | PostgresLedger"


def ledger_for(settings: CostTrackerSettings) -> Ledger:
    """PostgreSQL when ``SLUICE_COST_DATABASE_URL`` is set, else the SQLite file."""
    if settings.database_url is not None:
        # Imported here: asyncpg (about 2 MiB resident) loads only for a PostgreSQL ledger.
        from services.cost_tracker.adapters.postgres import PostgresLedger

        return PostgresLedger(
            settings.database_url.get_secret_value(), pool_size=settings.database_pool_size
        )
    return SqliteLedger(settings.ledger_file)


def ledger_where(ledger: Ledger) -> str:
    """Where the ledger is, for logs (a database URL without its credentials)."""
    return str(ledger.path) if isinstance(ledger, SqliteLedger) else ledger.where


class CostTracker:
    """The service's parts, started on a connected bus and stopped in order."""

    def __init__(
        self, settings: CostTrackerSettings, *, tracer: trace.Tracer | None = None
    ) -> None:
        self.settings = settings
        self.pricer = Pricer(PriceTable.load(settings.prices_file))
        self.ledger: Ledger = ledger_for(settings)
        self.feed = CostFeed(settings.watch_queue_size)
        self.recorder: UsageRecorder | None = None
        self.consumer: DurableConsumer[cost_pb2.UsageEvent] | None = None
        self.queries: UsageQueries | None = None
        self.directory = KvBudgetDirectory()
        self.watch: SpendWatch | None = None
        self._tracer = tracer

    def register(self, server: GrpcServer) -> None:
        """UsageService on the runtime's gRPC server (behind the edge), made with the
        first gRPC connection (sluice.grpc_door): grpc loads there."""
        from services.cost_tracker.handlers.grpc import usage_service

        usage_service(self.ledger, self.feed)(server)

    async def start(
        self, bus: Bus, broker: ConsumerBroker, *, consumer_spec: ConsumerSpec | None = None
    ) -> None:
        """Open the ledger and start the usage consumer on ``broker`` (the runtime's:
        it stops the consumer, settling the batch in hand, before ``stop`` runs)."""
        await self.ledger.open()
        # Subscribed to every instance's cost events only while someone watches.
        self.feed.attach(CostEventListener(bus, self.feed.publish))
        spec = consumer_spec or replace(
            Consumers.COST_USAGE, durable=self.settings.consumer_durable
        )
        self.recorder = UsageRecorder(self.ledger, self.pricer, NatsCostEvents(bus))
        # Budgets from the key and team records, followed before the first batch.
        await self.directory.start(bus)
        self.watch = SpendWatch(
            self.ledger,
            self.directory,
            NatsAlertSink(bus),
            AlertSettings(
                thresholds=tuple(self.settings.alert_thresholds),
                spike_factor=self.settings.spike_factor,
                spike_min_nanos=usd_to_nanos(self.settings.spike_min_usd),
            ),
        )
        self.consumer = usage_consumer(
            broker,
            self.recorder,
            spec,
            batch=self.settings.batch_size,
            window=self.settings.batch_window_seconds,
            fetch_timeout=self.settings.fetch_timeout_seconds,
            tracer=self._tracer,
            watch=self.watch,
        )
        await self.consumer.start()
        # The gateway's usage queries (stopped with the runtime's other NATS handlers).
        self.queries = UsageQueries(self.ledger)
        await self.queries.start(bus)
        log.info(
            "cost-tracker recording into %s with prices %s (version %s)",
            ledger_where(self.ledger),
            self.settings.prices_file,
            self.pricer.table.version,
        )

    async def stop(self) -> None:
        """Finish the batch in hand (already done when the runtime stopped the broker
        first), end the watch streams, close the ledger."""
        if self.consumer is not None:
            await self.consumer.stop()
        if self.queries is not None:
            await self.queries.stop()
        await self.directory.stop()
        self.feed.close()
        await self.ledger.close()


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.cost_tracker",
        description="Price usage events into the cost ledger and serve UsageService.",
    )
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="recreate the ledger by replaying SLUICE_USAGE from the start, then exit",
    )
    return parser.parse_args(argv)


async def run_rebuild(settings: CostTrackerSettings) -> None:
    configure_logging(str(ServiceName.COST_TRACKER), settings.common.log_level)
    pricer = Pricer(PriceTable.load(settings.prices_file))
    bus = await Bus.connect(settings.common.nats_url, "sluice-cost-tracker-rebuild")
    try:
        ledger = ledger_for(settings)
        if isinstance(ledger, SqliteLedger):
            await rebuild_ledger(
                bus, sqlite_rebuilding(ledger.path), pricer, where=str(ledger.path)
            )
            return
        # PostgreSQL: the schema first (a rebuild may be a database's first use).
        await ledger.open()
        try:
            await rebuild_ledger(bus, ledger.rebuilding(), pricer, where=ledger.where)
        finally:
            await ledger.close()
    finally:
        await bus.close()


async def main(argv: list[str] | None = None) -> None:
    import sys

    args = _parse_args(sys.argv[1:] if argv is None else argv)
    settings = CostTrackerSettings()
    if args.rebuild or settings.rebuild:
        await run_rebuild(settings)
        return
    runtime = ServiceRuntime(
        ServiceName.COST_TRACKER,
        settings.common,
        grpc_port=settings.grpc_port,
        metrics_port=settings.metrics_port,
    )
    tracker = CostTracker(settings)
    bus = await runtime.start([tracker.register])
    runtime.on_stop(tracker.stop)
    try:
        await tracker.start(bus, runtime.consumer_broker())
    except BaseException:
        await runtime.shutdown()
        raise
    await runtime.mark_ready()
    await runtime.run_until_stopped()
