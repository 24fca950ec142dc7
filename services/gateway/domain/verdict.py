"""What Sluice says about each answer: ``sluice.status``, ``sluice.errors[]``, the
answer's confidence and whether a human should look at it.

An HTTP 200 is not a good answer: a provider may refuse, stop at ``max_tokens``, filter
its output, or return JSON that breaks the schema the caller asked for. The gateway
reads every answer (the whole ``Final`` of a plain call, the deltas of a stream) into an
``AnswerTally`` and judges it with ``assess``:

- ``success``: a whole answer and nothing wrong with it;
- ``partial_success``: an answer, but cut (``finish_reason`` ``length`` or a stream that
  broke after output), filtered in part, partly refused, or not matching the schema;
- ``degraded``: an answer the gateway served instead of the model's (a last resort);
- ``failed``: no usable answer: every choice refused, or filtered or cut before any
  output.

``confidence`` is the mean token probability of the answer's content tokens,
``mean(exp(logprob))`` over every content token of every choice, between 0 and 1, from
the provider's logprobs (``None`` when there are none). Below the review threshold the
answer is marked ``requires_human_review``; below the caller's minimum it is refused with
422 ``insufficient_confidence``. A threshold with no logprobs to judge by counts as
below it: a caller who set one must not get an unchecked answer silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any

import orjson
from sluice.common.v1 import chat_pb2
from sluice.inference.v1 import inference_pb2

# At most this many schema errors are described in sluice.errors[].message.
_MAX_SCHEMA_ERRORS = 3
_MAX_PATH = 120


class Status(StrEnum):
    SUCCESS = "success"
    PARTIAL_SUCCESS = "partial_success"
    DEGRADED = "degraded"
    FAILED = "failed"


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


class IssueType(StrEnum):
    TRUNCATED = "truncated"
    REFUSAL = "refusal"
    CONTENT_FILTERED = "content_filtered"
    SCHEMA_VIOLATION = "schema_violation"
    LOW_CONFIDENCE = "low_confidence"
    DEGRADED = "degraded"


@dataclass(frozen=True)
class Issue:
    """One entry of ``sluice.errors[]``. The message never quotes the answer."""

    type: IssueType
    message: str
    severity: Severity
    recovery_suggested: str

    def to_json(self) -> dict[str, str]:
        return {
            "type": str(self.type),
            "message": self.message,
            "severity": str(self.severity),
            "recovery_suggested": self.recovery_suggested,
        }


@dataclass(frozen=True)
class Checks:
    """What an answer is judged against: from the request (its schema, its logprobs),
    the caller's thresholds (headers, body) and the gateway's settings."""

    logprobs: bool = False
    review_threshold: float | None = None
    min_confidence: float | None = None
    schema_json: str = ""
    # One repair call when the answer breaks the schema (non-streamed answers only).
    repair: bool = False

    @property
    def wants_confidence(self) -> bool:
        return self.review_threshold is not None or self.min_confidence is not None

    def to_proto(self) -> inference_pb2.AnswerChecks:
        out = inference_pb2.AnswerChecks(
            logprobs=self.logprobs, response_schema_json=self.schema_json
        )
        if self.review_threshold is not None:
            out.review_threshold = self.review_threshold
        if self.min_confidence is not None:
            out.min_confidence = self.min_confidence
        return out

    @classmethod
    def from_proto(cls, checks: inference_pb2.AnswerChecks) -> Checks:
        return cls(
            logprobs=checks.logprobs,
            review_threshold=(
                checks.review_threshold if checks.HasField("review_threshold") else None
            ),
            min_confidence=checks.min_confidence if checks.HasField("min_confidence") else None,
            schema_json=checks.response_schema_json,
        )


@dataclass
class _ChoiceTally:
    content: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    tool_calls: int = 0
    finish_reason: str = ""
    probability_sum: float = 0.0
    tokens: int = 0


class AnswerTally:
    """An answer as the gateway saw it: per choice its text, refusal, tool calls, finish
    reason and the sum of its content tokens' probabilities. Fed by stream deltas, or
    set from a finished answer's choices (which replace what deltas said)."""

    def __init__(self) -> None:
        self._choices: dict[int, _ChoiceTally] = {}

    def add_delta(self, delta: inference_pb2.Delta) -> None:
        tally = self._choices.setdefault(delta.choice_index, _ChoiceTally())
        if delta.content:
            tally.content.append(delta.content)
        if delta.refusal:
            tally.refusal.append(delta.refusal)
        tally.tool_calls += sum(1 for c in delta.tool_calls if c.id or c.name)
        if delta.finish_reason:
            tally.finish_reason = delta.finish_reason
        if delta.HasField("logprobs"):
            _add_logprobs(tally, delta.logprobs)

    def set_choices(self, choices: Any) -> None:
        for choice in choices:
            tally = _ChoiceTally(
                content=[choice.content] if choice.content else [],
                refusal=[choice.refusal] if choice.refusal else [],
                tool_calls=len(choice.tool_calls),
                finish_reason=choice.finish_reason,
            )
            if choice.HasField("logprobs"):
                _add_logprobs(tally, choice.logprobs)
            self._choices[choice.index] = tally

    @property
    def has_output(self) -> bool:
        return any(t.content or t.refusal or t.tool_calls for t in self._choices.values())

    def contents(self) -> list[tuple[int, str]]:
        return [(i, "".join(t.content)) for i, t in sorted(self._choices.items())]

    def confidence(self) -> float | None:
        tokens = sum(t.tokens for t in self._choices.values())
        if not tokens:
            return None
        return sum(t.probability_sum for t in self._choices.values()) / tokens


