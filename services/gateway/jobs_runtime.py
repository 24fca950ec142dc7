"""Wiring of jobs, idempotency and webhooks in the gateway process: the stores, the
job tracker (lifecycle consumer) and the webhook sender, started and stopped together."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sluice.bus import Bus
from sluice.pricing import PriceTable
from sluice.topology import Buckets

from services.gateway.chat import ChatService
from services.gateway.idempotency import Idempotency
from services.gateway.jobs import JobRenderer, JobService, JobStore, JobTracker, ensure_bucket_ttl
from services.gateway.settings import GatewaySettings
from services.gateway.streams import StreamResumer
from services.gateway.webhooks import AllowList, WebhookSecrets, WebhookSender

log = logging.getLogger(__name__)


@dataclass
class JobsRuntime:
    jobs: JobService
    idempotency: Idempotency
    tracker: JobTracker
    sender: WebhookSender

    async def stop(self) -> None:
        await self.tracker.stop()
        await self.sender.stop()


def _prices(settings: GatewaySettings) -> PriceTable | None:
    path = settings.common.config_dir / "prices.yaml"
    try:
        return PriceTable.load(path)
    except (OSError, ValueError):
        log.warning("no price table at %s: partial job costs read 0", path)
        return None


async def start_jobs(settings: GatewaySettings, bus: Bus, chat: ChatService) -> JobsRuntime:
    jobs_kv = await bus.kv(Buckets.JOBS)
    idem_kv = await bus.kv(Buckets.IDEMPOTENCY)
    secrets_kv = await bus.kv(Buckets.WEBHOOK_SECRETS)
    # Records carry their own expiry; the bucket TTLs follow the settings as the bound.
    await ensure_bucket_ttl(bus, Buckets.JOBS.name, settings.job_retention_seconds)
    await ensure_bucket_ttl(bus, Buckets.IDEMPOTENCY.name, settings.idempotency_ttl_seconds)
    webhook_secrets = WebhookSecrets(secrets_kv)
    jobs = JobService(
        settings=settings,
        bus=bus,
        chat=chat,
        store=JobStore(jobs_kv, bus),
        renderer=JobRenderer(_prices(settings)),
        webhook_secrets=webhook_secrets,
    )
    idempotency = Idempotency(bus, idem_kv, settings, StreamResumer(chat))
    tracker = JobTracker(bus, jobs)
    sender = WebhookSender(
        bus,
        webhook_secrets,
        schedule=settings.webhook_retry_schedule,
        timeout=settings.webhook_timeout_seconds,
        allow=AllowList(settings.webhook_allow_hosts),
        record=jobs.record_webhook_attempt,
    )
    await tracker.start()
    await sender.start()
    return JobsRuntime(jobs, idempotency, tracker, sender)
