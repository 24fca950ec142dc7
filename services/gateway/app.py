"""Wiring of the gateway: adapters over the process's bus, the domain over them, the
HTTP app and the NATS consumers over the domain, started in that order and stopped in
reverse after SIGTERM (HTTP first, letting open streams finish within the grace)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from sluice import tokens
from sluice.bus import Bus
from sluice.catalog import Catalog
from sluice.consumers import ConsumerBroker
from sluice.metrics import Instruments, instruments
from sluice.pricing import PriceTable
from sluice.service import ServiceRuntime
from sluice.topology import Buckets, ServiceName

from services.gateway.adapters.audit import NatsAuditLog
from services.gateway.adapters.cache import CacheAdminClient, CacheClient
from services.gateway.adapters.coalesce import KvCoalesceClaims
from services.gateway.adapters.guard_rules import load_guard
from services.gateway.adapters.idempotency_store import KvIdempotencyStore
from services.gateway.adapters.job_store import KvJobStore
from services.gateway.adapters.keys import KvKeyStore, bootstrap_admin_key, bootstrap_dev_key
from services.gateway.adapters.lifecycle import NatsLifecycle
from services.gateway.adapters.limiter import LimiterClient
from services.gateway.adapters.readiness import BreakerBoard, Readiness
from services.gateway.adapters.spans import LocalSpans
from services.gateway.adapters.streams import NatsStreams
from services.gateway.adapters.teams import KvTeamStore
from services.gateway.adapters.usage import UsageClient
from services.gateway.adapters.webhooks import KvWebhookSecrets, WebhookClient
from services.gateway.adapters.work_queue import JetStreamQueues
from services.gateway.domain.chat import ChatService
from services.gateway.domain.estimate import Estimator
from services.gateway.domain.fail_open import FailOpenAllowance
from services.gateway.domain.idempotency.service import Idempotency
from services.gateway.domain.jobs.delivery import WebhookDeliverer
from services.gateway.domain.jobs.records import JobRenderer
from services.gateway.domain.jobs.service import JobService
from services.gateway.domain.jobs.webhooks import AllowList
from services.gateway.domain.leases import LeasingLimiter
from services.gateway.domain.relay.resume import StreamResumer
from services.gateway.domain.relay.sse import StreamRelay
from services.gateway.domain.tenancy.admin import AdminService
from services.gateway.domain.tenancy.identity import Authenticator
from services.gateway.domain.tenancy.resolve import Tenancy
from services.gateway.domain.tenancy.tiers import TierTable
from services.gateway.domain.usage import UsageReports
from services.gateway.handlers.http.application import create_app
from services.gateway.handlers.http.deps import ApiDeps, models_list_body
from services.gateway.handlers.http.direct import direct_routes
from services.gateway.handlers.http.mcp.mount import LazyMcpEndpoint
from services.gateway.handlers.http.middleware import Edge
from services.gateway.handlers.http.server import create_server
from services.gateway.handlers.nats.job_tracker import job_tracker
from services.gateway.handlers.nats.webhook_sender import webhook_sender
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


def _prices(settings: GatewaySettings) -> PriceTable | None:
    path = settings.common.config_dir / "prices.yaml"
    try:
        return PriceTable.load(path)
    except (OSError, ValueError):
        log.warning("no price table at %s: partial job costs read 0, estimates unpriced", path)
        return None


class Consumer(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class Gateway:
    """The gateway assembled on a connected bus: what the HTTP app calls, and the parts
    that run beside it."""

    api: ApiDeps
    limiter: LeasingLimiter
    consumers: list[Consumer]
    webhooks: WebhookClient
    audit: NatsAuditLog
    mcp: LazyMcpEndpoint

    async def start(self) -> None:
        await self.webhooks.start()
        for consumer in self.consumers:
            await consumer.start()
        await self.mcp.start()

    async def stop(self) -> None:
        await self.mcp.stop()
        for consumer in self.consumers:
            await consumer.stop()
        await self.webhooks.close()
        await self.limiter.drain()
        await self.audit.drain()


async def assemble(
    settings: GatewaySettings, bus: Bus, broker: ConsumerBroker, inst: Instruments
) -> Gateway:
    catalog = Catalog.load(settings.providers_path)
    # A mistake in the tiers file stops the start, naming its line.
    tiers = TierTable.load(settings.tiers_path)
    # Load the BPE tables now, not on the first request.
    tokens.count_text("warm up the tokenizer")
    keys_kv = await bus.kv(Buckets.API_KEYS)
    await bootstrap_dev_key(
        keys_kv,
        settings.dev_api_key,
        state_dir=settings.common.state_dir,
        is_local=settings.common.is_local,
    )
    await bootstrap_admin_key(
        keys_kv,
        settings.admin_api_key,
        state_dir=settings.common.state_dir,
        is_local=settings.common.is_local,
        now=int(time.time()),
    )
    keys = KvKeyStore(keys_kv, bus, ttl=settings.key_cache_seconds)
    teams = KvTeamStore(await bus.kv(Buckets.TEAMS), bus, ttl=settings.key_cache_seconds)
    # Every replica drops a changed key or team the moment it changes (revocation).
    await keys.start()
    await teams.start()
    verifier = None
    mappings = {}
    if settings.jwt_issuers:
        # PyJWT and cryptography (about 10 MiB resident) load only when issuers are set.
        from services.gateway.adapters.identity import JwksVerifier, mapping_of

        mappings = {i.issuer: mapping_of(i) for i in settings.jwt_issuers}
        verifier = JwksVerifier(
            settings.jwt_issuers,
            cache_seconds=settings.jwks_cache_seconds,
            min_refresh_seconds=settings.jwks_min_refresh_seconds,
            timeout=settings.jwks_timeout_seconds,
        )
        await verifier.start()
    authenticator = Authenticator(
        keys=keys,
        teams=teams,
        tokens=verifier,
        mappings=mappings,
    )
    audit_log = NatsAuditLog(bus, batch_seconds=settings.audit_batch_seconds)
    tenancy = Tenancy(teams, tiers)
    # Records carry their own expiry; the bucket TTLs follow the settings as the bound.
    jobs_kv = await bus.kv(Buckets.JOBS)
    idempotency_kv = await bus.kv(Buckets.IDEMPOTENCY)
    await bus.set_bucket_ttl(Buckets.JOBS, settings.job_retention_seconds)
    await bus.set_bucket_ttl(Buckets.IDEMPOTENCY, settings.idempotency_ttl_seconds)

    streams = NatsStreams(bus)
    queue = JetStreamQueues(bus, settings.publish_timeout_seconds)
    lifecycle = NatsLifecycle(bus, settings.publish_timeout_seconds)
    secrets = KvWebhookSecrets(await bus.kv(Buckets.WEBHOOK_SECRETS))
    limiter = LeasingLimiter(
        LimiterClient(bus, settings.limiter_timeout_seconds, settings.limiter_wait_seconds),
        settings.admission_lease_requests,
    )
    relay = StreamRelay(settings, streams, inst)
    claims = None
    if settings.coalesce:
        # A claim never outlives the request it stands for.
        await bus.set_bucket_ttl(Buckets.COALESCE, settings.request_timeout_seconds + 30)
        claims = KvCoalesceClaims(await bus.kv(Buckets.COALESCE))
    chat = ChatService(
        settings=settings,
        catalog=catalog,
        limiter=limiter,
        cache=CacheClient(
            bus,
            settings.cache_timeout_seconds,
            skip_after=settings.cache_skip_after,
            skip_seconds=settings.cache_skip_seconds,
        ),
        queue=queue,
        streams=streams,
        relay=relay,
        tenancy=tenancy,
        claims=claims,
        guard=load_guard(settings.guard_file, settings.common.config_dir),
        fail_open=FailOpenAllowance(
            settings.fail_open_share, settings.fail_open_requests_per_minute
        ),
    )
    resumer = StreamResumer(settings, streams, relay)
    prices = _prices(settings)
    jobs = JobService(
        settings=settings,
        chat=chat,
        store=KvJobStore(jobs_kv, bus),
        renderer=JobRenderer(prices),
        queue=queue,
        streams=streams,
        lifecycle=lifecycle,
        webhook_secrets=secrets,
    )
    idempotency = Idempotency(
        settings=settings,
        store=KvIdempotencyStore(idempotency_kv),
        streams=streams,
        lifecycle=lifecycle,
        resumer=resumer,
    )
    webhooks = WebhookClient(
        AllowList(settings.webhook_allow_hosts), settings.webhook_timeout_seconds
    )
    deliverer = WebhookDeliverer(
        secrets=secrets,
        poster=webhooks,
        schedule=settings.webhook_retry_schedule,
        record=jobs.record_webhook_attempt,
    )
    # The deployments' breakers as the workers share them (/readyz).
    breakers = BreakerBoard(bus)
    api = ApiDeps(
        settings=settings,
        keys=authenticator,
        chat=chat,
        resumer=resumer,
        jobs=jobs,
        idempotency=idempotency,
        readiness=Readiness(bus, settings.readiness_cache_seconds, breakers=breakers),
        instruments=inst,
        models_body=models_list_body(catalog),
        usage=UsageReports(UsageClient(bus, settings.usage_timeout_seconds)),
        estimator=Estimator(chat, prices),
        admin=AdminService(teams=teams, keys=keys, audit_log=audit_log, tiers=tiers),
        spans=LocalSpans(settings.common.state_dir),
        cache_admin=CacheAdminClient(bus, timeout=2.0),
        breakers=breakers,
    )
    consumers: list[Consumer] = [
        breakers,
        job_tracker(broker, jobs),  # type: ignore[list-item]
        webhook_sender(broker, deliverer),  # type: ignore[list-item]
    ]
    return Gateway(api, limiter, consumers, webhooks, audit_log, LazyMcpEndpoint(api))


async def main() -> None:
    settings = GatewaySettings()
    runtime = ServiceRuntime(
        ServiceName.GATEWAY,
        settings.common,
        grpc_port=settings.grpc_port,
        metrics_port=None,
    )
    bus = await runtime.start()
    inst = instruments()
    try:
        gateway = await assemble(settings, bus, runtime.consumer_broker(), inst)
    except BaseException:
        await runtime.shutdown()
        raise
    await gateway.start()
    edge = Edge(
        create_app(gateway.api, gateway.mcp),
        inst,
        gateway.audit,
        direct=direct_routes(gateway.api) if settings.direct_routes else None,
    )
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

    runtime.on_stop(stop_http)
    runtime.on_stop(gateway.stop)
    await runtime.mark_ready()
    log.info(
        "gateway listening on http://%s:%d (%s)",
        settings.host,
        settings.port,
        settings.http_server,
    )
    await runtime.run_until_stopped()
