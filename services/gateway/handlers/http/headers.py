"""Request headers into the domain's options; a bad value is a 400 naming the header."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from sluice.errors import ErrorCode, SluiceError
from sluice.keys.v1 import keys_pb2
from sluice.topology import PriorityClass

from services.gateway.domain.admission import DisconnectPolicy
from services.gateway.domain.chat import ChatOptions
from services.gateway.domain.dialects.common import Dialect
from services.gateway.domain.dialects.openai.response import OPENAI
from services.gateway.domain.dialects.parsing import SluiceHintsIn
from services.gateway.domain.jobs.request import Prefer
from services.gateway.domain.labels import TAGS_HEADER, parse_tags
from services.gateway.domain.routing import ROUTE_HEADER
from services.gateway.domain.verdict import AnswerHints
from services.gateway.domain.work import resolve_priority
from services.gateway.settings import GatewaySettings, SemanticCacheMode

PRIORITY_HEADER = "x-sluice-priority"
IDEMPOTENCY_HEADER = "idempotency-key"
DISCONNECT_HEADER = "x-sluice-on-disconnect"
SEMANTIC_HEADER = "x-sluice-semantic-cache"
REVIEW_HEADER = "x-sluice-review-threshold"
MIN_CONFIDENCE_HEADER = "x-sluice-min-confidence"
REPAIR_HEADER = "x-sluice-schema-repair"


def _invalid(header: str, detail: str) -> SluiceError:
    return SluiceError(ErrorCode.INVALID_REQUEST, detail, param=header)


def disconnect_policy(value: str | None) -> DisconnectPolicy:
    """``x-sluice-on-disconnect``: ``continue`` (the default) or ``cancel``."""
    if not value:
        return DisconnectPolicy.CONTINUE
    try:
        return DisconnectPolicy(value.strip().lower())
    except ValueError:
        raise _invalid(
            DISCONNECT_HEADER, f"{DISCONNECT_HEADER} must be 'continue' or 'cancel'."
        ) from None


def semantic_wanted(mode: SemanticCacheMode, value: str | None) -> bool:
    """Whether this request asks the semantic cache (``X-Sluice-Semantic-Cache``)."""
    if value is None:
        return mode is SemanticCacheMode.ON
    choice = value.strip().lower()
    if choice not in ("on", "off"):
        raise _invalid(SEMANTIC_HEADER, f"{SEMANTIC_HEADER} must be 'on' or 'off'.")
    return choice == "on" and mode is not SemanticCacheMode.OFF


def _fraction(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        number = -1.0
    if not 0.0 <= number <= 1.0:
        raise _invalid(name, f"{name} must be a number from 0 to 1.")
    return number


def answer_hints(headers: Mapping[str, str], body: SluiceHintsIn | None) -> AnswerHints:
    """What the caller asks of the answer: a header wins over the body's ``sluice``."""
    body = body or SluiceHintsIn()
    repair = headers.get(REPAIR_HEADER)
    schema_repair = body.schema_repair
    if repair is not None:
        choice = repair.strip().lower()
        if choice not in ("on", "off"):
            raise _invalid(REPAIR_HEADER, f"{REPAIR_HEADER} must be 'on' or 'off'.")
        schema_repair = choice == "on"
    review = _fraction(headers, REVIEW_HEADER)
    minimum = _fraction(headers, MIN_CONFIDENCE_HEADER)
    return AnswerHints(
        review_threshold=review if review is not None else body.review_threshold,
        min_confidence=minimum if minimum is not None else body.min_confidence,
        schema_repair=schema_repair,
    )


def parse_prefer(values: list[str]) -> Prefer:
    """RFC 7240 ``Prefer``: ``respond-async`` and ``wait=N`` (others are ignored)."""
    respond_async = False
    wait: float | None = None
    for value in values:
        for item in value.split(","):
            token = item.split(";", 1)[0].strip()
            name, _, arg = token.partition("=")
            name = name.strip().lower()
            arg = arg.strip().strip('"')
            if name == "respond-async":
                respond_async = True
            elif name == "wait" and arg:
                with contextlib.suppress(ValueError):
                    wait = max(0.0, float(arg))
    return Prefer(respond_async, wait)


def prefer_of(headers: Any) -> Prefer:
    values: list[str] = headers.getall("prefer", [])
    return parse_prefer(values)


def priority(
    key: keys_pb2.ApiKeyRecord, headers: Mapping[str, str], default: PriorityClass
) -> PriorityClass:
    """The request's class from ``x-sluice-priority``, the key's tier or ``default``."""
    value = headers.get(PRIORITY_HEADER)
    asked = None
    if value is not None:
        try:
            asked = PriorityClass(value.strip().lower())
        except ValueError:
            raise _invalid(
                PRIORITY_HEADER, f"{PRIORITY_HEADER} must be one of interactive, batch, system."
            ) from None
    return resolve_priority(key, asked, default)


def job_priority(
    key: keys_pb2.ApiKeyRecord, headers: Mapping[str, str], prefer: Prefer
) -> PriorityClass:
    """Jobs run as ``batch`` unless the caller waits for them (``Prefer: wait``)."""
    default = PriorityClass.INTERACTIVE if prefer.wait is not None else PriorityClass.BATCH
    return priority(key, headers, default)


def chat_options(
    headers: Mapping[str, str],
    key: keys_pb2.ApiKeyRecord,
    settings: GatewaySettings,
    *,
    instance: str,
    dialect: Dialect = OPENAI,
    end_user: str = "",
    hints: SluiceHintsIn | None = None,
) -> ChatOptions:
    """How a chat request asked to be handled, from its headers (and the body's
    ``sluice`` object)."""
    return ChatOptions(
        dialect=dialect,
        cache_control=headers.get("cache-control", ""),
        instance=instance,
        on_disconnect=disconnect_policy(headers.get(DISCONNECT_HEADER)),
        semantic=semantic_wanted(settings.semantic_cache, headers.get(SEMANTIC_HEADER)),
        priority=priority(key, headers, PriorityClass.INTERACTIVE),
        # An idempotent request's record follows its lifecycle events.
        lifecycle_events=IDEMPOTENCY_HEADER in headers,
        tags=tags_of(headers),
        end_user=end_user,
        hints=answer_hints(headers, hints),
        route_hint=headers.get(ROUTE_HEADER, "").strip()[:100],
    )


def tags_of(headers: Mapping[str, str]) -> tuple[str, ...]:
    """``x-sluice-tags``: comma-separated labels for the request's usage."""
    return parse_tags(headers.get(TAGS_HEADER), param=TAGS_HEADER)
