"""The job tracker: applies every lifecycle event to its job record. One durable
consumer for all gateway replicas, so each event is applied once (and again,
harmlessly, after a redelivery); idempotent requests' events are not jobs' and pass."""

from __future__ import annotations

from sluice.consumers import ConsumerBroker, Delivery, DurableConsumer
from sluice.delivery import Transient
from sluice.errors import SluiceError
from sluice.inference.v1 import lifecycle_pb2
from sluice.topology import Consumers

from services.gateway.domain.jobs.records import JOB_PREFIX
from services.gateway.domain.jobs.service import JobService


class JobTracker:
    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs
        self.applied = 0

    async def handle(self, event: lifecycle_pb2.LifecycleEvent, delivery: Delivery) -> None:
        request_id = delivery.subject.rsplit(".", 1)[-1]
        if not request_id.startswith(JOB_PREFIX):
            return
        try:
            await self.jobs.apply(request_id, event)
        except SluiceError as exc:
            raise Transient(f"lifecycle event for {request_id} not applied: {exc.detail}") from exc
        self.applied += 1


def job_tracker(
    broker: ConsumerBroker, jobs: JobService
) -> DurableConsumer[lifecycle_pb2.LifecycleEvent]:
    tracker = JobTracker(jobs)
    return DurableConsumer(
        broker,
        Consumers.JOB_TRACKER,
        lifecycle_pb2.LifecycleEvent,
        tracker.handle,
        batch=128,
        description="Job records follow the worker's lifecycle events.",
    )
