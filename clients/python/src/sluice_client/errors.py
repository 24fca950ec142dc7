"""Typed errors, one class per family of the gateway's error ``code``.

Every error the gateway answers is RFC 9457 problem+json (or, on ``/v1/messages``, an
Anthropic error body) with a stable ``code``, a ``trace_id`` and a ``request_id``; the
client raises the class registered for that code, so callers can ``except
RateLimited`` rather than compare strings. Codes this version does not know yet become a
plain ``SluiceError`` (or the class of their HTTP status), never a crash.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

__all__ = [
    "APIConnectionError",
    "BadRequest",
    "Cancelled",
    "Conflict",
    "ContextLengthExceeded",
    "Forbidden",
    "IdempotencyKeyInUse",
    "IdempotencyKeyReused",
    "InsufficientScope",
    "InternalError",
    "KeyExpired",
    "ModelNotAllowed",
    "ModelNotFound",
    "NotFound",
    "RateLimited",
    "ServiceUnavailable",
    "SluiceError",
    "StreamInterrupted",
    "Unauthorized",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamStreamInterrupted",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "raise_for_job",
]


class SluiceError(Exception):
    """An error answered by the gateway (or, for ``APIConnectionError``, the lack of an
    answer). ``trace_id`` finds the request's trace (``sluice trace <id>``)."""

    code: str
    status: int | None
    title: str
    detail: str
    trace_id: str | None
    request_id: str | None
    retry_after: float | None
    param: str | None
    details: dict[str, Any]
    body: Any

    def __init__(
        self,
        detail: str,
        *,
        code: str = "",
        status: int | None = None,
        title: str = "",
        trace_id: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        param: str | None = None,
        details: Mapping[str, Any] | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.status = status
        self.title = title
        self.detail = detail
        self.trace_id = trace_id
        self.request_id = request_id
        self.retry_after = retry_after
        self.param = param
        self.details = dict(details or {})
        self.body = body

    def __str__(self) -> str:
        head = f"{self.status} {self.code}" if self.status else self.code or "error"
        tail = f" (trace_id={self.trace_id})" if self.trace_id else ""
        return f"{head}: {self.detail}{tail}"


class APIConnectionError(SluiceError):
    """The gateway could not be reached, or the connection broke, on every attempt."""


class StreamInterrupted(APIConnectionError):
    """A stream's connection broke and resuming it failed on every attempt."""


class BadRequest(SluiceError):
    """400: the request is not valid (``param`` names the field or header)."""


class ContextLengthExceeded(BadRequest):
    """400 ``context_length_exceeded``."""


class Unauthorized(SluiceError):
    """401: missing, unknown or revoked key."""


class KeyExpired(Unauthorized):
    """401 ``key_expired``: the key's expiry or rotation grace has passed."""


class Forbidden(SluiceError):
    """403: the key may not do this."""


class InsufficientScope(Forbidden):
    """403 ``insufficient_scope``: ``details['scope']`` names the scope needed."""


class ModelNotAllowed(Forbidden):
    """403 ``model_not_allowed``: the model is outside the key's allow-list."""


class NotFound(SluiceError):
    """404: no such route, job or stream (or another team's)."""


class ModelNotFound(NotFound):
    """404 ``model_not_found``."""


class Conflict(SluiceError):
    """409: a conflicting state."""


class IdempotencyKeyInUse(Conflict):
    """409 ``idempotency_key_in_use``: the first request with this key still runs."""


class Cancelled(Conflict):
    """409 ``cancelled``: the request or job was cancelled before it finished."""


class IdempotencyKeyReused(SluiceError):
    """422 ``idempotency_key_reused``: the same key came with another body."""


class RateLimited(SluiceError):
    """429: wait ``retry_after`` seconds."""


class UpstreamRateLimited(RateLimited):
    """429 ``upstream_rate_limited``: the provider throttles."""


class InternalError(SluiceError):
    """500 ``internal_error``."""


class UpstreamError(SluiceError):
    """5xx: the provider failed or rejected the request."""


class UpstreamUnavailable(UpstreamError):
    """503 ``upstream_unavailable``: no provider for this model answered."""


class UpstreamTimeout(UpstreamError):
    """504 ``upstream_timeout``."""


class UpstreamStreamInterrupted(UpstreamError):
    """502 ``upstream_stream_interrupted``: the provider's stream broke; the answer is
    partial."""


class ServiceUnavailable(SluiceError):
    """503 ``service_unavailable``: a Sluice service is not answering."""


_BY_CODE: dict[str, type[SluiceError]] = {
    "invalid_request": BadRequest,
    "invalid_json": BadRequest,
    "unsupported_media_type": BadRequest,
    "payload_too_large": BadRequest,
    "method_not_allowed": BadRequest,
    "context_length_exceeded": ContextLengthExceeded,
    "unauthorized": Unauthorized,
    "invalid_token": Unauthorized,
    "key_expired": KeyExpired,
    "forbidden": Forbidden,
    "insufficient_scope": InsufficientScope,
    "model_not_allowed": ModelNotAllowed,
    "not_found": NotFound,
    "model_not_found": ModelNotFound,
    "conflict": Conflict,
    "idempotency_key_in_use": IdempotencyKeyInUse,
    "cancelled": Cancelled,
    "idempotency_key_reused": IdempotencyKeyReused,
    "rate_limited": RateLimited,
    "upstream_rate_limited": UpstreamRateLimited,
    "internal_error": InternalError,
    "upstream_error": UpstreamError,
    "upstream_unavailable": UpstreamUnavailable,
    "upstream_timeout": UpstreamTimeout,
    "upstream_stream_interrupted": UpstreamStreamInterrupted,
    "service_unavailable": ServiceUnavailable,
}

_BY_STATUS: dict[int, type[SluiceError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: IdempotencyKeyReused,
    429: RateLimited,
    500: InternalError,
    502: UpstreamError,
    503: ServiceUnavailable,
    504: UpstreamTimeout,
}


def error_class(code: str, status: int | None) -> type[SluiceError]:
    """The class for a ``code`` (else for the HTTP ``status``)."""
    found = _BY_CODE.get(code)
    if found is not None:
        return found
    if status is not None:
        return _BY_STATUS.get(status, SluiceError)
    return SluiceError


def _retry_after(headers: Mapping[str, str]) -> float | None:
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    seconds = headers.get("retry-after")
    if seconds:
        try:
            return max(0.0, float(seconds))
        except ValueError:
            return None
    return None


def trace_id_of(headers: Mapping[str, str]) -> str | None:
    """The trace id in a W3C ``traceparent`` header."""
    parts = headers.get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def from_problem(
    problem: Mapping[str, Any],
    *,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> SluiceError:
    """The typed error for a problem object (problem+json, an Anthropic error body, an
    SSE ``error`` event's data or a job's ``error``)."""
    headers = headers or {}
    nested = problem.get("error")
    nested = nested if isinstance(nested, Mapping) else {}
    code = str(problem.get("code") or nested.get("code") or "")
    raw_status = problem.get("status")
    status = raw_status if isinstance(raw_status, int) else status
    detail = str(problem.get("detail") or nested.get("message") or problem.get("title") or "")
    param = problem.get("param", nested.get("param"))
    details = problem.get("details")
    cls = error_class(code, status)
    return cls(
        detail or f"HTTP {status}",
        code=code,
        status=status,
        title=str(problem.get("title") or ""),
        trace_id=str(problem.get("trace_id") or "") or trace_id_of(headers),
        request_id=str(problem.get("request_id") or "")
        or headers.get("x-request-id")
        or headers.get("request-id"),
        retry_after=_retry_after(headers),
        param=str(param) if param else None,
        details=details if isinstance(details, Mapping) else None,
        body=dict(problem),
    )


def from_response(response: httpx.Response, content: bytes | None = None) -> SluiceError:
    """The typed error for an HTTP error response (its body already read)."""
    raw = response.content if content is None else content
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    if not data:
        data = {"detail": raw.decode("utf-8", "replace")[:500] or response.reason_phrase}
    return from_problem(data, status=response.status_code, headers=response.headers)


def raise_for_job(job: Any) -> None:
    """Raises a failed or cancelled job's problem as its typed error (``job`` is a
    ``Job``; a completed or running one passes)."""
    problem = getattr(job, "error", None)
    if getattr(job, "status", "") in ("failed", "cancelled") and isinstance(problem, Mapping):
        raise from_problem(problem)
    if getattr(job, "status", "") == "cancelled":
        raise Cancelled("The job was cancelled.", code="cancelled", status=409)
