"""What the sync and async clients share: configuration, headers, the retry rules and
the reading of answers. Neither does I/O here."""

from __future__ import annotations

import json
import os
import random
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import httpx

from sluice_client import errors
from sluice_client._sse import SseEvent
from sluice_client.types import ChatCompletionChunk, JobEvent, MessageStreamEvent, ResponseInfo

__version__ = "0.1.0"

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
IDEMPOTENCY_HEADER = "Idempotency-Key"
CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
ANTHROPIC_VERSION = "2023-06-01"
TERMINAL_JOB_STATUSES = frozenset({"completed", "failed", "cancelled"})

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and full jitter.

    ``max_retries`` is the number of attempts after the first (for a stream: of
    consecutive failed reconnects). A ``Retry-After`` from the gateway is waited
    instead of the backoff, up to ``max_retry_after`` seconds."""

    max_retries: int = 4
    backoff_base: float = 0.25
    backoff_max: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (from 1)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return random.uniform(ceiling / 2, ceiling)


def resolve_api_key(api_key: str | None) -> str:
    key = api_key or os.environ.get("SLUICE_API_KEY")
    if not key:
        raise errors.SluiceError(
            "No API key: pass api_key= or set SLUICE_API_KEY.", code="unauthorized"
        )
    return key


def resolve_base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get("SLUICE_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def default_headers(api_key: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    headers = {
        "Authorization": f"Bearer {api_key}",
        "User-Agent": f"sluice-client-python/{__version__}",
        "Accept": "application/json",
    }
    headers.update(extra or {})
    return headers


def new_idempotency_key() -> str:
    """One per logical call, reused by every retry of it."""
    return str(uuid.uuid4())


def drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def chat_body(
    model: str, messages: Iterable[Mapping[str, Any]], extra: Mapping[str, Any]
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": list(messages)}
    body.update(drop_none(extra))
    return body


def extra_headers(
    *,
    idempotency_key: str | None = None,
    tags: Iterable[str] | None = None,
    priority: str | None = None,
    cache_control: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The Sluice request headers a call asked for."""
    out: dict[str, str] = {}
    if idempotency_key is not None:
        out[IDEMPOTENCY_HEADER] = idempotency_key
    if tags:
        out["x-sluice-tags"] = ",".join(tags)
    if priority:
        out["x-sluice-priority"] = priority
    if cache_control:
        out["Cache-Control"] = cache_control
    out.update(headers or {})
    return out


def is_retryable(err: errors.SluiceError, response: httpx.Response | None) -> bool:
    """Whether another attempt may get another answer: 429, 503 and 409 while the first
    request with the key still runs; never a replayed (stored) answer, nor one the
    gateway marks ``x-should-retry: false``."""
    if response is not None:
        if response.headers.get("idempotent-replayed", "").lower() == "true":
            return False
        if response.headers.get("x-should-retry", "").lower() == "false":
            return False
    if isinstance(err, errors.IdempotencyKeyInUse | errors.RateLimited):
        return True
    return err.status == 503


def connection_retryable(exc: httpx.TransportError, *, safe: bool) -> bool:
    """A broken exchange may be sent again when repeating it is harmless (``safe``: a
    GET, or a POST with an ``Idempotency-Key``), or when the request never left."""
    if safe:
        return True
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


def response_info(response: httpx.Response, idempotency_key: str | None) -> ResponseInfo:
    headers = response.headers
    return ResponseInfo(
        request_id=headers.get("x-request-id") or headers.get("request-id"),
        trace_id=errors.trace_id_of(headers),
        idempotency_key=idempotency_key,
        idempotent_replayed=headers.get("idempotent-replayed", "").lower() == "true",
        cache=headers.get("x-sluice-cache"),
        status_code=response.status_code,
        headers=dict(headers),
    )


def parse_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise errors.SluiceError(
            "The gateway's answer is not JSON.",
            code="invalid_response",
            status=response.status_code,
            trace_id=errors.trace_id_of(response.headers),
            request_id=response.headers.get("x-request-id"),
        ) from exc


def raise_for_event(event: SseEvent) -> None:
    """An SSE ``error`` event as its typed error."""
    if event.event != "error":
        return
    try:
        problem = json.loads(event.data)
    except ValueError:
        problem = {"detail": event.data}
    if not isinstance(problem, dict):
        problem = {"detail": str(problem)}
    raise errors.from_problem(problem)


def chunk_of(event: SseEvent) -> ChatCompletionChunk:
    chunk = ChatCompletionChunk.model_validate_json(event.data)
    chunk.event_id = event.id
    return chunk


def message_event_of(event: SseEvent) -> MessageStreamEvent:
    return MessageStreamEvent.model_validate_json(event.data)


def job_event_of(event: SseEvent) -> JobEvent | None:
    if event.event == "status":
        return JobEvent(event="status", job=json.loads(event.data))
    if event.event == "token":
        token = json.loads(event.data)
        return JobEvent(event="token", **token)
    return None


def usage_params(
    *,
    since: str | datetime | None,
    until: str | datetime | None,
    group_by: Iterable[str] | str | None,
    key_id: str | None,
    team_id: str | None,
    model: str | None,
    provider: str | None,
    end_user: str | None,
    tag: str | None,
    limit: int | None,
) -> dict[str, str]:
    def when(value: str | datetime | None) -> str | None:
        return value.isoformat() if isinstance(value, datetime) else value

    groups = group_by if isinstance(group_by, str) or group_by is None else ",".join(group_by)
    params = {
        "since": when(since),
        "until": when(until),
        "group_by": groups,
        "key_id": key_id,
        "team_id": team_id,
        "model": model,
        "provider": provider,
        "end_user": end_user,
        "tag": tag,
        "limit": str(limit) if limit is not None else None,
    }
    return {k: v for k, v in params.items() if v is not None}


def interrupted(detail: str, stream_id: str | None) -> errors.StreamInterrupted:
    return errors.StreamInterrupted(detail, code="stream_interrupted", request_id=stream_id)


def connection_error(exc: Exception, attempts: int) -> errors.APIConnectionError:
    return errors.APIConnectionError(
        f"The gateway could not be reached after {attempts} attempt(s): {exc!r}",
        code="connection_error",
    )
