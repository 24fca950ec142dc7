"""Breakers on errors and latency, the balancer, rule and lifecycle resolution, and what
/readyz makes of open breakers: the pure parts, on a fake clock."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime

import pytest
from sluice.catalog import parse_catalog
from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError

from services.gateway.domain.health import OpenBreaker, Readiness, report
from services.gateway.domain.routing import RequestFacts, resolve
from services.inference_worker.domain.balance import Balancer
from services.inference_worker.domain.circuit import (
    BreakerPolicy,
    CircuitRegistry,
    CircuitState,
    Transition,
    TripReason,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def registry(clock: Clock, **policy: float) -> tuple[CircuitRegistry, list[Transition]]:
    changes: list[Transition] = []
    circuits = CircuitRegistry(BreakerPolicy(**policy), clock=clock)  # type: ignore[arg-type]
    circuits.on_change = changes.append
    return circuits, changes


def test_error_rate_opens_then_half_open_probe_closes() -> None:
    clock = Clock()
    circuits, changes = registry(
        clock, window=10, min_calls=4, failure_rate=0.5, consecutive=99, cooldown_seconds=10
    )
    breaker = circuits.get("d", "p")
    for failed in (True, False, True):
        breaker.record_failure() if failed else breaker.record_success()
    assert breaker.current() is CircuitState.CLOSED  # 3 calls: under min_calls
    breaker.record_success()
    breaker.record_failure()  # 3 of 5 failed
    assert breaker.current() is CircuitState.OPEN and not breaker.allow()
    assert changes[-1].state is CircuitState.OPEN and changes[-1].open_for == 10
    clock.now += 10
    assert breaker.current() is CircuitState.HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.record_success()
    assert breaker.current() is CircuitState.CLOSED
    assert [c.state for c in changes] == [
        CircuitState.OPEN,
        CircuitState.HALF_OPEN,
        CircuitState.CLOSED,
    ]


def test_latency_failures_open_and_a_failed_probe_reopens() -> None:
    clock = Clock()
    circuits, _ = registry(clock, consecutive=2, cooldown_seconds=5)
    breaker = circuits.get("slow")
    breaker.record_failure(TripReason.LATENCY)
    breaker.record_failure(TripReason.LATENCY)
    assert breaker.current() is CircuitState.OPEN and breaker.reason == "latency"
    assert breaker.latency_failures_total == 2
    clock.now += 5
    assert breaker.allow()
    breaker.record_failure(TripReason.LATENCY)
    assert breaker.current() is CircuitState.OPEN and breaker.open_for() == 5


def test_an_interrupted_stream_trips_at_once_and_shared_state_is_followed() -> None:
    clock = Clock()
    circuits, changes = registry(clock)
    breaker = circuits.get("d")
    breaker.trip(TripReason.STREAM_INTERRUPTED)
    assert breaker.current() is CircuitState.OPEN and changes[-1].reason == "stream_interrupted"
    # Another worker's record: followed, not announced again.
    other, other_changes = registry(clock)
    remote = other.get("d")
    remote.apply_shared(CircuitState.OPEN, 3.0, "latency")
    assert remote.current() is CircuitState.OPEN and not other_changes
    clock.now += 3
    assert remote.current() is CircuitState.HALF_OPEN
    remote.apply_shared(CircuitState.CLOSED, 0, "")
    assert remote.current() is CircuitState.CLOSED


def test_an_interrupted_stream_marks_its_deployment_avoided_and_shares_it() -> None:
    clock = Clock()
    circuits, changes = registry(clock, cooldown_seconds=8)
    breaker = circuits.get("heavy")
    breaker.mark_interrupted()
    # Not open (a route with nothing else still uses it), but tried after the others.
    assert breaker.current() is CircuitState.CLOSED and breaker.avoided()
    assert changes[-1].reason == "stream_interrupted" and changes[-1].avoid_for == 8
    step = CATALOG.models["main"].steps[0]
    assert {Balancer(circuits).order(step)[0].name for _ in range(30)} == {"light"}
    other, _ = registry(clock)
    other.get("heavy").apply_shared(CircuitState.CLOSED, 0, "stream_interrupted", 8)
    assert other.get("heavy").avoided()
    clock.now += 8
    assert not breaker.avoided()


def test_a_probe_that_was_never_made_is_released() -> None:
    clock = Clock()
    circuits, _ = registry(clock, consecutive=1, cooldown_seconds=5)
    breaker = circuits.get("d")
    breaker.record_failure()
    clock.now += 5
    assert breaker.allow() and not breaker.allow()
    breaker.release()  # the probe's call was cancelled
    assert breaker.allow()


def test_success_of_a_call_begun_before_the_breaker_opened_does_not_close_it() -> None:
    clock = Clock()
    circuits, _ = registry(clock, consecutive=1, cooldown_seconds=5)
    breaker = circuits.get("d")
    breaker.record_failure()
    breaker.record_success()
    assert breaker.current() is CircuitState.OPEN


CATALOG = parse_catalog(
    """