def _add_logprobs(tally: _ChoiceTally, logprobs: chat_pb2.Logprobs) -> None:
    for token in logprobs.content:
        # A provider may send -inf (or -9999) for an impossible token: probability 0.
        tally.probability_sum += math.exp(token.logprob) if token.logprob > -700 else 0.0
        tally.tokens += 1


@dataclass(frozen=True)
class Verdict:
    status: Status
    issues: tuple[Issue, ...]
    confidence: float | None
    requires_human_review: bool
    # The caller's minimum confidence was not reached (422 insufficient_confidence).
    insufficient: bool = False

    def has(self, kind: IssueType) -> bool:
        return any(i.type is kind for i in self.issues)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": str(self.status),
            "errors": [i.to_json() for i in self.issues],
            "confidence": None if self.confidence is None else round(self.confidence, 6),
            "requires_human_review": self.requires_human_review,
        }


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Any:
    # jsonschema (with referencing and rpds: about 3 MiB resident) loads with the first
    # answer checked against a schema, in the gateways that are asked for one.
    from jsonschema import validators

    schema = orjson.loads(schema_json)
    cls = validators.validator_for(schema)
    return cls(schema)


def schema_problems(schema_json: str, text: str) -> list[str]:
    """Why ``text`` does not satisfy the JSON schema (empty: it does). Paths and the
    failing keyword only: a message never quotes the answer's values."""
    from jsonschema import exceptions as schema_errors

    try:
        instance = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return [f"the output is not valid JSON (error at character {exc.pos})"]
    try:
        validator = _validator(schema_json)
    except (orjson.JSONDecodeError, schema_errors.SchemaError):
        return ["the response_format schema is not a valid JSON Schema"]
    problems = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
        path = "/".join(str(p) for p in error.absolute_path) or "<root>"
        problems.append(f"{path[:_MAX_PATH]} fails '{error.validator}'")
        if len(problems) == _MAX_SCHEMA_ERRORS:
            break
    return problems


