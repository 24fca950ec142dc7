"""Which route serves a request: the routing rules of the catalogue, then the route's
lifecycle.

Rules are tried in file order; the first whose every condition holds picks its route
(the model asked for must be one the rule names, when it names any). Conditions: the
prompt's tokens (``min_input_tokens``, ``max_input_tokens``), whether the request
carries tools or a JSON schema, the tier of the caller's team, and the route hint header
(``x-sluice-route``). No rule matching: the model asked for is the route.

Lifecycle: a route (or an exact pin of a deployment) past its ``deprecated_at`` is
served with ``Deprecation``, ``Sunset`` and ``Link rel="deprecation"`` headers and a
``model_deprecated`` warning. Past its ``sunset_at`` a route moves to its replacement
(the headers stay, so the caller learns why); an exact pin, or a route without a
replacement, is refused with 410 ``model_retired``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sluice.catalog import Catalog, Lifecycle, ModelConfig, RouteRule
from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError

ROUTE_HEADER = "x-sluice-route"


@dataclass(frozen=True)
class RequestFacts:
    """What the rules may look at."""

    input_tokens: int
    tools: bool
    json_schema: bool
    tier: str
    hint: str


@dataclass
class Resolution:
    """The route a request goes to, the rule that chose it, and the headers its
    lifecycle adds to the response."""

    route: ModelConfig
    rule: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    def response_headers(self) -> dict[str, str]:
        out = {ROUTE_HEADER: self.route.name}
        if self.rule:
            out["x-sluice-route-rule"] = self.rule
        out.update(self.headers)
        return out


def facts_of(
    request: chat_pb2.ChatRequest, input_tokens: int, tier: str, hint: str
) -> RequestFacts:
    return RequestFacts(
        input_tokens=input_tokens,
        tools=len(request.tools) > 0,
        json_schema=request.response_format.type == "json_schema",
        tier=tier,
        hint=hint,
    )


def matches(rule: RouteRule, requested: str, facts: RequestFacts) -> bool:
    if rule.models and requested not in rule.models:
        return False
    if rule.min_input_tokens is not None and facts.input_tokens < rule.min_input_tokens:
        return False
    if rule.max_input_tokens is not None and facts.input_tokens > rule.max_input_tokens:
        return False
    if rule.tools is not None and facts.tools != rule.tools:
        return False
    if rule.json_schema is not None and facts.json_schema != rule.json_schema:
        return False
    if rule.tiers and facts.tier not in rule.tiers:
        return False
    return not rule.hint or facts.hint == rule.hint


def pick_rule(catalog: Catalog, requested: str, facts: RequestFacts) -> RouteRule | None:
    return next((r for r in catalog.rules if matches(r, requested, facts)), None)


def resolve(
    catalog: Catalog,
    requested: str,
    facts: RequestFacts | None = None,
    now: datetime | None = None,
) -> Resolution:
    """The route for a request asking for ``requested``; ``SluiceError`` when the name
    is unknown (404 model_not_found) or retired (410 model_retired)."""
    now = now or datetime.now(UTC)
    model = catalog.model(requested)
    if model is None:
        raise SluiceError(
            ErrorCode.MODEL_NOT_FOUND,
            f"The model '{requested[:100]}' is not served here.",
            param="model",
        )
    rule = pick_rule(catalog, requested, facts) if facts is not None else None
    if rule is not None:
        model = catalog.models[rule.route]
    headers: dict[str, str] = {}
    seen = {model.name}
    while True:
        lifecycle = model.lifecycle
        if lifecycle.announced:
            headers = _lifecycle_headers(model.name, lifecycle, now)
        if not lifecycle.retired(now):
            break
        replacement = catalog.models.get(lifecycle.replacement)
        if model.pinned or replacement is None or replacement.name in seen:
            raise _retired(model, lifecycle)
        seen.add(replacement.name)
        model = replacement
    return Resolution(model, rule.name if rule is not None else "", headers)


def _lifecycle_headers(name: str, lifecycle: Lifecycle, now: datetime) -> dict[str, str]:
    headers = lifecycle.headers()
    when = lifecycle.sunset_at
    if lifecycle.retired(now):
        text = f"model_deprecated: {name} is retired; served by {lifecycle.replacement}"
    elif when is not None:
        text = f"model_deprecated: {name} is deprecated and retires {when.isoformat()}"
    else:
        text = f"model_deprecated: {name} is deprecated"
    if lifecycle.replacement and not lifecycle.retired(now):
        text += f"; use {lifecycle.replacement}"
    # RFC 9111 leaves Warning obsolete, so the warning has a header of its own too.
    headers["x-sluice-warning"] = text
    headers["warning"] = f'299 sluice "{text}"'
    return headers


def _retired(model: ModelConfig, lifecycle: Lifecycle) -> SluiceError:
    details: dict[str, object] = {"model": model.name}
    if lifecycle.sunset_at is not None:
        details["sunset_at"] = lifecycle.sunset_at.isoformat()
    if lifecycle.replacement:
        details["replacement"] = lifecycle.replacement
    kind = "deployment pinned" if model.pinned else "model"
    hint = f"; use '{lifecycle.replacement}'" if lifecycle.replacement else ""
    return SluiceError(
        ErrorCode.MODEL_RETIRED,
        f"The {kind} '{model.name}' was retired{hint}.",
        details,
        param="model",
    )