providers:
  p: {kind: openai, base_url: "http://127.0.0.1:1/v1"}
models:
  main:
    chain:
      - deployments:
          - {name: heavy, provider: p, upstream_model: m, weight: 3}
          - {name: light, provider: p, upstream_model: m, weight: 1}
      - {name: last, provider: p, upstream_model: m}
  fast:
    chain:
      - balance: latency
        deployments:
          - {name: a, provider: p, upstream_model: m}
          - {name: b, provider: p, upstream_model: m}
  big:
    provider: p
    upstream_model: big
  old:
    provider: p
    upstream_model: old
    deprecated_at: 2026-01-01T00:00:00Z
    sunset_at: 2099-01-01T00:00:00Z
    replacement: main
    deprecation_link: https://example.com/migrate
  gone:
    provider: p
    upstream_model: gone
    sunset_at: 2026-01-01T00:00:00Z
    replacement: main
  dead:
    chain:
      - name: pinned
        provider: p
        upstream_model: x
        sunset_at: 2026-01-01T00:00:00Z
        replacement: last
      - {name: spare, provider: p, upstream_model: x}
    sunset_at: 2026-01-01T00:00:00Z
rules:
  - {name: long-prompts, models: [main], when: {min_input_tokens: 1000}, route: big}
  - {name: tools-fast, when: {tools: true, tiers: [pro]}, route: fast}
  - {name: hinted, when: {hint: cheap}, route: fast}
