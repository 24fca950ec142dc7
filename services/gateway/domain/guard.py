"""The input guard: rules over a request's text, applied at the door before anything
costs (admission, cache, provider), the same for both dialects and for jobs.

A rule is a regular expression (``pattern``) or a detector of personal data
(``detector``: ``email``; ``card_number``, 13 to 19 digits with separators that carry a
card scheme's issuer prefix at one of its lengths and pass the Luhn check), with an
action: ``redact`` replaces each match with
``[REDACTED:<rule>]`` in what is sent on (and what is cached), ``block`` refuses the
request with 400 ``content_filter_triggered`` naming the rule and where it matched,
never what it matched. Rules live in ``config/guard.yaml`` (``SLUICE_GATEWAY_GUARD_FILE``)
and are checked at start, with errors that name the rule.

The guard reads every message's text and text parts (system, user, assistant, tool
results) and the arguments of earlier tool calls. A model whose catalogue entry declares
its ``input`` without ``image`` refuses image parts the same way (400
``unsupported_content``), before the provider would.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sluice.catalog import ModelConfig
from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError


class Action(StrEnum):
    REDACT = "redact"
    BLOCK = "block"


_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# 13-19 digits, single spaces or dashes between groups allowed.
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _emails(text: str) -> Iterator[tuple[int, int]]:
    for match in _EMAIL.finditer(text):
        yield match.span()


# Issuer prefixes (ranges of the leading digits) and the lengths each scheme issues:
# Luhn alone passes one long number in ten (timestamps, order ids), so a number is a card
# only when a scheme could have issued it.
_SCHEMES: tuple[tuple[int, int, int, frozenset[int]], ...] = (
    # (prefix digits, first prefix, last prefix, lengths)
    (1, 4, 4, frozenset({13, 16, 19})),  # Visa
    (2, 51, 55, frozenset({16})),  # Mastercard
    (4, 2221, 2720, frozenset({16})),  # Mastercard, 2-series
    (2, 34, 34, frozenset({15})),  # American Express
    (2, 37, 37, frozenset({15})),
    (4, 6011, 6011, frozenset(range(16, 20))),  # Discover
    (3, 644, 649, frozenset(range(16, 20))),
    (2, 65, 65, frozenset(range(16, 20))),
    (3, 300, 305, frozenset(range(14, 20))),  # Diners Club
    (2, 36, 36, frozenset(range(14, 20))),
    (2, 38, 39, frozenset(range(16, 20))),
    (4, 3528, 3589, frozenset(range(16, 20))),  # JCB
    (2, 62, 62, frozenset(range(16, 20))),  # UnionPay
)


def card_scheme_allows(digits: str) -> bool:
    """Whether some card scheme issues numbers with this prefix and length."""
    return any(
        first <= int(digits[:size]) <= last and len(digits) in lengths
        for size, first, last, lengths in _SCHEMES
    )


def _cards(text: str) -> Iterator[tuple[int, int]]:
    for match in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", match.group())
        if 13 <= len(digits) <= 19 and card_scheme_allows(digits) and luhn_valid(digits):
            yield match.span()


DETECTORS = {"email": _emails, "card_number": _cards}


class RuleSpec(BaseModel):
    """One rule of ``config/guard.yaml``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    action: Action
    pattern: str | None = None
    detector: str | None = None
    # Regular expressions match case-insensitively unless this is set.
    case_sensitive: bool = False

    @model_validator(mode="after")
    def _one_matcher(self) -> RuleSpec:
        if (self.pattern is None) == (self.detector is None):
            raise ValueError("give exactly one of pattern and detector")
        if self.detector is not None and self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {', '.join(sorted(DETECTORS))}")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a valid regular expression: {exc}") from None
        return self


class GuardFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[RuleSpec] = Field(default_factory=list)


@dataclass(frozen=True)
class Rule:
    name: str
    action: Action
    pattern: re.Pattern[str] | None = None
    detector: str = ""

    def spans(self, text: str) -> list[tuple[int, int]]:
        if self.pattern is not None:
            return [m.span() for m in self.pattern.finditer(text) if m.end() > m.start()]
        return list(DETECTORS[self.detector](text))


