"""One webhook attempt: sign and post the delivery, note it in the job's delivery log
(a delivery that belongs to no job, such as a spend alert's from the cost-tracker, is
logged instead), and say what comes next (done, retry after the schedule's next delay,
or give up)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from sluice.jobs.v1 import jobs_pb2

from services.gateway.domain.jobs.webhooks import AttemptResult, attempt_outcome
from services.gateway.domain.ports import WebhookPoster, WebhookSecretStore

log = logging.getLogger(__name__)

# Notes one attempt on the job: (job id, webhook status, attempt entry).
RecordAttempt = Callable[[str, str, jobs_pb2.WebhookAttempt], Awaitable[None]]


class WebhookDeliverer:
    def __init__(
        self,
        *,
        secrets: WebhookSecretStore,
        poster: WebhookPoster,
        schedule: list[float],
        record: RecordAttempt,
    ) -> None:
        self.secrets = secrets
        self.poster = poster
        # Seconds before each attempt; the first is immediate.
        self.schedule = list(schedule) or [0.0]
        self.record = record

    def delay_after(self, attempt: int) -> float:
        """Seconds until the attempt after number ``attempt`` (from 1)."""
        return self.schedule[min(attempt, len(self.schedule) - 1)]

    async def attempt(self, delivery: jobs_pb2.WebhookDelivery, attempt: int) -> str:
        """Attempt number ``attempt``; returns the webhook's status after it (see
        ``attempt_outcome``)."""
        try:
            if await self.secrets.is_disabled(delivery.team_id, delivery.url):
                result = AttemptResult(error="endpoint disabled after 410 Gone", refused=True)
            else:
                secret = await self.secrets.get(delivery.team_id)
                result = await self.poster.attempt(delivery, secret)
        except Exception as exc:  # a bug or a store down must not lose the delivery
            log.exception("webhook attempt for %s failed", delivery.webhook_id)
            result = AttemptResult(error=type(exc).__name__)
        status = attempt_outcome(result, attempt, self.schedule)
        if status == "disabled":
            await self.secrets.disable(delivery.team_id, delivery.url)
        entry = jobs_pb2.WebhookAttempt(
            attempt=attempt,
            at_unix_ms=int(time.time() * 1000),
            status_code=result.status_code,
            error=result.error,
            event_type=delivery.event_type,
        )
        if not delivery.job_id:
            # No job to keep a delivery log on: the attempt is logged here.
            log.info(
                "webhook %s (%s) attempt %d: %s, status %d%s",
                delivery.webhook_id,
                delivery.event_type,
                attempt,
                status,
                result.status_code,
                f", {result.error}" if result.error else "",
            )
            return status
        try:
            await self.record(delivery.job_id, status, entry)
        except Exception:
            log.warning("webhook log for %s not recorded", delivery.job_id, exc_info=True)
        return status
