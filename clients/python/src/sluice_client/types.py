"""Response objects. Every model keeps members it does not name (``extra="allow"``), so
a newer gateway's additions reach the caller; ``model_extra`` holds them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "Choice",
    "ChunkChoice",
    "Delta",
    "Estimate",
    "Job",
    "JobEvent",
    "JobList",
    "JobProgress",
    "Message",
    "MessageStreamEvent",
    "Model",
    "ResponseInfo",
    "UsageReport",
    "WebhookEvent",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class ResponseInfo(_Model):
    """What the HTTP exchange said about an answer: its ids and how it was served."""

    request_id: str | None = None
    trace_id: str | None = None
    idempotency_key: str | None = None
    idempotent_replayed: bool = False
    cache: str | None = None
    status_code: int = 0
    headers: dict[str, str] = Field(default_factory=dict)


class _Answer(_Model):
    _info: ResponseInfo = PrivateAttr(default_factory=ResponseInfo)

    @property
    def response_info(self) -> ResponseInfo:
        """Request id, trace id, idempotency key and replay flag of the HTTP answer."""
        return self._info


class ChatMessage(_Model):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    refusal: str | None = None


class Choice(_Model):
    index: int = 0
    message: ChatMessage = Field(default_factory=ChatMessage)
    finish_reason: str | None = None


class ChatCompletion(_Answer):
    """``object: chat.completion``, with the gateway's ``sluice`` object (model served,
    provider, cache status, tokens, cost, latency)."""

    id: str
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[Choice] = Field(default_factory=list)
    usage: dict[str, Any] | None = None
    sluice: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        """The first choice's text."""
        return (self.choices[0].message.content or "") if self.choices else ""


class Delta(_Model):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    refusal: str | None = None


class ChunkChoice(_Model):
    index: int = 0
    delta: Delta = Field(default_factory=Delta)
    finish_reason: str | None = None


class ChatCompletionChunk(_Model):
    """One ``chat.completion.chunk``; ``event_id`` is its SSE id
    (``<request_id>:<sequence>``)."""

    id: str = ""
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChunkChoice] = Field(default_factory=list)
    usage: dict[str, Any] | None = None
    sluice: dict[str, Any] | None = None
    event_id: str | None = Field(default=None, exclude=True)

    @property
    def text(self) -> str:
        """The text this chunk adds to the first choice."""
        for choice in self.choices:
            if choice.index == 0:
                return choice.delta.content or ""
        return ""


class Message(_Answer):
    """An Anthropic Messages API ``message``."""

    id: str
    type: str = "message"
    role: str = "assistant"
    model: str = ""
    content: list[dict[str, Any]] = Field(default_factory=list)
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: dict[str, Any] | None = None
    sluice: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join(str(b.get("text", "")) for b in self.content if b.get("type") == "text")


class MessageStreamEvent(_Model):
    """One event of a Messages stream (``message_start`` ... ``message_stop``): the
    event's JSON, its ``type`` naming it."""

    type: str

    @property
    def text(self) -> str:
        """The text a ``content_block_delta`` adds (else empty)."""
        delta = (self.model_extra or {}).get("delta")
        if self.type == "content_block_delta" and isinstance(delta, dict):
            return str(delta.get("text") or "")
        return ""


class Model(_Model):
    """A model the gateway serves (``GET /v1/models``)."""

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = ""


class JobProgress(_Model):
    tokens: int = 0
    max_tokens: int | None = None
    fraction: float | None = None


JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]


class Job(_Answer):
    """A job: status, progress, result (a ``chat.completion``), usage, cost, error (a
    problem object), timestamps, attempts, webhook delivery log."""

    id: str
    object: str = "job"
    status: str = "queued"
    model: str = ""
    priority: str | None = None
    created_at: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    expires_at: int | None = None
    attempts: int = 0
    cancel_requested: bool = False
    progress: JobProgress = Field(default_factory=JobProgress)
    result: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    webhook: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None

    @property
    def done(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    @property
    def text(self) -> str:
        """The result's first choice's text (empty until completed)."""
        if not self.result:
            return ""
        choices = self.result.get("choices") or []
        if not choices:
            return ""
        return str((choices[0].get("message") or {}).get("content") or "")


class JobList(_Model):
    object: str = "list"
    data: list[Job] = Field(default_factory=list)
    has_more: bool = False
    last_id: str | None = None


class JobEvent(_Model):
    """An event of ``GET /v1/jobs/{id}/events``: ``status`` (``job`` set) or ``token``
    (``sequence``, ``choice_index``, ``content``)."""

    event: str
    job: Job | None = None
    sequence: int | None = None
    choice_index: int | None = None
    content: str | None = None


class Estimate(_Answer):
    """``POST /v1/estimate``: prompt tokens, output range, USD range (exact decimal
    strings in ``cost_usd``, nano-USD integers in ``cost_usd_nanos``)."""

    object: str = "estimate"
    model: str = ""
    input_tokens: int = 0
    output_tokens: dict[str, int] = Field(default_factory=dict)
    cost_usd: dict[str, str] | None = None
    cost_usd_nanos: dict[str, int] | None = None
    priced: bool = True


class UsageReport(_Answer):
    """``GET /v1/usage``: ``data`` (one row per group, as ``group_by`` asked),
    ``totals`` (each request once), ``has_more``. Amounts are exact: nano-USD integers
    (``*_usd_nanos``) and decimal strings (``*_usd``)."""

    object: str = "usage"
    team_id: str | None = None
    since: str | None = None
    until: str | None = None
    group_by: list[str] = Field(default_factory=list)
    data: list[dict[str, Any]] = Field(default_factory=list)
    totals: dict[str, Any] = Field(default_factory=dict)
    has_more: bool = False


class WebhookEvent(_Model):
    """A verified webhook delivery: ``type`` (``job.completed``, ...), ``data``, and
    the ``webhook-id`` (stable across retries: deduplicate on it)."""

    type: str = ""
    webhook_id: str = ""
    timestamp: str = ""
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def job(self) -> Job | None:
        """The job the event is about (``job.*`` events)."""
        return Job.model_validate(self.data) if self.type.startswith("job.") else None
