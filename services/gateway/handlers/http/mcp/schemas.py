"""The MCP tools' arguments and results: pydantic models whose JSON schemas are the
tools' ``inputSchema`` and ``outputSchema``. Arguments are checked again by the same
models the HTTP routes use (a chat message here is a chat message there)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The dimensions GET /v1/usage groups by (services.gateway.domain.usage.DIMENSIONS).
Dimension = Literal["key", "team", "end_user", "model", "provider", "tag", "day", "hour"]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Result(BaseModel):
    # Results may grow members; a client validating against the schema must not break.
    model_config = ConfigDict(extra="allow")


# --- arguments ----------------------------------------------------------------------


class Message(_Args):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="Who says it.")
    content: str = Field(description="The message text.")


class ChatArgs(_Args):
    model: str = Field(min_length=1, description="A model name from list_models.")
    messages: list[Message] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Most tokens to generate (default: the gateway's)."
    )
    temperature: float | None = Field(default=None, ge=0, le=2, description="Sampling temperature.")


class SubmitJobArgs(ChatArgs):
    metadata: dict[str, str] | None = Field(
        default=None, max_length=16, description="Up to 16 labels kept with the job."
    )
    webhook_url: str | None = Field(
        default=None,
        max_length=2048,
        description="Where to POST job.completed/failed/cancelled (Standard Webhooks).",
    )
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="Unique per logical submission: a retry with the same key and arguments "
        "gets the same job instead of a second one (as Idempotency-Key on POST /v1/jobs).",
    )


class JobArgs(_Args):
    job_id: str = Field(min_length=1, max_length=128, description="The id submit_job returned.")


class UsageArgs(_Args):
    since: str | None = Field(
        default=None, description="RFC 3339 time or date (UTC without an offset), inclusive."
    )
    until: str | None = Field(default=None, description="RFC 3339 time or date, exclusive.")
    group_by: list[Dimension] | None = Field(
        default=None, description="Dimensions to group by (default: key and model)."
    )
    model: str | None = Field(default=None, description="Only this model.")
    tag: str | None = Field(default=None, description="Only requests with this tag.")
    limit: int | None = Field(default=None, ge=1, le=10000, description="Most rows (1000).")


class NoArgs(_Args):
    pass


# --- results ------------------------------------------------------------------------


class TokenUsage(_Result):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResult(_Result):
    text: str = Field(description="The assistant's answer.")
    finish_reason: str | None = Field(description="stop, length, tool_calls or content_filter.")
    model: str = Field(description="The model that answered.")
    usage: TokenUsage
    cost_usd: float = Field(description="What this call cost (0 for a cache hit).")
    sluice: dict[str, Any] = Field(
        description="The gateway's metadata: request and trace ids, provider, cache status, "
        "tokens, cost and latency breakdown (as in the HTTP API's `sluice` object)."
    )


class JobProgress(_Result):
    tokens: int
    max_tokens: int | None
    fraction: float | None


class Job(_Result):
    id: str
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    model: str
    priority: str
    created_at: int
    started_at: int | None
    finished_at: int | None
    expires_at: int
    attempts: int
    cancel_requested: bool
    progress: JobProgress
    result: dict[str, Any] | None = Field(description="The chat.completion, once completed.")
    usage: dict[str, Any] | None
    cost_usd: float | None
    error: dict[str, Any] | None = Field(description="A problem object, once failed.")
    metadata: dict[str, str]
    webhook: dict[str, Any] | None
    trace_id: str | None


class Range(_Result):
    min: int
    max: int


class UsdRange(_Result):
    min: str
    max: str


class Estimate(_Result):
    model: str
    input_tokens: int
    output_tokens: Range
    priced: bool
    cost_usd: UsdRange | None = Field(description="Exact USD as decimal strings.")
    cost_usd_nanos: Range | None
    price_version: str | None


class UsageReport(_Result):
    team_id: str | None
    since: str | None
    until: str | None
    group_by: list[str]
    totals: dict[str, Any] = Field(
        description="requests, tokens, cost_usd (exact decimal string), saved_usd, cache_hits."
    )
    data: list[dict[str, Any]] = Field(description="One row per group, with the same amounts.")
    has_more: bool


class Model(_Result):
    id: str
    owned_by: str


class ModelList(_Result):
    models: list[Model]
