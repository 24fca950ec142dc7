"""Process wiring: runtime (NATS, gRPC health, telemetry), the key store and dev key,
the chat service, and the embedded HTTP server; graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import time

from sluice import tokens
from sluice.catalog import Catalog
from sluice.metrics import instruments
from sluice.service import ServiceRuntime
from sluice.topology import Buckets, ServiceName

from services.gateway.adapters import CacheLookup, JetStreamPublisher, Limiter, Readiness
from services.gateway.app import GatewayDeps, create_app, models_list_body
from services.gateway.auth import KeyStore, bootstrap_dev_key
from services.gateway.chat import ChatService
from services.gateway.edge import Edge
from services.gateway.jobs_runtime import start_jobs
from services.gateway.leases import LeasingLimiter
from services.gateway.server import create_server
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


async def main() -> None:
    settings = GatewaySettings()
    runtime = ServiceRuntime(
        ServiceName.GATEWAY,
        settings.common,
        grpc_port=settings.grpc_port,
        metrics_port=None,
    )
    bus = await runtime.start()
    catalog = Catalog.load(settings.providers_path)
    # Load the BPE tables now, not on the first request.
    tokens.count_text("warm up the tokenizer")

    kv = await bus.kv(Buckets.API_KEYS)
    await bootstrap_dev_key(
        kv,
        settings.dev_api_key,
        state_dir=settings.common.state_dir,
        is_local=settings.common.is_local,
    )
    inst = instruments()
    chat = ChatService(
        settings=settings,
        bus=bus,
        catalog=catalog,
        limiter=LeasingLimiter(
            Limiter(bus, settings.limiter_timeout_seconds), settings.admission_lease_requests
        ),
        cache=CacheLookup(bus, settings.cache_timeout_seconds),
        publisher=JetStreamPublisher(bus, settings.publish_timeout_seconds),
        instruments=inst,
    )
    jobs = await start_jobs(settings, bus, chat)
    deps = GatewayDeps(
        jobs=jobs.jobs,
        idempotency=jobs.idempotency,
        settings=settings,
        keys=KeyStore(kv, ttl=settings.key_cache_seconds),
        chat=chat,
        readiness=Readiness(bus, settings.readiness_cache_seconds),
        instruments=inst,
        models_body=models_list_body(catalog),
    )
    edge = Edge(create_app(deps), inst)
    grace = settings.common.shutdown_grace_seconds
    server = create_server(settings.http_server, edge, settings.host, settings.port, grace)
    await server.start()

    async def stop_http() -> None:
        # Stop accepting, then let in-flight requests and streams finish within the grace.
        stopping = asyncio.create_task(server.stop())
        deadline = time.monotonic() + grace
        try:
            await asyncio.wait_for(edge.wait_idle(), grace)
        except TimeoutError:
            log.warning("%d requests still open after %.0fs grace", edge.in_flight, grace)
        await asyncio.wait({stopping}, timeout=max(0.0, deadline - time.monotonic()) + 1)
        await chat.limiter.drain()

    runtime.on_stop(stop_http)
    runtime.on_stop(jobs.stop)
    await runtime.mark_ready()
    log.info(
        "gateway listening on http://%s:%d (%s)",
        settings.host,
        settings.port,
        settings.http_server,
    )
    await runtime.run_until_stopped()
