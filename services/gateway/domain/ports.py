"""What the gateway's domain needs from the outside, as protocols; ``adapters/``
implements them over NATS (request/reply, JetStream, KV).

An adapter reports a part that did not answer as a ``SluiceError`` (``service_unavailable``
with a retry hint), never as a NATS exception, so the domain decides what a failure
means without knowing the transport.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sluice.cost.v1 import cost_pb2
from sluice.inference.v1 import inference_pb2, lifecycle_pb2
from sluice.jobs.v1 import jobs_pb2
from sluice.keys.v1 import keys_pb2
from sluice.leases import Unused
from sluice.limiter.v1 import limiter_pb2
from sluice.topology import PriorityClass

from services.gateway.domain.jobs import webhooks

# --- keys -------------------------------------------------------------------------------


class KeyLookup(Protocol):
    async def authenticate(self, secret: str) -> keys_pb2.ApiKeyRecord:
        """The key's record, or ``unauthorized`` (unknown, disabled)."""
        ...


# --- the limiter ------------------------------------------------------------------------


class Limiter(Protocol):
    """The limiter service, as the gateway calls it."""

    async def reserve(self, request: limiter_pb2.ReserveRequest) -> limiter_pb2.ReserveResponse:
        """Admission; raises ``service_unavailable`` when the limiter does not answer
        (fail closed: without it nobody knows what a request may spend)."""
        ...

    def release(self, reservation_id: str, key_id: str, request_id: str) -> None:
        """Give back a reservation that will not be used, off the response path."""
        ...

    def close_lease(self, lease_id: str, key_id: str, unused: Unused) -> None:
        """Hand back what an admission lease never admitted, off the response path."""
        ...

    async def drain(self) -> None:
        """Wait for the releases still in flight (graceful stop)."""
        ...


class Admission(Protocol):
    """What the request path needs of the limiter (``Limiter``, or ``LeasingLimiter``
    in front of it)."""

    async def reserve(self, request: limiter_pb2.ReserveRequest) -> limiter_pb2.ReserveResponse: ...

    def release(self, reservation_id: str, key_id: str, request_id: str) -> None: ...

    async def drain(self) -> None: ...


# --- the cache --------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheResult:
    """``status``: hit, semantic-hit, miss, or error (a silent cache, treated as a miss)."""

    status: str
    answer: inference_pb2.Final | None
    elapsed_ms: float
    # Of a semantic hit: cosine similarity of the stored text to this request's.
    similarity: float | None = None


class CacheLookup(Protocol):
    async def lookup(
        self, cache_key: str, request_id: str, semantic_text: str = "", semantic_scope: str = ""
    ) -> CacheResult:
        """Exact lookup; with a semantic text and scope the cache also looks for an
        answer to a paraphrase after an exact miss. Never raises: a cache that does not
        answer in time is an ``error`` result and the request goes on."""
        ...


# --- durable queues ---------------------------------------------------------------------


class WorkQueue(Protocol):
    """The JetStream queues the gateway writes: the one path to each, with trace
    context and ``Nats-Msg-Id`` deduplication."""

    async def enqueue(self, work: inference_pb2.InferenceWork, priority: PriorityClass) -> int:
        """Queue the work in its class; returns its stream sequence."""
        ...

    async def remove(self, sequence: int) -> bool:
        """Take still-queued work out of the queue; False when a worker has it (or it
        is gone)."""
        ...

    async def publish_usage(self, event: cost_pb2.UsageEvent) -> None: ...

    async def enqueue_webhook(self, delivery: jobs_pb2.WebhookDelivery) -> None: ...


# --- request streams --------------------------------------------------------------------


class LiveEvents(Protocol):
    """One request's stream events as they are published (encoded), in arrival order."""

    async def get(self, wait_seconds: float) -> bytes | None:
        """The next event, or None after ``wait_seconds`` without one."""
        ...

    def ready(self) -> bool:
        """True when an event can be read without waiting."""
        ...

    async def close(self) -> None: ...


class CoalesceClaims(Protocol):
    """Who leads identical concurrent requests (``sluice_coalesce``): the first to
    claim a key, on any replica."""

    async def claim(self, key: str, request_id: str) -> tuple[str, int]:
        """The leader's request id and the claim's revision: ``request_id`` itself when
        this request leads (revision 0 when the store could not be asked: it leads
        alone)."""
        ...

    async def release(self, key: str, revision: int) -> None:
        """Ends a leader's claim, if the key is still at ``revision``."""
        ...