def assess(
    tally: AnswerTally,
    checks: Checks,
    *,
    interrupted: bool = False,
    degraded: str = "",
) -> Verdict:
    """The verdict on one answer. ``interrupted``: the stream broke after output (the
    answer the client holds is a prefix). ``degraded``: why the gateway served this
    answer instead of the model's (empty: it did not)."""
    issues: list[Issue] = []
    choices = tally._choices
    truncated = [i for i, t in sorted(choices.items()) if t.finish_reason == "length"]
    if interrupted:
        issues.append(
            Issue(
                IssueType.TRUNCATED,
                "The provider's stream broke after output had started; the answer is a prefix.",
                Severity.ERROR,
                "Resume the stream (GET /v1/streams/{id}) or send the request again.",
            )
        )
    elif truncated:
        issues.append(
            Issue(
                IssueType.TRUNCATED,
                f"The answer stopped at the token limit (choices {_indices(truncated)}).",
                Severity.ERROR,
                "Raise max_tokens (max_completion_tokens) or ask for a shorter answer.",
            )
        )
    refused = [i for i, t in sorted(choices.items()) if t.refusal or t.finish_reason == "refusal"]
    if refused:
        issues.append(
            Issue(
                IssueType.REFUSAL,
                f"The model refused to answer (choices {_indices(refused)}).",
                Severity.ERROR,
                "Rephrase the request, or check it against the provider's usage policy.",
            )
        )
    filtered = [i for i, t in sorted(choices.items()) if t.finish_reason == "content_filter"]
    if filtered:
        issues.append(
            Issue(
                IssueType.CONTENT_FILTERED,
                f"The provider's content filter withheld output (choices {_indices(filtered)}).",
                Severity.ERROR,
                "Rephrase the request; the provider's filter, not Sluice's, stopped it.",
            )
        )
    if checks.schema_json:
        for index, text in tally.contents():
            tally_choice = choices[index]
            if not text and (tally_choice.refusal or tally_choice.tool_calls):
                continue
            problems = schema_problems(checks.schema_json, text)
            if problems:
                issues.append(
                    Issue(
                        IssueType.SCHEMA_VIOLATION,
                        f"Choice {index} does not match response_format's schema: "
                        + "; ".join(problems)
                        + ".",
                        Severity.ERROR,
                        "Validate before use, send the request again, or allow a repair "
                        "(x-sluice-schema-repair: on).",
                    )
                )
    confidence = tally.confidence()
    review = False
    insufficient = False
    if checks.wants_confidence:
        if confidence is None:
            review = True
            insufficient = checks.min_confidence is not None
            issues.append(
                Issue(
                    IssueType.LOW_CONFIDENCE,
                    "No token log probabilities came back, so confidence cannot be measured.",
                    Severity.WARNING,
                    "Use a model whose provider returns logprobs, or have a person review "
                    "the answer.",
                )
            )
        else:
            review = checks.review_threshold is not None and confidence < checks.review_threshold
            insufficient = checks.min_confidence is not None and confidence < checks.min_confidence
            if review or insufficient:
                bound = checks.min_confidence if insufficient else checks.review_threshold
                issues.append(
                    Issue(
                        IssueType.LOW_CONFIDENCE,
                        f"Confidence {confidence:.3f} is below the threshold {bound}.",
                        Severity.WARNING,
                        "Have a person review the answer, or ask a stronger model.",
                    )
                )
    if degraded:
        issues.append(
            Issue(
                IssueType.DEGRADED,
                degraded,
                Severity.WARNING,
                "Send the request again later for the model's own answer.",
            )
        )
    return Verdict(
        status=_status(tally, issues, degraded=bool(degraded)),
        issues=tuple(issues),
        confidence=confidence,
        requires_human_review=review,
        insufficient=insufficient,
    )


def _status(tally: AnswerTally, issues: list[Issue], *, degraded: bool) -> Status:
    # Output that a filter or the token limit cut short is still output (a partial
    # success); a refusal is not an answer.
    usable = [t for t in tally._choices.values() if (t.content or t.tool_calls) and not t.refusal]
    if not usable and any(
        i.type in (IssueType.REFUSAL, IssueType.CONTENT_FILTERED, IssueType.TRUNCATED)
        for i in issues
    ):
        return Status.FAILED
    if degraded:
        return Status.DEGRADED
    if any(i.severity is Severity.ERROR for i in issues):
        return Status.PARTIAL_SUCCESS
    return Status.SUCCESS


def _indices(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices)


@dataclass(frozen=True)
class AnswerHints:
    """What the caller asked of the answer (headers ``x-sluice-review-threshold``,
    ``x-sluice-min-confidence``, ``x-sluice-schema-repair``, or the body's ``sluice``
    object); None: the gateway's setting applies."""

    review_threshold: float | None = None
    min_confidence: float | None = None
    schema_repair: bool | None = None


def checks_for(
    request: chat_pb2.ChatRequest,
    hints: AnswerHints,
    *,
    review_threshold: float | None,
    schema_repair: bool,
) -> Checks:
    """The checks of one request. ``review_threshold`` and ``schema_repair`` are the
    gateway's defaults (settings)."""
    rf = request.response_format
    return Checks(
        logprobs=request.sampling.logprobs,
        review_threshold=(
            hints.review_threshold if hints.review_threshold is not None else review_threshold
        ),
        min_confidence=hints.min_confidence,
        schema_json=rf.schema_json if rf.type == "json_schema" else "",
        repair=hints.schema_repair if hints.schema_repair is not None else schema_repair,
    )


REPAIR_INSTRUCTION = (
    "Your previous answer does not satisfy the required JSON schema: {problems}. "
    "Answer again with only the corrected JSON, which must satisfy the schema."
)


def repair_request(
    request: chat_pb2.ChatRequest, answer: str, problems: list[str]
) -> chat_pb2.ChatRequest:
    """The second call of a schema repair: the same request, the model's answer as an
    assistant turn and a user turn that names what broke the schema, never streamed."""
    repair = chat_pb2.ChatRequest()
    repair.CopyFrom(request)
    repair.stream = False
    repair.include_usage = False
    repair.sampling.ClearField("n")
    repair.messages.append(chat_pb2.Message(role="assistant", text=answer))
    repair.messages.append(
        chat_pb2.Message(role="user", text=REPAIR_INSTRUCTION.format(problems="; ".join(problems)))
    )
    return repair