"""
)
NOW = datetime(2026, 6, 1, tzinfo=UTC)


def test_weighted_order_follows_weights_and_open_deployments_go_last() -> None:
    circuits = CircuitRegistry()
    balancer = Balancer(circuits, random.Random(7))
    step = CATALOG.models["main"].steps[0]
    firsts = Counter(balancer.order(step)[0].name for _ in range(4000))
    assert 0.70 < firsts["heavy"] / 4000 < 0.80
    circuits.get("heavy").trip(TripReason.ERRORS)
    assert {balancer.order(step)[0].name for _ in range(50)} == {"light"}


def test_latency_order_measures_the_unmeasured_first_then_prefers_the_faster() -> None:
    circuits = CircuitRegistry()
    balancer = Balancer(circuits)
    step = CATALOG.models["fast"].steps[0]
    circuits.get("a").observe_latency(0.5)
    assert balancer.order(step)[0].name == "b"
    circuits.get("b").observe_latency(0.9)
    assert [d.name for d in balancer.order(step)] == ["a", "b"]


def facts(tokens: int = 10, tools: bool = False, tier: str = "", hint: str = "") -> RequestFacts:
    return RequestFacts(tokens, tools, False, tier, hint)


def test_rules_pick_routes_by_request_and_name_themselves() -> None:
    assert resolve(CATALOG, "main", facts(), NOW).route.name == "main"
    long = resolve(CATALOG, "main", facts(tokens=5000), NOW)
    assert (long.route.name, long.rule) == ("big", "long-prompts")
    assert long.response_headers()["x-sluice-route-rule"] == "long-prompts"
    # The rule names the models it applies to.
    assert resolve(CATALOG, "old", facts(tokens=5000), NOW).rule == ""
    assert resolve(CATALOG, "main", facts(tools=True), NOW).rule == ""
    assert resolve(CATALOG, "main", facts(tools=True, tier="pro"), NOW).rule == "tools-fast"
    assert resolve(CATALOG, "big", facts(hint="cheap"), NOW).route.name == "fast"


def test_deprecated_route_headers_then_replacement_after_sunset() -> None:
    old = resolve(CATALOG, "old", facts(), NOW)
    assert old.route.name == "old"
    headers = old.response_headers()
    assert headers["deprecation"] == "@1767225600"
    assert headers["sunset"] == "Thu, 01 Jan 2099 00:00:00 GMT"
    assert headers["link"] == '<https://example.com/migrate>; rel="deprecation"'
    assert headers["x-sluice-warning"].startswith("model_deprecated: old is deprecated")
    gone = resolve(CATALOG, "gone", facts(), NOW)
    assert gone.route.name == "main" and "sunset" in gone.response_headers()


@pytest.mark.parametrize("name", ["dead", "pinned"])
def test_retired_without_replacement_or_pinned_is_410(name: str) -> None:
    with pytest.raises(SluiceError) as err:
        resolve(CATALOG, name, facts(), NOW)
    assert err.value.code is ErrorCode.MODEL_RETIRED and err.value.status == 410
    if name == "pinned":
        assert err.value.details["replacement"] == "last"


def test_unknown_model_is_404() -> None:
    with pytest.raises(SluiceError) as err:
        resolve(CATALOG, "nope", facts(), NOW)
    assert err.value.code is ErrorCode.MODEL_NOT_FOUND


def test_readiness_ready_degraded_down() -> None:
    services = {"gateway": True, "inference-worker": True}
    assert report(CATALOG, services, []).status is Readiness.READY
    one = [OpenBreaker("heavy", "p", "open", "latency", 4.0)]
    found = report(CATALOG, services, one)
    assert found.status is Readiness.DEGRADED and found.routes_down == []
    assert found.as_dict()["open_deployments"] == [
        {
            "deployment": "heavy",
            "provider": "p",
            "state": "open",
            "reason": "latency",
            "retry_in_seconds": 4.0,
        }
    ]
    both = [
        *one,
        OpenBreaker("a", "p", "open", "errors", 1),
        OpenBreaker("b", "p", "open", "errors", 1),
    ]
    assert report(CATALOG, services, both).routes_down == ["fast"]
    assert report(CATALOG, {**services, "gateway": False}, []).status is Readiness.DOWN


def test_readiness_of_internal_outages() -> None:
    """Down only when requests cannot be served; the cache, the cost-tracker, and the
    limiter while some tier fails open, leave the gateway serving (degraded)."""
    every = {s: True for s in ("gateway", "limiter", "cache", "inference-worker", "cost-tracker")}

    def status(down: set[str], fail_open: list[str] | None = None) -> tuple[Readiness, list[str]]:
        found = report(CATALOG, {s: s not in down for s in every}, [], fail_open)
        return found.status, [o.service for o in found.outages]

    assert status(set()) == (Readiness.READY, [])
    assert status({"cache"}) == (Readiness.DEGRADED, ["cache"])
    assert status({"cost-tracker"}) == (Readiness.DEGRADED, ["cost-tracker"])
    assert status({"cache", "cost-tracker"}) == (Readiness.DEGRADED, ["cache", "cost-tracker"])
    assert status({"inference-worker"})[0] is Readiness.DOWN
    assert status({"gateway", "cache"}) == (Readiness.DOWN, ["cache", "gateway"])
    unreachable = report(CATALOG, {"nats": False, **{s: False for s in every}}, [])
    assert unreachable.status is Readiness.DOWN
    assert "cannot reach NATS" in " ".join(o.effect for o in unreachable.blocking)
    # The limiter: degraded while some tier's teams are still admitted, else down.
    assert status({"limiter"}, ["standard"]) == (Readiness.DEGRADED, ["limiter"])
    assert status({"limiter"}, [])[0] is Readiness.DOWN
    limiter = report(CATALOG, {**every, "limiter": False}, [], ["enterprise", "standard"])
    assert "(enterprise, standard)" in limiter.outages[0].effect
    assert not limiter.blocking
    assert report(CATALOG, {**every, "limiter": False}, []).blocking[0].service == "limiter"


def test_chat_request_facts_see_tools_and_schema() -> None:
    from services.gateway.domain.routing import facts_of

    request = chat_pb2.ChatRequest(model="main")
    request.tools.add(name="f")
    request.response_format.type = "json_schema"
    found = facts_of(request, 12, "pro", "")
    assert found.tools and found.json_schema and found.input_tokens == 12
