"""The work item: the one way a chat request or a job becomes the ``InferenceWork`` on
the queue, its priority class, and the record that opens its stream."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2
from sluice.keys.v1 import keys_pb2
from sluice.topology import PriorityClass, Subjects

# The work item's class, as the proto enum (the subject carries it as text).
PRIORITY_PROTO = {
    PriorityClass.INTERACTIVE: chat_pb2.PRIORITY_INTERACTIVE,
    PriorityClass.BATCH: chat_pb2.PRIORITY_BATCH,
    PriorityClass.SYSTEM: chat_pb2.PRIORITY_SYSTEM,
}
SYSTEM_SCOPE = "priority:system"


def resolve_priority(
    key: keys_pb2.ApiKeyRecord, asked: PriorityClass | None, default: PriorityClass
) -> PriorityClass:
    """The class of one request: the one asked for (``x-sluice-priority``; ``system``
    needs the ``priority:system`` scope), else a batch or system key tier, else the
    route's default."""
    if asked is not None:
        if asked is PriorityClass.SYSTEM and not (SYSTEM_SCOPE in key.scopes or "*" in key.scopes):
            raise SluiceError(
                ErrorCode.FORBIDDEN,
                "The system priority class needs a key with the 'priority:system' scope.",
                param="x-sluice-priority",
            )
        return asked
    if key.tier in (PriorityClass.BATCH, PriorityClass.SYSTEM):
        return PriorityClass(key.tier)
    return default


@dataclass(frozen=True)
class CacheInstruction:
    """Where the worker stores a successful answer: the exact-cache key and TTL, and for
    the semantic cache the last user message and the hash of the rest."""

    key: str
    ttl_seconds: int
    semantic_text: str = ""
    semantic_scope: str = ""


def build_work(
    *,
    request_id: str,
    key: keys_pb2.ApiKeyRecord,
    request: chat_pb2.ChatRequest,
    priority: PriorityClass,
    reservation_id: str,
    timeout_seconds: float,
    lifecycle_events: bool = False,
    cache: CacheInstruction | None = None,
    end_user: str = "",
    tags: tuple[str, ...] = (),
    spend_ceiling_usd_nanos: int = 0,
) -> inference_pb2.InferenceWork:
    """The work item; the worker gives up at ``timeout_seconds`` from now, queue time
    included. ``lifecycle_events``: the worker reports started/finished on
    ``SLUICE_LIFECYCLE`` (jobs and idempotent requests follow them). ``end_user`` and
    ``tags`` travel on to the usage event (``domain.labels``). ``spend_ceiling_usd_nanos``:
    the worker cuts the generation past that cost (a key that cuts on a spent budget)."""
    now_ns = time.time_ns()
    work = inference_pb2.InferenceWork(
        request_id=request_id,
        key_id=key.key_id,
        team_id=key.team_id,
        request=request,
        priority=PRIORITY_PROTO[priority],
        stream_subject=Subjects.stream(request_id),
        reservation_id=reservation_id,
        enqueued_unix_nanos=now_ns,
        deadline_unix_nanos=now_ns + int(timeout_seconds * 1e9),
        lifecycle_events=lifecycle_events,
        end_user=end_user,
        tags=tags,
        spend_ceiling_usd_nanos=spend_ceiling_usd_nanos,
    )
    if cache is not None:
        work.cache_key = cache.key
        work.cache_ttl_seconds = cache.ttl_seconds
        if cache.semantic_text:
            work.semantic_text = cache.semantic_text
            work.semantic_scope = cache.semantic_scope
    return work


def opened_event(
    request_id: str,
    key: keys_pb2.ApiKeyRecord,
    request: chat_pb2.ChatRequest,
    created: int,
    *,
    checks: inference_pb2.AnswerChecks | None = None,
    dialect: str = "",
    prompt_tokens: int = 0,
) -> inference_pb2.StreamEvent:
    """Sequence 0 of a request's stream, stored before the work exists: who may resume
    it, and what a replay needs to render it (ownership lives only in JetStream): its
    dialect and what its answer is checked against."""
    event = inference_pb2.StreamEvent(
        request_id=request_id,
        sequence=0,
        opened=inference_pb2.StreamOpened(
            key_id=key.key_id,
            team_id=key.team_id,
            model_requested=request.model,
            created_unix=created,
            stream=request.stream,
            include_usage=request.include_usage,
            dialect=dialect,
            prompt_tokens=prompt_tokens,
        ),
    )
    if checks is not None:
        event.opened.checks.CopyFrom(checks)
    return event


def tokens_so_far(event: inference_pb2.StreamEvent | None) -> int:
    """Output tokens a request has produced, read from the last event of its stream: a
    delta's sequence (one token or more per event), or the usage of its end."""
    if event is None:
        return 0
    kind = event.WhichOneof("body")
    if kind == "delta":
        return int(event.sequence)
    if kind == "final":
        return int(event.final.usage.output_tokens)
    if kind == "failure":
        return int(event.failure.partial_usage.output_tokens)
    return 0
