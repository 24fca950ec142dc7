"""Where the engine's results go on NATS: stream events as core publishes, usage to
JetStream (acknowledged, deduplicated by request id), cache stores as publishes."""

from __future__ import annotations

import asyncio
import logging

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from sluice import telemetry
from sluice.bus import Bus
from sluice.cache.v1 import cache_pb2
from sluice.cost.v1 import cost_pb2
from sluice.inference.v1 import inference_pb2, lifecycle_pb2
from sluice.replay import History, read_history
from sluice.topology import Subjects

log = logging.getLogger(__name__)


class NatsEventSink:
    def __init__(self, bus: Bus, *, usage_timeout: float, usage_attempts: int) -> None:
        self.bus = bus
        self.usage_timeout = usage_timeout
        self.usage_attempts = max(1, usage_attempts)
        self._tracer = trace.get_tracer("sluice.inference_worker")

    async def stream_event(self, subject: str, event: inference_pb2.StreamEvent) -> None:
        if event.HasField("delta"):
            # Token events carry no trace context: nothing reads it per token, and the
            # headers would be written here and parsed by the gateway hundreds of times
            # a second. The terminal event carries it, like every other message.
            await self.bus.nc.publish(subject, event.SerializeToString())
            return
        await self.bus.publish(subject, event)

    async def usage(self, event: cost_pb2.UsageEvent) -> None:
        subject = Subjects.usage(event.key_id or "unknown")
        with self._tracer.start_as_current_span(
            f"{subject} publish",
            kind=SpanKind.PRODUCER,
            attributes=telemetry.messaging_attributes(subject, "publish"),
        ):
            # The consumers (limiter, cost-tracker) continue the trace from these headers.
            await self._publish_durably(
                subject, event.SerializeToString(), event.request_id, what="usage"
            )

    async def cache_store(self, store: cache_pb2.StoreRequest) -> None:
        await self.bus.publish(Subjects.CACHE_STORE, store)

    async def history(self, request_id: str) -> History | None:
        return await read_history(self.bus, request_id)

    async def lifecycle(self, event: lifecycle_pb2.LifecycleEvent) -> None:
        """Durably record a lifecycle event; ``finished`` is deduplicated per request."""
        if event.HasField("finished"):
            msg_id = f"{event.request_id}:finished"
        else:
            msg_id = f"{event.request_id}:started:{event.started.attempt}"
        await self._publish_durably(
            Subjects.lifecycle(event.request_id),
            event.SerializeToString(),
            msg_id,
            what="lifecycle",
        )

    async def _publish_durably(self, subject: str, payload: bytes, msg_id: str, what: str) -> None:
        """An acknowledged JetStream publish, retried with backoff: safe to repeat, since
        the stream deduplicates on ``Nats-Msg-Id``."""
        headers = {"Nats-Msg-Id": msg_id}
        telemetry.inject(headers)
        for attempt in range(1, self.usage_attempts + 1):
            try:
                await self.bus.js.publish(
                    subject, payload, timeout=self.usage_timeout, headers=headers
                )
                return
            except (TimeoutError, NatsTimeoutError, NoRespondersError):
                if attempt == self.usage_attempts:
                    raise
                log.warning("%s publish %s failed; retrying", what, msg_id)
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
