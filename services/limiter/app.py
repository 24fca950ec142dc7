"""Wiring of the limiter: runtime, NATS subjects, usage reconciliation, snapshots, gRPC.

Start order: restore the snapshot *before* serving, so a restarted limiter never admits
against an empty window. Stop order (after the runtime stops taking requests): finish the
usage batch in hand, take a final snapshot, then the runtime drains NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

import grpc
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from sluice import telemetry
from sluice.bus import Bus, linger
from sluice.cost.v1 import cost_pb2
from sluice.limiter.v1 import limiter_pb2, limiter_pb2_grpc
from sluice.service import ServiceRuntime
from sluice.topology import Buckets, Consumers, ServiceName, Subjects

from services.limiter.domain import Limiter, decode_snapshot, encode_snapshot
from services.limiter.grpc_api import QuotaServicer
from services.limiter.handlers import Clock, LimiterHandlers, LimiterMetrics, wall_ms
from services.limiter.settings import LimiterSettings

log = logging.getLogger(__name__)

QUEUE = "limiter"


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
        self.handlers: LimiterHandlers | None = None
        self._kv: KeyValue | None = None
        self._usage_sub: JetStreamContext.PullSubscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._tracer = trace.get_tracer("sluice.limiter")
        self.snapshots_written = 0

    @property
    def bus(self) -> Bus:
        if self.runtime.bus is None:
            raise RuntimeError("limiter not started")
        return self.runtime.bus

    async def start(self) -> None:
        def register(server: grpc.aio.Server) -> None:
            limiter_pb2_grpc.add_QuotaServiceServicer_to_server(
                QuotaServicer(self.limiter, self.clock), server
            )

        bus = await self.runtime.start([register])
        self._kv = await bus.kv(Buckets.LIMITER_SNAPSHOTS)
        await self._restore()

        self.handlers = LimiterHandlers(
            self.limiter, LimiterMetrics().register(self.limiter), self.clock
        )
        await bus.serve(
            Subjects.LIMITER_RESERVE, limiter_pb2.ReserveRequest, self.handlers.reserve, queue=QUEUE
        )
        await bus.serve(
            Subjects.LIMITER_COMMIT, limiter_pb2.CommitRequest, self.handlers.commit, queue=QUEUE
        )

        spec = dataclasses.replace(Consumers.LIMITER_USAGE, durable=self.settings.consumer_durable)
        await bus.ensure_consumer(spec)
        self._usage_sub = await bus.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
        self._tasks = [
            asyncio.create_task(self._reconcile_loop(), name="limiter-reconcile"),
            asyncio.create_task(self._snapshot_loop(), name="limiter-snapshots"),
        ]
        self.runtime.on_stop(self._on_stop)
        await self.runtime.mark_ready()

    async def stop(self) -> None:
        """Graceful stop, as on SIGTERM."""
        await self.runtime.shutdown()

    # --- reconciliation -------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        sub = self._usage_sub
        assert sub is not None
        while not self._stopping.is_set():
            try:
                msgs = await sub.fetch(
                    self.settings.reconcile_batch, timeout=self.settings.fetch_timeout_seconds
                )
            except NatsTimeoutError:
                continue
            except Exception:
                # A reconnect in progress or a consumer being recreated: try again soon.
                log.warning("usage fetch failed", exc_info=True)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                await self._on_usage(msg)
            if len(msgs) < self.settings.reconcile_batch:
                await linger(self._stopping, self.settings.reconcile_window_seconds)

    async def _on_usage(self, msg: Msg) -> None:
        assert self.handlers is not None
        with self._tracer.start_as_current_span(
            f"{Subjects.USAGE_ALL} process",
            context=telemetry.extract(msg.headers),
            kind=SpanKind.CONSUMER,
            attributes=telemetry.messaging_attributes(msg.subject, "process"),
        ) as span:
            event = cost_pb2.UsageEvent()
            try:
                event.ParseFromString(msg.data)
            except DecodeError:
                # Never decodable, so never worth a redelivery.
                span.set_status(Status(StatusCode.ERROR, "undecodable usage event"))
                log.error("undecodable usage event on %s; terminated", msg.subject)
                await msg.term()
                return
            span.set_attribute("sluice.key_id", event.key_id)
            span.set_attribute("sluice.request_id", event.request_id)
            self.handlers.apply_usage(event)
            # Ack after applying; a redelivery (lost ack) finds the reservation settled.
            await msg.ack()

    # --- snapshots ------------------------------------------------------------------

    async def _restore(self) -> None:
        assert self._kv is not None
        try:
            entry = await self._kv.get(self.settings.snapshot_key)
        except KeyNotFoundError:
            log.info("no limiter snapshot; starting with empty windows")
            return
        if not entry.value:
            return
        try:
            snapshot = await asyncio.to_thread(decode_snapshot, entry.value)
        except (ValueError, KeyError, TypeError):
            log.exception("limiter snapshot unreadable; starting with empty windows")
            return
        self.limiter.restore(snapshot, self.clock())
        log.info(
            "limiter restored: %d keys, %d open reservations",
            self.limiter.tracked_keys,
            self.limiter.open_reservations,
        )

    async def snapshot_now(self) -> None:
        """Expire what is due, then write the state to KV (encoding off the loop)."""
        assert self._kv is not None
        now = self.clock()
        self.limiter.expire(now)
        data = await asyncio.to_thread(encode_snapshot, self.limiter.snapshot(now))
        await self._kv.put(self.settings.snapshot_key, data)
        self.snapshots_written += 1

    async def _snapshot_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stopping.wait(), timeout=self.settings.snapshot_interval_seconds
                )
            if self._stopping.is_set():
                return
            try:
                await self.snapshot_now()
            except Exception:
                log.warning("limiter snapshot failed; will retry", exc_info=True)

    async def _on_stop(self) -> None:
        # Intake is already stopped; let the usage batch in hand finish, then snapshot.
        self._stopping.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._usage_sub is not None:
            with contextlib.suppress(Exception):
                await self._usage_sub.unsubscribe()
        await self.snapshot_now()
        log.info("limiter final snapshot written")


async def main() -> None:
    service = LimiterService(LimiterSettings())
    await service.start()
    await service.runtime.run_until_stopped()
