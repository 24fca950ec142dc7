"""``EventSink`` on NATS: where the engine's results go. Stream events as core publishes,
usage and lifecycle records to JetStream (acknowledged, deduplicated by message id, each
attempt in a PRODUCER span), cache stores as publishes; and a request's stored history
read back for a takeover."""

from __future__ import annotations

import asyncio
import logging

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from sluice.bus import NATS_FAILURES, Bus
from sluice.cache.v1 import cache_pb2
from sluice.cost.v1 import cost_pb2
from sluice.inference.v1 import inference_pb2, lifecycle_pb2
from sluice.replay import History, read_history
from sluice.topology import PREFIX, Subjects

log = logging.getLogger(__name__)


class NatsEventSink:
    def __init__(
        self,
        bus: Bus,
        *,
        usage_timeout: float,
        usage_attempts: int,
        cache_timeout: float = 0.5,
    ) -> None:
        self.bus = bus
        self.cache_timeout = cache_timeout
        self.usage_timeout = usage_timeout
        self.usage_attempts = max(1, usage_attempts)

    async def stream_event(self, subject: str, event: inference_pb2.StreamEvent) -> None:
        if event.HasField("delta"):
            # Token events carry no trace context: nothing reads it per token, and the
            # headers would be written here and parsed by the gateway hundreds of times
            # a second. The terminal event carries it, like every other message.
            await self.bus.publish(subject, event, traced=False)
            return
        await self.bus.publish(subject, event)

    async def usage(self, event: cost_pb2.UsageEvent) -> None:
        # The consumers (limiter, cost-tracker) continue the trace from its headers.
        await self._publish_durably(
            Subjects.usage(event.key_id or "unknown"),
            event.SerializeToString(),
            event.request_id,
            what="usage",
            # The subject names the key: the span's name must not (low cardinality).
            span_name=f"{PREFIX}.usage",
        )

    async def cache_store(self, store: cache_pb2.StoreRequest) -> None:
        await self.bus.publish(Subjects.CACHE_STORE, store)

    async def cached_answer(self, cache_key: str, request_id: str) -> inference_pb2.Final | None:
        try:
            reply = await self.bus.request(
                Subjects.CACHE_LOOKUP,
                cache_pb2.LookupRequest(cache_key=cache_key, request_id=request_id),
                cache_pb2.LookupResponse,
                timeout=self.cache_timeout,
            )
        except NATS_FAILURES as exc:
            # A last resort that cannot be had: the template or the 503 follows.
            log.warning("last-resort cache lookup failed: %s", type(exc).__name__)
            return None
        return reply.answer if reply.hit and reply.HasField("answer") else None

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
            # The subject holds the request id; the span name does not.
            span_name=f"{PREFIX}.lifecycle",
        )

    async def _publish_durably(
        self, subject: str, payload: bytes, msg_id: str, *, what: str, span_name: str | None = None
    ) -> None:
        """An acknowledged JetStream publish, retried with backoff: safe to repeat, since
        the stream deduplicates on ``Nats-Msg-Id``."""
        for attempt in range(1, self.usage_attempts + 1):
            try:
                await self.bus.publish_durable(
                    subject,
                    payload,
                    msg_id=msg_id,
                    timeout=self.usage_timeout,
                    span_name=span_name,
                )
                return
            except (TimeoutError, NatsTimeoutError, NoRespondersError):
                if attempt == self.usage_attempts:
                    raise
                log.warning("%s publish %s failed; retrying", what, msg_id)
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