class StreamStore(Protocol):
    """Request streams: live on core NATS, kept in ``SLUICE_STREAMS`` for replay."""

    async def open(self, opened: inference_pb2.StreamEvent) -> LiveEvents:
        """Store the stream's opening record, then follow its live events (in that
        order: the record is not echoed back, and the subscription exists before the
        work that produces events is queued)."""
        ...

    async def watch(self, request_id: str) -> LiveEvents:
        """Follow the live events of a stream opened elsewhere (a resume)."""
        ...

    async def stored(
        self, request_id: str, *, wait_seconds: float
    ) -> list[inference_pb2.StreamEvent] | None:
        """Every stored event in stream order; None when none is stored."""
        ...

    async def last_event(self, request_id: str) -> inference_pb2.StreamEvent | None: ...

    async def cancel(self, request_id: str, reason: str) -> None:
        """Ask the worker running the request (or the next to pick it up) to stop."""
        ...


# --- lifecycle events -------------------------------------------------------------------


class FinishWatch(Protocol):
    async def wait(self, timeout: float) -> lifecycle_pb2.LifecycleEvent | None:
        """The request's ``finished`` event, or None when it did not come in time."""
        ...

    async def close(self) -> None: ...


class JobFeed(Protocol):
    """A job's token events and lifecycle events, stored ones first, then live."""

    async def get(
        self, wait_seconds: float
    ) -> inference_pb2.StreamEvent | lifecycle_pb2.LifecycleEvent | None: ...

    async def close(self) -> None: ...


class LifecycleLog(Protocol):
    """``SLUICE_LIFECYCLE``: what happened to a job or an idempotent request."""

    async def last(self, request_id: str) -> lifecycle_pb2.LifecycleEvent | None: ...

    async def publish_finished(self, event: lifecycle_pb2.LifecycleEvent) -> None:
        """Record a request's end (once: deduplicated per request)."""
        ...

    async def watch_finished(self, request_id: str) -> FinishWatch: ...

    async def follow_job(self, job_id: str) -> JobFeed: ...


# --- records ----------------------------------------------------------------------------


class JobStore(Protocol):
    """Job records by id, and each team's job ids, with revision-checked writes."""

    async def create(self, record: jobs_pb2.JobRecord) -> int: ...

    async def update_if(self, record: jobs_pb2.JobRecord, revision: int) -> bool:
        """Write ``record`` if nobody changed it since ``revision``."""
        ...

    async def get(self, job_id: str) -> tuple[jobs_pb2.JobRecord, int] | None: ...

    async def delete(self, job_id: str) -> None: ...

    async def mutate(
        self, job_id: str, change: Callable[[jobs_pb2.JobRecord], bool]
    ) -> jobs_pb2.JobRecord | None:
        """Apply ``change`` (returns False for no write) with optimistic concurrency."""
        ...

    async def team_job_ids(self, team_id: str) -> list[str]:
        """The team's job ids, newest first."""
        ...


class IdempotencyStore(Protocol):
    """Idempotency records by key; the create is the only arbiter between duplicates."""

    async def create(self, key: str, record: jobs_pb2.IdempotencyRecord) -> int | None:
        """The new record's revision, or None when the key already has a record."""
        ...

    async def get(self, key: str) -> tuple[jobs_pb2.IdempotencyRecord, int] | None: ...

    async def update(self, key: str, record: jobs_pb2.IdempotencyRecord, revision: int) -> bool:
        """Write if still at ``revision``; False when another write came first."""
        ...

    async def delete(self, key: str, revision: int) -> None:
        """Delete if still at ``revision``; otherwise leave it."""
        ...


class WebhookPoster(Protocol):
    async def attempt(
        self, delivery: jobs_pb2.WebhookDelivery, secret: str
    ) -> webhooks.AttemptResult:
        """One signed POST of the delivery; never raises for the receiver's failures."""
        ...


class WebhookSecretStore(Protocol):
    """One Standard Webhooks signing secret per team, and endpoints that said 410 Gone."""

    async def get(self, team_id: str) -> str: ...

    async def disable(self, team_id: str, url: str) -> None: ...

    async def is_disabled(self, team_id: str, url: str) -> bool: ...
