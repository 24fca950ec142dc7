"""The console's domain: who may read a trace, the trace tree, the cache's rates and the
providers' recent calls, without any process."""

from __future__ import annotations

import pytest
from sluice.catalog import parse_catalog
from sluice.errors import SluiceError
from sluice.keys.v1 import keys_pb2

from services.gateway.domain import console

CATALOG = parse_catalog(
    """
providers:
  sim: {kind: openai, base_url: "http://127.0.0.1:1"}
models:
  fast:
    chain:
      - {name: fast-a, provider: sim, upstream_model: a}
      - {name: fast-b, provider: sim, upstream_model: b}
  other: {provider: sim, upstream_model: c}
"""
)


def _key(team: str, key_id: str = "key_1", allow: tuple[str, ...] = ()) -> keys_pb2.ApiKeyRecord:
    return keys_pb2.ApiKeyRecord(key_id=key_id, team_id=team, model_allow=list(allow))


def _span(span_id: str, parent: str, start: int, end: int, **attrs: object) -> dict[str, object]:
    return {
        "trace_id": "a" * 32,
        "span_id": span_id,
        "parent_span_id": parent,
        "name": span_id,
        "kind": "SERVER" if not parent else "CLIENT",
        "service": "gateway" if not parent else "inference-worker",
        "start_ns": start,
        "end_ns": end,
        "status": "UNSET",
        "attributes": attrs,
    }


SPANS = [
    _span("root", "", 1_000_000, 9_000_000, **{console.TEAM_ATTRIBUTE: "red"}),
    _span("call", "root", 2_000_000, 8_000_000, **{"sluice.deployment": "fast-a"}),
    _span("late", "root", 3_000_000, 4_000_000, **{"gen_ai.prompt": "secret words"}),
]


def test_a_trace_is_its_teams_and_the_operators() -> None:
    tree = console.trace_view(_key("red"), "a" * 32, SPANS)
    assert tree["duration_ms"] == 8.0 and tree["span_count"] == 3
    root = tree["spans"][0]
    assert [c["span_id"] for c in root["children"]] == ["call", "late"]
    assert root["children"][0]["start_ms"] == 1.0
    # Attributes that may hold prompt text are never shown.
    assert root["children"][1]["attributes"] == {}
    assert console.trace_view(_key("admin"), "a" * 32, SPANS)["span_count"] == 3
    for key in (_key("blue"), _key("")):
        with pytest.raises(SluiceError) as err:
            console.trace_view(key, "a" * 32, SPANS)
        assert err.value.code == "not_found"
    with pytest.raises(SluiceError):
        console.trace_view(_key("red"), "a" * 32, [])


def test_a_key_outside_any_team_reads_its_own_traces_only() -> None:
    spans = [_span("root", "", 0, 1, **{console.TEAM_ATTRIBUTE: "", console.KEY_ATTRIBUTE: "k9"})]
    assert console.trace_view(_key("", "k9"), "a" * 32, spans)["span_count"] == 1
    with pytest.raises(SluiceError):
        console.trace_view(_key("", "k8"), "a" * 32, spans)


def test_trace_ids_are_checked() -> None:
    assert console.check_trace_id(" " + "AB" * 16) == "ab" * 16
    with pytest.raises(SluiceError):
        console.check_trace_id("xyz")


def test_cache_rates_split_exact_and_semantic() -> None:
    view = console.CacheCounters(
        lookups=10, hits=4, stores=5, entries=3, semantic_lookups=4, semantic_hits=1
    ).as_dict()
    assert view["exact_hits"] == 3 and view["exact_hit_rate"] == 0.3
    assert view["semantic_hit_rate"] == 0.25 and view["hit_rate"] == 0.4
    empty = console.CacheCounters(0, 0, 0, 0, 0, 0).as_dict()
    assert empty["hit_rate"] is None and empty["semantic_hit_rate"] is None


def test_operators_only_for_what_covers_every_team() -> None:
    console.check_operator(_key("admin"), "x")
    with pytest.raises(SluiceError) as err:
        console.check_operator(_key("red"), "x")
    assert err.value.code == "forbidden"


def test_providers_show_chains_breakers_and_recent_calls() -> None:
    failed = _span("f", "root", 0, 30_000_000, **{"sluice.deployment": "fast-a"})
    failed["status"] = "ERROR"
    calls = [SPANS[1], failed]
    breaker = console.BreakerView("fast-b", "sim", "open", "errors", 9.5, 0.6, 1)
    view = console.providers_view(_key("red"), CATALOG, [breaker], calls, spans_local=True)
    assert [r["route"] for r in view["data"]] == ["fast", "other"]
    a, b = (s["deployments"][0] for s in view["data"][0]["steps"])
    assert a["breaker"]["state"] == "closed"
    assert a["recent"] == {
        "calls": 2,
        "errors": 1,
        "error_rate": 0.5,
        "latency_ms_p50": 6.0,
        "latency_ms_p95": 30.0,
    }
    assert b["breaker"] == {
        "state": "open",
        "reason": "errors",
        "seconds_left": 9.5,
        "failure_rate": 0.6,
    }
    assert b["recent"] is None
    narrow_key = _key("red", allow=("other",))
    narrow = console.providers_view(narrow_key, CATALOG, [], [], spans_local=False)
    assert [r["route"] for r in narrow["data"]] == ["other"]
    assert narrow["calls_source"] == "none"


def test_console_routes_have_fixed_labels() -> None:
    from services.gateway.handlers.http.routes import route_label

    assert route_label("/console") == "/console"
    assert route_label("/console/static/console.js") == "/console"
    assert route_label("/v1/traces/" + "a" * 32) == "/v1/traces/{id}"
    for path in ("/v1/me", "/v1/cache", "/v1/cache/invalidate", "/v1/providers"):
        assert route_label(path) == path
