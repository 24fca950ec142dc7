"""The JetStream queues the gateway writes (work, usage, webhooks): every message with
``Nats-Msg-Id`` deduplication, in a PRODUCER span that carries the trace on."""

from __future__ import annotations

import logging

from sluice.bus import NATS_FAILURES, Bus
from sluice.cost.v1 import cost_pb2
from sluice.inference.v1 import inference_pb2
from sluice.jobs.v1 import jobs_pb2
from sluice.topology import PREFIX, PriorityClass, Streams, Subjects

from services.gateway.domain.problems import unavailable

log = logging.getLogger(__name__)


class JetStreamQueues:
    def __init__(self, bus: Bus, timeout: float) -> None:
        self._bus = bus
        self._timeout = timeout

    async def _publish(
        self, subject: str, message: bytes, msg_id: str, span_name: str, refused: str
    ) -> int:
        try:
            return await self._bus.publish_durable(
                subject, message, msg_id=msg_id, timeout=self._timeout, span_name=span_name
            )
        except NATS_FAILURES as exc:
            log.warning("publish to %s failed: %s", span_name, type(exc).__name__)
            raise unavailable(refused) from None

    async def enqueue(self, work: inference_pb2.InferenceWork, priority: PriorityClass) -> int:
        subject = Subjects.infer(priority)
        return await self._publish(
            subject,
            work.SerializeToString(),
            work.request_id,
            subject,
            "The work queue did not accept the request.",
        )

    async def remove(self, sequence: int) -> bool:
        return await self._bus.delete_message(Streams.INFER.name, sequence)

    async def publish_usage(self, event: cost_pb2.UsageEvent) -> None:
        await self._publish(
            Subjects.usage(event.key_id),
            event.SerializeToString(),
            event.request_id,
            f"{PREFIX}.usage",
            "The usage stream did not accept the event.",
        )

    async def enqueue_webhook(self, delivery: jobs_pb2.WebhookDelivery) -> None:
        await self._publish(
            Subjects.webhook(delivery.job_id),
            delivery.SerializeToString(),
            delivery.webhook_id,
            f"{PREFIX}.webhook",
            "The webhook queue did not accept the delivery.",
        )
