"""What the console's JSON endpoints answer, beside the API it already calls (chat, jobs,
usage, admin): who the caller is with their budgets (``/v1/me``), one request's trace
tree (``/v1/traces/{id}``), the cache's hit rates and invalidation (``/v1/cache``) and
the routes with their breakers and recent calls (``/v1/providers``).

**Who reads what.** A trace belongs to the team (a key outside any team: the key) whose
key the gateway authenticated for it; another team's trace answers 404, as an unknown
one does. The cache service's counters cover every team, so only operators (keys of the
``admin`` team) read them; any key reads its own team's cache hits and savings from the
ledger (``/v1/usage``) and may invalidate its own team's answer to a request, whose key
it cannot name for another team (the team is part of every cache key). Operators may
empty the whole cache. Routes are the shared catalogue, filtered to what the key may use.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Protocol

from sluice.catalog import Catalog, ModelConfig
from sluice.errors import ErrorCode, SluiceError
from sluice.keys.v1 import keys_pb2

from services.gateway.domain.tenancy.limits import Budgets
from services.gateway.domain.tenancy.policy import (
    ADMIN_TEAM_ID,
    Entitlements,
    Scope,
    has_scope,
    model_allowed,
)

# Set on the gateway's SERVER span once the caller is known: whose trace it is.
TEAM_ATTRIBUTE = "sluice.team_id"
KEY_ATTRIBUTE = "sluice.key_id"
# The worker's provider calls carry their deployment (one CLIENT span per call).
DEPLOYMENT_ATTRIBUTE = "sluice.deployment"
# Recent calls: the providers page's window.
CALLS_WINDOW_SECONDS = 15 * 60

_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
# Span attributes shown: the same rule as ``sluice trace`` (nothing that may hold text
# of a prompt or an answer).
_ATTR_PREFIXES = ("gen_ai.", "http.", "sluice.")
_TEXT_MARKERS = ("prompt", "completion", "messages", "content", "instructions", "text", "body")


def is_operator(key: keys_pb2.ApiKeyRecord) -> bool:
    return key.team_id == ADMIN_TEAM_ID


# --- who am I --------------------------------------------------------------------------


def me_view(key: keys_pb2.ApiKeyRecord, found: Entitlements) -> dict[str, Any]:
    """The caller's key, team, scopes and its budgets: the key's own (0: none, its
    team's bound it) and its team's (the team's own over its tier's)."""
    own = Budgets.from_proto(key.budgets)
    return {
        "object": "caller",
        "key_id": key.key_id,
        "name": key.name,
        "team_id": key.team_id,
        "scopes": list(key.scopes),
        "admin": has_scope(key, Scope.ADMIN),
        "operator": is_operator(key),
        "model_allow": list(key.model_allow),
        "budgets": {
            "key": own.as_dict(),
            "team": found.team.budgets.as_dict(),
        },
        "budgets_usd_nanos": {
            "key": {"day": own.usd_nanos_per_day, "month": own.usd_nanos_per_month},
            "team": {
                "day": found.team.budgets.usd_nanos_per_day,
                "month": found.team.budgets.usd_nanos_per_month,
            },
        },
    }


# --- traces ----------------------------------------------------------------------------


class SpanSource(Protocol):
    @property
    def local(self) -> bool:
        """Whether spans are kept in local files (no OTLP endpoint)."""
        ...

    async def trace(self, trace_id: str) -> list[dict[str, Any]]:
        """Every span of the trace found in the local span files."""
        ...

    async def calls(self, since_ns: int) -> list[dict[str, Any]]:
        """The provider calls (CLIENT spans with a deployment) that ended since then."""
        ...


def check_trace_id(text: str) -> str:
    value = text.strip().lower()
    if not _TRACE_ID.match(value):
        raise SluiceError(
            ErrorCode.INVALID_REQUEST,
            "A trace id is 32 hexadecimal digits (the middle part of the traceparent "
            "header of the answer).",
            param="trace_id",
        )
    return value


def _owner(spans: list[dict[str, Any]]) -> tuple[str, str] | None:
    """The team and key the gateway authenticated for the trace."""
    for span in spans:
        attrs = span.get("attributes") or {}
        if span.get("kind") == "SERVER" and (TEAM_ATTRIBUTE in attrs or KEY_ATTRIBUTE in attrs):
            return str(attrs.get(TEAM_ATTRIBUTE, "")), str(attrs.get(KEY_ATTRIBUTE, ""))
    return None


def may_read_trace(key: keys_pb2.ApiKeyRecord, spans: list[dict[str, Any]]) -> bool:
    owner = _owner(spans)
    if owner is None:
        return False
    team, key_id = owner
    if is_operator(key):
        return True
    return team == key.team_id if key.team_id else key_id == key.key_id


def _shown(attributes: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in attributes.items():
        if not name.startswith(_ATTR_PREFIXES) or any(m in name for m in _TEXT_MARKERS):
            continue
        out[name] = value
    return out


def trace_view(
    key: keys_pb2.ApiKeyRecord, trace_id: str, spans: list[dict[str, Any]]
) -> dict[str, Any]:
    """The trace as a tree (children in start order, times in ms from its start), or
    404 when there is none the caller may read."""
    if not spans or not may_read_trace(key, spans):
        raise SluiceError(
            ErrorCode.NOT_FOUND,
            f"No trace {trace_id} of this team in the local span files (spans are kept "
            "locally when no OTLP endpoint is set; they are written within a second).",
            param="trace_id",
        )
    ordered = sorted(spans, key=lambda s: (int(s.get("start_ns") or 0), str(s.get("span_id"))))
    origin = int(ordered[0].get("start_ns") or 0)
    nodes: dict[str, dict[str, Any]] = {}
    for span in ordered:
        start = int(span.get("start_ns") or 0)
        end = int(span.get("end_ns") or start)
        nodes[str(span.get("span_id"))] = {
            "span_id": span.get("span_id"),
            "name": span.get("name"),
            "service": span.get("service"),
            "kind": span.get("kind"),
            "status": span.get("status"),
            "start_ms": round((start - origin) / 1e6, 3),
            "duration_ms": round((end - start) / 1e6, 3),
            "attributes": _shown(dict(span.get("attributes") or {})),
            "children": [],
        }
    roots: list[dict[str, Any]] = []
    for span in ordered:
        node = nodes[str(span.get("span_id"))]
        parent = nodes.get(str(span.get("parent_span_id") or ""))
        (parent["children"] if parent is not None and parent is not node else roots).append(node)
    end = max(int(s.get("end_ns") or 0) for s in ordered)
    return {
        "object": "trace",
        "trace_id": trace_id,
        "span_count": len(ordered),
        "services": sorted({str(s.get("service")) for s in ordered}),
        "duration_ms": round((end - origin) / 1e6, 3),
        "spans": roots,
    }


# --- cache -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheCounters:
    """One cache instance's counters since its start, and the bucket's entries."""

    lookups: int
    hits: int
    stores: int
    entries: int
    semantic_lookups: int
    semantic_hits: int

    def as_dict(self) -> dict[str, Any]:
        exact_hits = self.hits - self.semantic_hits
        return {
            "lookups": self.lookups,
            "hits": self.hits,
            "exact_hits": exact_hits,
            "semantic_lookups": self.semantic_lookups,
            "semantic_hits": self.semantic_hits,
            "stores": self.stores,
            "entries": self.entries,
            "hit_rate": _rate(self.hits, self.lookups),
            "exact_hit_rate": _rate(exact_hits, self.lookups),
            "semantic_hit_rate": _rate(self.semantic_hits, self.semantic_lookups),
        }


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


class CacheAdmin(Protocol):
    async def stats(self) -> CacheCounters:
        """Raises ``service_unavailable`` when no cache instance answers."""
        ...

    async def invalidate(self, cache_key: str) -> int:
        """Entries removed (every entry for an empty key)."""
        ...


def check_operator(key: keys_pb2.ApiKeyRecord, what: str) -> None:
    if not is_operator(key):
        raise SluiceError(
            ErrorCode.FORBIDDEN,
            f"{what} covers every team: it needs a key of the '{ADMIN_TEAM_ID}' team.",
        )


# --- providers -------------------------------------------------------------------------


@dataclass(frozen=True)
class BreakerView:
    deployment: str
    provider: str
    state: str
    reason: str
    seconds_left: float
    failure_rate: float
    changed_unix_nanos: int


def _calls_by_deployment(calls: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    grouped: dict[str, list[tuple[float, bool]]] = {}
    for span in calls:
        attrs = span.get("attributes") or {}
        name = attrs.get(DEPLOYMENT_ATTRIBUTE)
        if not isinstance(name, str) or span.get("kind") != "CLIENT":
            continue
        start = int(span.get("start_ns") or 0)
        end = int(span.get("end_ns") or start)
        failed = span.get("status") == "ERROR" or "error.type" in attrs
        grouped.setdefault(name, []).append(((end - start) / 1e6, failed))
    out = {}
    for name, entries in grouped.items():
        latencies = sorted(ms for ms, _ in entries)
        errors = sum(1 for _, failed in entries if failed)
        out[name] = {
            "calls": len(entries),
            "errors": errors,
            "error_rate": round(errors / len(entries), 4),
            "latency_ms_p50": round(_quantile(latencies, 0.5), 1),
            "latency_ms_p95": round(_quantile(latencies, 0.95), 1),
        }
    return out


def _quantile(ordered: list[float], q: float) -> float:
    """The nearest-rank quantile: the smallest value with at least ``q`` of the values at
    or below it."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _route(
    catalog: Catalog,
    route: ModelConfig,
    breakers: dict[str, BreakerView],
    calls: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    steps = []
    for served, step in catalog.chain(route):
        deployments = []
        for d in step.deployments:
            breaker = breakers.get(d.name)
            deployments.append(
                {
                    "name": d.name,
                    "provider": d.provider,
                    "upstream_model": d.upstream_model,
                    "weight": d.weight,
                    "breaker": {
                        "state": breaker.state if breaker else "closed",
                        "reason": breaker.reason if breaker else "",
                        "seconds_left": round(breaker.seconds_left, 1) if breaker else 0.0,
                        "failure_rate": breaker.failure_rate if breaker else 0.0,
                    },
                    "recent": calls.get(d.name),
                }
            )
        steps.append({"served_as": served, "balance": step.balance, "deployments": deployments})
    return {
        "route": route.name,
        "description": route.description,
        "deadline_seconds": route.deadline_seconds,
        "last_resort": route.last_resort is not None,
        "deprecated": route.lifecycle.announced,
        "steps": steps,
    }


def providers_view(
    key: keys_pb2.ApiKeyRecord,
    catalog: Catalog,
    breakers: list[BreakerView],
    calls: list[dict[str, Any]],
    *,
    spans_local: bool,
) -> dict[str, Any]:
    """The routes the key may use, each chain with its deployments' shared breakers and
    the calls the workers made to them lately (from the local spans)."""
    by_name = {b.deployment: b for b in breakers}
    recent = _calls_by_deployment(calls)
    routes = [
        _route(catalog, route, by_name, recent)
        for route in catalog.models.values()
        if model_allowed(key, route.name)
    ]
    return {
        "object": "list",
        "data": routes,
        "providers": sorted(catalog.providers),
        "calls_window_seconds": CALLS_WINDOW_SECONDS,
        "calls_source": "local_spans" if spans_local else "none",
        "rules": [{"name": r.name, "route": r.route, "hint": r.hint} for r in catalog.rules],
    }


def cache_answer(removed: int, scope: str) -> dict[str, Any]:
    return {"object": "cache.invalidation", "scope": scope, "removed": removed}
