"""``POST /v1/jobs``: the body, and the caller's ``Prefer`` preferences."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field
from sluice.common.v1 import chat_pb2

from services.gateway.domain.dialects.openai.request import (
    ChatCompletionRequest,
    to_chat_request,
)
from services.gateway.domain.dialects.parsing import parse_model
from services.gateway.domain.verdict import AnswerHints


@dataclass(frozen=True)
class JobSpec:
    """A job to submit: the request already normalised by its front door, where to
    report, and the dialect (``Dialect.name``) whose answer shape its result takes."""

    request: chat_pb2.ChatRequest
    webhook_url: str | None = None
    metadata: dict[str, str] | None = None
    dialect: str = "openai"
    # What the caller asks of the answer (confidence thresholds).
    hints: AnswerHints = field(default_factory=AnswerHints)


class JobCreateRequest(BaseModel):
    """``POST /v1/jobs`` body: the chat completion request, and where to report."""

    model_config = ConfigDict(extra="forbid")

    request: ChatCompletionRequest
    webhook_url: str | None = Field(default=None, max_length=2048)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)

    def spec(self) -> JobSpec:
        asked = self.request.sluice
        hints = AnswerHints(
            review_threshold=asked.review_threshold if asked else None,
            min_confidence=asked.min_confidence if asked else None,
        )
        return JobSpec(to_chat_request(self.request), self.webhook_url, self.metadata, hints=hints)


def parse_job_body(raw: bytes) -> JobCreateRequest:
    return parse_model(raw, JobCreateRequest)


@dataclass(frozen=True)
class Prefer:
    """RFC 7240 ``Prefer``: ``respond-async`` (answer 202 with the job at once) and
    ``wait=N`` (answer inline if done within N seconds)."""

    respond_async: bool = False
    wait: float | None = None

    @property
    def as_job(self) -> bool:
        return self.respond_async or self.wait is not None

    def applied(self) -> str:
        """The ``Preference-Applied`` value."""
        applied = []
        if self.respond_async:
            applied.append("respond-async")
        if self.wait is not None:
            applied.append(f"wait={self.wait:g}")
        return ", ".join(applied)
