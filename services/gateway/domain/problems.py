"""The one error envelope: RFC 9457 problem+json with an OpenAI-shaped ``error`` member."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson
from sluice.errors import PROBLEM_TYPE_BASE, ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2

from services.gateway.domain.verdict import Checks, Verdict

PROBLEM_CONTENT_TYPE = "application/problem+json"


@dataclass
class GatewayError(SluiceError):
    """A ``SluiceError`` that also carries response headers (rate limits, Retry-After)."""

    headers: dict[str, str] = field(default_factory=dict)


def _sentence(text: str) -> str:
    # Details written on the bus (the worker's) are often bare clauses; the fix that
    # follows must not run on from them.
    return text if not text or text[-1] in ".!?" else text + "."


def problem_body(
    err: SluiceError, *, instance: str, request_id: str, trace_id: str
) -> dict[str, Any]:
    spec = err.spec
    code = str(err.code)
    detail = err.detail if spec.fix in err.detail else f"{_sentence(err.detail)} {spec.fix}"
    return {
        "type": PROBLEM_TYPE_BASE + code,
        "title": spec.title,
        "status": err.status,
        "detail": detail,
        "instance": instance,
        "code": code,
        "trace_id": trace_id,
        "request_id": request_id,
        "details": err.details,
        "error": {
            "message": detail,
            "type": spec.openai_type,
            "code": code,
            "param": err.param,
        },
    }


def render_problem(err: SluiceError, *, instance: str, request_id: str, trace_id: str) -> bytes:
    return orjson.dumps(
        problem_body(err, instance=instance, request_id=request_id, trace_id=trace_id),
        default=str,
    )


def problem_headers(err: SluiceError) -> dict[str, str]:
    headers: dict[str, str] = {}
    if isinstance(err, GatewayError):
        headers.update(err.headers)
    if err.retry_after_ms:
        headers["retry-after"] = str(max(1, math.ceil(err.retry_after_ms / 1000)))
        headers["retry-after-ms"] = str(err.retry_after_ms)
    elif err.spec.retryable and err.status >= 500:
        headers.setdefault("retry-after", "1")
    if not err.spec.retryable:
        # The OpenAI SDK would otherwise retry some of these (409, 5xx) on its own.
        headers["x-should-retry"] = "false"
    return headers


def unavailable(detail: str) -> GatewayError:
    return GatewayError(ErrorCode.SERVICE_UNAVAILABLE, detail, retry_after_ms=1000)


def failure_error(failure: inference_pb2.Failure, headers: dict[str, str]) -> GatewayError:
    """The error a worker's ``Failure`` is for the client, with its partial usage."""
    err = SluiceError.from_proto(failure.problem)
    details = dict(err.details)
    if failure.HasField("partial_usage"):
        details["partial_usage"] = {
            "input_tokens": failure.partial_usage.input_tokens,
            "output_tokens": failure.partial_usage.output_tokens,
        }
    return GatewayError(
        err.code,
        err.detail,
        details=details,
        param=err.param,
        retry_after_ms=err.retry_after_ms,
        status_override=err.status_override,
        headers=headers,
    )


def timeout_error(
    headers: dict[str, str], elapsed_ms: int | None = None, deadline_ms: int | None = None
) -> GatewayError:
    """504 model_timeout: no answer before the request's deadline (the route's, or the
    gateway's request timeout), with how long it ran and what the deadline was."""
    details: dict[str, int] = {}
    if elapsed_ms is not None:
        details["elapsed_ms"] = elapsed_ms
    if deadline_ms is not None:
        details["deadline_ms"] = deadline_ms
    return GatewayError(
        ErrorCode.MODEL_TIMEOUT,
        "No answer arrived before the request deadline.",
        details=details,
        headers=headers,
    )


def insufficient_confidence(
    verdict: Verdict, checks: Checks, headers: dict[str, str]
) -> GatewayError:
    """422 for an answer below the caller's minimum confidence (it was made, and is
    billed; ``details`` say by how much it missed)."""
    measured = "unmeasured" if verdict.confidence is None else f"{verdict.confidence:.3f}"
    return GatewayError(
        ErrorCode.INSUFFICIENT_CONFIDENCE,
        f"The answer's confidence ({measured}) is below the minimum asked for "
        f"({checks.min_confidence}).",
        details={
            "confidence": None if verdict.confidence is None else round(verdict.confidence, 6),
            "min_confidence": checks.min_confidence,
            "status": str(verdict.status),
        },
        param="x-sluice-min-confidence",
        headers=headers,
    )


def with_member(body: bytes, name: str, value: Any) -> bytes:
    """A rendered error object with one more top-level member (a stream's last event
    carries the answer's ``sluice`` status)."""
    data = orjson.loads(body)
    if isinstance(data, dict):
        data[name] = value
    return orjson.dumps(data, default=str)