def parse_rules(data: Any, source: str) -> tuple[Rule, ...]:
    """The rules of a parsed guard file; ``ValueError`` naming the rule at fault."""
    try:
        spec = GuardFile.model_validate(data or {})
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{source}: {where}: {first['msg']}") from None
    names = [r.name for r in spec.rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{source}: rule names must be unique: {', '.join(duplicates)}")
    return tuple(
        Rule(
            name=r.name,
            action=r.action,
            pattern=(
                re.compile(r.pattern, 0 if r.case_sensitive else re.IGNORECASE)
                if r.pattern is not None
                else None
            ),
            detector=r.detector or "",
        )
        for r in spec.rules
    )


@dataclass(frozen=True)
class Inspected:
    """What the guard did to a request that it let through."""

    redacted: tuple[str, ...] = ()

    @property
    def header(self) -> str:
        """``x-sluice-guard``: the rules that redacted something."""
        return ",".join(self.redacted)


def _blocked(rule: Rule, where: str) -> SluiceError:
    return SluiceError(
        ErrorCode.CONTENT_FILTER_TRIGGERED,
        f"The request matched the input rule '{rule.name}' at {where}, which blocks it.",
        details={"rule": rule.name, "location": where},
        param=where,
    )


class Guard:
    def __init__(self, rules: tuple[Rule, ...] = ()) -> None:
        self.rules = rules

    def inspect(self, request: chat_pb2.ChatRequest, model: ModelConfig | None) -> Inspected:
        """Check ``request`` in place: redact what redact rules match, raise for a block
        rule or an image the model cannot take."""
        if model is not None and not model.accepts("image"):
            self._check_images(request, model)
        if not self.rules:
            return Inspected()
        redacted: list[str] = []
        for where, text, write in _texts(request):
            new = self._apply(text, where, redacted)
            if new != text:
                write(new)
        return Inspected(tuple(dict.fromkeys(redacted)))

    def scrub(self, text: str) -> str:
        """``text`` with what any rule matches replaced, block rules included: for
        records kept of a request (an opted-in audit of prompts), which must not hold
        what the guard keeps from providers."""
        for rule in self.rules:
            for start, end in sorted(rule.spans(text), reverse=True):
                text = text[:start] + f"[REDACTED:{rule.name}]" + text[end:]
        return text

    def _apply(self, text: str, where: str, redacted: list[str]) -> str:
        for rule in self.rules:
            spans = rule.spans(text)
            if not spans:
                continue
            if rule.action is Action.BLOCK:
                raise _blocked(rule, where)
            redacted.append(rule.name)
            mark = f"[REDACTED:{rule.name}]"
            for start, end in sorted(spans, reverse=True):
                text = text[:start] + mark + text[end:]
        return text

    @staticmethod
    def _check_images(request: chat_pb2.ChatRequest, model: ModelConfig) -> None:
        for i, message in enumerate(request.messages):
            for j, part in enumerate(message.parts):
                if part.type in ("image_url", "image", "input_image"):
                    where = f"messages.{i}.content.{j}"
                    raise SluiceError(
                        ErrorCode.UNSUPPORTED_CONTENT,
                        f"Model '{model.name}' takes text only; {where} is an image.",
                        details={"content": "image", "model": model.name, "location": where},
                        param=where,
                    )


Writer = Callable[[str], None]


def _texts(request: chat_pb2.ChatRequest) -> Iterator[tuple[str, str, Writer]]:
    """(location, text, setter) of every text the guard reads."""
    for i, message in enumerate(request.messages):
        if message.HasField("text"):
            yield f"messages.{i}.content", message.text, _setter(message, "text")
        for j, part in enumerate(message.parts):
            if part.text:
                yield f"messages.{i}.content.{j}", part.text, _setter(part, "text")
        for k, call in enumerate(message.tool_calls):
            if call.arguments:
                where = f"messages.{i}.tool_calls.{k}.arguments"
                yield where, call.arguments, _setter(call, "arguments")


def _setter(target: Any, name: str) -> Writer:
    def write(value: str) -> None:
        setattr(target, name, value)

    return write
