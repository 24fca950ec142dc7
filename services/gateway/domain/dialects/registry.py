"""The public API dialects by name, for what is rendered later than the request that
chose one (a resumed stream, a job's or an idempotent replay's answer)."""

from __future__ import annotations

from services.gateway.domain.dialects.anthropic.response import ANTHROPIC
from services.gateway.domain.dialects.common import Dialect
from services.gateway.domain.dialects.openai.response import OPENAI

DIALECTS: dict[str, Dialect] = {d.name: d for d in (OPENAI, ANTHROPIC)}


def dialect_named(name: str) -> Dialect:
    """The dialect called ``name``; OpenAI's for an empty or unknown name (streams
    stored before the name was recorded)."""
    return DIALECTS.get(name, OPENAI)
