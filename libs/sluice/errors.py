"""The error catalogue: one stable code per failure a client can see.

Each code knows its HTTP status, its gRPC status (``google.rpc.Code``), the OpenAI and
Anthropic error types the official SDKs expect, a title, and a sentence that tells the
caller how to fix it. Transports map ``SluiceError`` to their wire shape in one place
each (problem+json at the gateway, ``chat_pb2.Problem`` on the bus, a gRPC status at
``sluice.grpc_edge``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from google.rpc import code_pb2

from sluice.common.v1 import chat_pb2

PROBLEM_TYPE_BASE = "https://sluice.dev/problems/"


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    title: str
    fix: str
    openai_type: str
    anthropic_type: str
    retryable: bool = False
    # The gRPC status (a google.rpc.Code) a servicer's SluiceError becomes (sluice.grpc_edge).
    rpc_code: int = field(kw_only=True)


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    INVALID_JSON = "invalid_json"
    UNAUTHORIZED = "unauthorized"
    INVALID_SERVICE_TOKEN = "invalid_service_token"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    MODEL_NOT_FOUND = "model_not_found"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    RATE_LIMITED = "rate_limited"
    BUDGET_EXCEEDED = "budget_exceeded"
    UPSTREAM_RATE_LIMITED = "upstream_rate_limited"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_STREAM_INTERRUPTED = "upstream_stream_interrupted"
    SERVICE_UNAVAILABLE = "service_unavailable"
    LIMITER_UNAVAILABLE = "limiter_unavailable"
    INTERNAL_ERROR = "internal_error"
    IDEMPOTENCY_KEY_IN_USE = "idempotency_key_in_use"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    CANCELLED = "cancelled"
    KEY_EXPIRED = "key_expired"
    INVALID_TOKEN = "invalid_token"
    INSUFFICIENT_SCOPE = "insufficient_scope"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    CONFLICT = "conflict"
    INSUFFICIENT_CONFIDENCE = "insufficient_confidence"
    CONTENT_FILTER_TRIGGERED = "content_filter_triggered"
    UNSUPPORTED_CONTENT = "unsupported_content"
    MODEL_TIMEOUT = "model_timeout"
    MODEL_RETIRED = "model_retired"
    UNSUPPORTED_API_VERSION = "unsupported_api_version"


CATALOGUE: dict[ErrorCode, ErrorSpec] = {
    ErrorCode.INVALID_REQUEST: ErrorSpec(
        400,
        "Invalid request",
        "Correct the field or header named in error.param or details, then send the request again.",
        "invalid_request_error",
        "invalid_request_error",
        rpc_code=code_pb2.INVALID_ARGUMENT,
    ),
    ErrorCode.INVALID_JSON: ErrorSpec(
        400,
        "Malformed JSON body",
        "Send a valid JSON object with Content-Type: application/json.",
        "invalid_request_error",
        "invalid_request_error",
        rpc_code=code_pb2.INVALID_ARGUMENT,
    ),
    ErrorCode.UNAUTHORIZED: ErrorSpec(
        401,
        "Missing or invalid API key",
        "Send 'Authorization: Bearer <key>' (or 'x-api-key: <key>') with a valid Sluice key.",
        "authentication_error",
        "authentication_error",
        rpc_code=code_pb2.UNAUTHENTICATED,
    ),
    ErrorCode.INVALID_SERVICE_TOKEN: ErrorSpec(
        401,
        "Missing or invalid service token",
        "Send 'authorization: Bearer <token>' metadata with the service token: "
        "SLUICE_SERVICE_TOKEN, or in a local environment the file service-token in the "
        "state directory.",
        "authentication_error",
        "authentication_error",
        rpc_code=code_pb2.UNAUTHENTICATED,
    ),
    ErrorCode.FORBIDDEN: ErrorSpec(
        403,
        "Not allowed for this key",
        "Use a key whose scopes allow this operation.",
        "permission_error",
        "permission_error",
        rpc_code=code_pb2.PERMISSION_DENIED,
    ),
    ErrorCode.NOT_FOUND: ErrorSpec(
        404,
        "Not found",
        "Check the path; GET /docs lists every route.",
        "invalid_request_error",
        "not_found_error",
        rpc_code=code_pb2.NOT_FOUND,
    ),
    ErrorCode.METHOD_NOT_ALLOWED: ErrorSpec(
        405,
        "Method not allowed",
        "Use a method the route accepts; GET /docs lists them.",
        "invalid_request_error",
        "invalid_request_error",
        rpc_code=code_pb2.UNIMPLEMENTED,
    ),
    ErrorCode.MODEL_NOT_FOUND: ErrorSpec(
        404,
        "Unknown model",
        "Use one of the models listed by GET /v1/models.",
        "invalid_request_error",
        "not_found_error",
        rpc_code=code_pb2.NOT_FOUND,
    ),
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: ErrorSpec(
        415,
        "Unsupported media type",
        "Send the body as JSON with Content-Type: application/json.",
        "invalid_request_error",
        "invalid_request_error",
        rpc_code=code_pb2.INVALID_ARGUMENT,
    ),
    ErrorCode.PAYLOAD_TOO_LARGE: ErrorSpec(
        413,
        "Request body too large",
        "Send a smaller body, or upload large context separately.",
        "invalid_request_error",
        "request_too_large",
        rpc_code=code_pb2.RESOURCE_EXHAUSTED,
    ),
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: ErrorSpec(
        400,
        "Context length exceeded",
        "Shorten the messages or lower max_tokens to fit the model's context window.",
        "invalid_request_error",
        "invalid_request_error",
        rpc_code=code_pb2.INVALID_ARGUMENT,
    ),
    ErrorCode.RATE_LIMITED: ErrorSpec(
        429,
        "Rate limit reached",
        "Wait for the time in Retry-After, or lower max_tokens to reserve fewer tokens.",
        "rate_limit_error",
        "rate_limit_error",
        retryable=True,
        rpc_code=code_pb2.RESOURCE_EXHAUSTED,
    ),
    ErrorCode.BUDGET_EXCEEDED: ErrorSpec(
        429,
        "Budget used up",
        "The USD budget named in details.policy is spent for this period; wait for the "
        "time in Retry-After (the next UTC day or month) or ask an administrator to raise it.",
        "insufficient_quota",
        "rate_limit_error",
        retryable=False,
        rpc_code=code_pb2.RESOURCE_EXHAUSTED,
    ),
    ErrorCode.UPSTREAM_RATE_LIMITED: ErrorSpec(
        429,
        "Provider rate limit reached",
        "Retry after the time in Retry-After; the provider is throttling.",
        "rate_limit_error",
        "rate_limit_error",
        retryable=True,
        rpc_code=code_pb2.RESOURCE_EXHAUSTED,
    ),
    ErrorCode.UPSTREAM_ERROR: ErrorSpec(
        502,
        "Provider error",
        "Retry the request; if it persists, the provider rejected or failed it.",
        "api_error",
        "api_error",
        retryable=True,
        rpc_code=code_pb2.UNAVAILABLE,
    ),
    ErrorCode.UPSTREAM_UNAVAILABLE: ErrorSpec(
        503,
        "Provider unavailable",
        "Retry after the time in Retry-After; no provider for this model answered.",
        "api_error",
        "overloaded_error",
        retryable=True,
        rpc_code=code_pb2.UNAVAILABLE,
    ),
    ErrorCode.MODEL_TIMEOUT: ErrorSpec(
        504,
        "Model deadline passed",
        "The route's total deadline (details.deadline_ms) passed before any deployment "
        "answered: retry later, ask for fewer tokens, or submit the request as a job.",
        "api_error",
        "api_error",
        retryable=True,
        rpc_code=code_pb2.DEADLINE_EXCEEDED,
    ),
    ErrorCode.UNSUPPORTED_API_VERSION: ErrorSpec(
        400,
        "Unsupported API version",
        "Send 'Sluice-Version: YYYY-MM-DD' with a version in details.supported, or no "
        "header to get your key's version.",
        "invalid_request_error",
        "invalid_request_error",
        rpc_code=code_pb2.INVALID_ARGUMENT,
    ),
    ErrorCode.MODEL_RETIRED: ErrorSpec(
        410,
        "Model retired",
        "This model passed its sunset date: ask for the model named in details.replacement "
        "(GET /v1/models lists what is served).",
        "invalid_request_error",
        "not_found_error",
        rpc_code=code_pb2.FAILED_PRECONDITION,
    ),
    ErrorCode.UPSTREAM_TIMEOUT: ErrorSpec(
        504,
        "Provider timed out",
        "Retry, ask for fewer tokens, or submit the request as a job.",
        "api_error",
        "api_error",
        retryable=True,
        rpc_code=code_pb2.DEADLINE_EXCEEDED,
    ),
    ErrorCode.UPSTREAM_STREAM_INTERRUPTED: ErrorSpec(
        502,
        "Provider stream interrupted",
        "The answer is partial; resume or retry the request.",
        "api_error",
        "api_error",
        retryable=True,
        rpc_code=code_pb2.ABORTED,
    ),
    ErrorCode.SERVICE_UNAVAILABLE: ErrorSpec(
        503,
        "Gateway temporarily unavailable",
        "Retry after the time in Retry-After; a Sluice service is not answering.",
        "api_error",
        "overloaded_error",
        retryable=True,
        rpc_code=code_pb2.UNAVAILABLE,
    ),
    ErrorCode.LIMITER_UNAVAILABLE: ErrorSpec(
        503,
        "Rate limiter unavailable",
        "Retry after the time in Retry-After; the rate limiter is not answering and this "
        "team's tier admits nothing it cannot count (limiter_failure: fail_closed).",
        "api_error",
        "overloaded_error",
        retryable=True,
        rpc_code=code_pb2.UNAVAILABLE,
    ),
    ErrorCode.INTERNAL_ERROR: ErrorSpec(
        500,
        "Internal error",
        "Retry; if it persists, report the trace id.",
        "api_error",
        "api_error",
        retryable=True,
        rpc_code=code_pb2.INTERNAL,
    ),
    ErrorCode.IDEMPOTENCY_KEY_IN_USE: ErrorSpec(
        409,
        "Idempotency key in use",
        "The first request with this Idempotency-Key is still running; retry after "
        "Retry-After to get its response.",
        "invalid_request_error",
        "invalid_request_error",
        retryable=True,
        rpc_code=code_pb2.ABORTED,
    ),
    ErrorCode.IDEMPOTENCY_KEY_REUSED: ErrorSpec(
        422,
        "Idempotency key reused",
        "Use a new Idempotency-Key for a different request body.",
        "invalid_request_error",
        "invalid_request_error",
        rpc_code=code_pb2.FAILED_PRECONDITION,
    ),
    ErrorCode.CANCELLED: ErrorSpec(
        409,
        "Cancelled",
        "The request was cancelled before it finished; submit it again to run it.",
        "invalid_request_error",
        "invalid_request_error",
        rpc_code=code_pb2.CANCELLED,
    ),
    ErrorCode.KEY_EXPIRED: ErrorSpec(
        401,
        "API key expired",
        "The key's expiry or rotation grace has passed: use its replacement, or ask an "
        "admin for a new key (sluice keys create).",
        "authentication_error",
        "authentication_error",
        rpc_code=code_pb2.UNAUTHENTICATED,
    ),
    ErrorCode.INVALID_TOKEN: ErrorSpec(
        401,
        "Invalid bearer token",
        "Send a JWT from a configured issuer, for this gateway's audience, signed by a key "
        "of the issuer's JWKS and not expired (details.reason says which check failed).",
        "authentication_error",
        "authentication_error",
        rpc_code=code_pb2.UNAUTHENTICATED,
    ),
    ErrorCode.INSUFFICIENT_SCOPE: ErrorSpec(
        403,
        "Missing scope",
        "Use a key (or token) with the scope named in details.scope.",
        "permission_error",
        "permission_error",
        rpc_code=code_pb2.PERMISSION_DENIED,
    ),
    ErrorCode.MODEL_NOT_ALLOWED: ErrorSpec(
        403,
        "Model not allowed for this key",
        "Use a model of the key's allow-list (details.allowed), or ask an admin to add it.",
        "permission_error",
        "permission_error",
        rpc_code=code_pb2.PERMISSION_DENIED,
    ),
    ErrorCode.CONFLICT: ErrorSpec(
        409,
        "Conflict",
        "Something with this name or id exists already: choose another, or update it.",
        "invalid_request_error",
        "invalid_request_error",
        rpc_code=code_pb2.ALREADY_EXISTS,
    ),
    ErrorCode.INSUFFICIENT_CONFIDENCE: ErrorSpec(
        422,
        "Answer below the required confidence",
        "The model's answer scored below the minimum you asked for (details.confidence "
        "against details.min_confidence): rephrase, use a stronger model, or lower "
        "x-sluice-min-confidence.",
        "invalid_request_error",
        "invalid_request_error",
        rpc_code=code_pb2.FAILED_PRECONDITION,
    ),
    ErrorCode.CONTENT_FILTER_TRIGGERED: ErrorSpec(
        400,
        "Content filter triggered",
        "Remove the content that matched the rule named in details.rule, then send the "
        "request again.",
        "invalid_request_error",
        "invalid_request_error",
        rpc_code=code_pb2.INVALID_ARGUMENT,
    ),
    ErrorCode.UNSUPPORTED_CONTENT: ErrorSpec(
        400,
        "Content the model cannot take",
        "Send only text to this model, or use a model whose capabilities (GET /v1/models) "
        "include the input named in details.content.",
        "invalid_request_error",
        "invalid_request_error",
        rpc_code=code_pb2.INVALID_ARGUMENT,
    ),
}


@dataclass
class SluiceError(Exception):
    """A failure with a stable code. ``detail`` must be safe to show a client."""

    code: ErrorCode
    detail: str
    details: dict[str, Any] = field(default_factory=dict)
    param: str | None = None
    retry_after_ms: int | None = None
    status_override: int | None = None

    def __post_init__(self) -> None:
        super().__init__(self.detail)

    @property
    def spec(self) -> ErrorSpec:
        return CATALOGUE[self.code]

    @property
    def status(self) -> int:
        return self.status_override or self.spec.status

    def to_proto(self) -> chat_pb2.Problem:
        return chat_pb2.Problem(
            code=str(self.code),
            message=self.detail,
            http_status=self.status,
            retryable=self.spec.retryable,
            retry_after_ms=self.retry_after_ms or 0,
            param=self.param or "",
            details={k: str(v) for k, v in self.details.items()},
        )

    @classmethod
    def from_proto(cls, problem: chat_pb2.Problem) -> SluiceError:
        try:
            code = ErrorCode(problem.code)
        except ValueError:
            code = ErrorCode.UPSTREAM_ERROR
        return cls(
            code=code,
            detail=problem.message or CATALOGUE[code].title,
            details=dict(problem.details),
            param=problem.param or None,
            retry_after_ms=problem.retry_after_ms or None,
            status_override=problem.http_status or None,
        )
