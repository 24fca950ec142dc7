"""The webhook sender: drains ``SLUICE_WEBHOOKS`` (one durable consumer for all gateway
replicas), several deliveries at once; a failed attempt comes back after the retry
schedule's next delay, so retries survive restarts. Job webhooks and the deliveries
that belong to no job (the cost-tracker's spend alerts) go the same way: signed with
the team's secret, checked against the SSRF rules at connection time, retried.

A gateway fetches its next batch once every delivery of the last one is settled, so a
receiver that takes its whole timeout (``SLUICE_GATEWAY_WEBHOOK_TIMEOUT_SECONDS``) holds
the next batch back that long on that replica; the other replicas keep pulling."""

from __future__ import annotations

from sluice.consumers import ConsumerBroker, Delivery, DurableConsumer
from sluice.delivery import Poison, Transient
from sluice.jobs.v1 import jobs_pb2
from sluice.topology import Consumers

from services.gateway.domain.jobs.delivery import WebhookDeliverer

# Deliveries in flight per gateway: each waits on a receiver for up to its timeout.
CONCURRENT_DELIVERIES = 16


def webhook_sender(
    broker: ConsumerBroker, deliverer: WebhookDeliverer
) -> DurableConsumer[jobs_pb2.WebhookDelivery]:
    async def handle(delivery: jobs_pb2.WebhookDelivery, meta: Delivery) -> None:
        status = await deliverer.attempt(delivery, meta.attempt)
        if status == "pending":
            raise Transient(
                f"webhook attempt {meta.attempt} failed", delay=deliverer.delay_after(meta.attempt)
            )
        if status != "delivered":
            raise Poison(f"webhook {status}")

    return DurableConsumer(
        broker,
        Consumers.WEBHOOK_SENDER,
        jobs_pb2.WebhookDelivery,
        handle,
        batch=CONCURRENT_DELIVERIES,
        concurrency=CONCURRENT_DELIVERIES,
        description="Signed webhooks (jobs, spend alerts), retried until delivered.",
    )
