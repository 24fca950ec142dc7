"""The limiter's admission in memory: proto mapping, commit, usage reconciliation and
quota queries."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.limiter.v1 import limiter_pb2

from services.limiter.domain.admission import Admission, LimiterMetrics
from services.limiter.domain.windows import Limiter, LimiterConfig

T0 = 1_700_000_000_000


def make(tpm: int = 1000, rpm: int = 10) -> tuple[Admission, list[int]]:
    now = [T0]
    lim = Limiter(LimiterConfig(default_tokens_per_minute=tpm, default_requests_per_minute=rpm))
    return Admission(lim, LimiterMetrics(), clock=lambda: now[0]), now


def by_name(resp) -> dict[str, limiter_pb2.PolicyState]:
    return {p.name: p for p in resp.policies}


def test_reserve_reply_carries_both_policies_and_the_reservation() -> None:
    h, _ = make()
    resp = h.reserve(
        limiter_pb2.ReserveRequest(
            key_id="k", request_id="r1", input_tokens=30, max_output_tokens=70
        )
    )
    assert resp.allowed and resp.reservation_id and resp.reserved_tokens == 100
    policies = by_name(resp)
    assert set(policies) == {"tpm", "rpm"}
    assert policies["tpm"].remaining == 900 and policies["rpm"].remaining == 9
    assert policies["tpm"].window_seconds == 60 and policies["tpm"].reset_ms == 61_000


def test_denied_reply_names_the_policy_and_the_wait() -> None:
    h, now = make(tpm=100)
    h.reserve(limiter_pb2.ReserveRequest(key_id="k", input_tokens=100))
    now[0] += 1_500
    resp = h.reserve(limiter_pb2.ReserveRequest(key_id="k", input_tokens=1))
    assert not resp.allowed and resp.denied_by == "tpm" and resp.retry_after_ms == 59_500
    assert resp.reservation_id == "" and by_name(resp)["tpm"].remaining == 0


def test_commit_with_zero_usage_releases_and_is_found_once() -> None:
    h, _ = make()
    r = h.reserve(limiter_pb2.ReserveRequest(key_id="k", input_tokens=600))
    commit = limiter_pb2.CommitRequest(reservation_id=r.reservation_id, key_id="k")
    assert h.commit(commit).found
    assert not h.commit(commit).found
    assert h.metrics.settlements == {("commit", "settled"): 1, ("commit", "unknown"): 1}
    again = h.reserve(limiter_pb2.ReserveRequest(key_id="k", input_tokens=1000))
    assert again.allowed


def test_usage_event_counts_input_plus_output_and_a_cache_hit_as_zero() -> None:
    h, _ = make()
    a = h.reserve(limiter_pb2.ReserveRequest(key_id="k", input_tokens=400))
    b = h.reserve(limiter_pb2.ReserveRequest(key_id="k", input_tokens=400))
    used = chat_pb2.Usage(input_tokens=50, output_tokens=25)
    settled = h.apply_usage(
        cost_pb2.UsageEvent(key_id="k", reservation_id=a.reservation_id, usage=used)
    )
    assert settled is not None and settled.actual_tokens == 75
    hit = h.apply_usage(
        cost_pb2.UsageEvent(key_id="k", reservation_id=b.reservation_id, usage=used, cache_hit=True)
    )
    assert hit is not None and hit.actual_tokens == 0
    resp = h.reserve(limiter_pb2.ReserveRequest(key_id="k"))
    assert by_name(resp)["tpm"].remaining == 925


def test_usage_without_a_known_reservation_is_counted_and_ignored() -> None:
    h, _ = make()
    assert h.apply_usage(cost_pb2.UsageEvent(key_id="k", reservation_id="nope")) is None
    assert h.apply_usage(cost_pb2.UsageEvent(key_id="k")) is None
    assert h.metrics.settlements["usage", "unknown"] == 2


def test_counters_are_exported_by_observable_instruments() -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    h, _ = make(tpm=100)
    h.metrics.register(h.limiter, meter)
    h.reserve(limiter_pb2.ReserveRequest(key_id="k", input_tokens=100))
    h.reserve(limiter_pb2.ReserveRequest(key_id="k", input_tokens=1))
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, dict[tuple[tuple[str, object], ...], float]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                points[m.name] = {
                    tuple(sorted((p.attributes or {}).items())): p.value
                    for p in m.data.data_points
                    if isinstance(p, NumberDataPoint)
                }
    assert points["sluice.limiter.decisions"] == {
        (("result", "allowed"),): 1,
        (("policy", "tpm"), ("result", "denied")): 1,
    }
    assert points["sluice.limiter.reservations.open"] == {(): 1}


def test_quota_shows_a_keys_windows_and_refuses_a_query_without_key() -> None:
    h, _ = make(tpm=1000)
    h.reserve(limiter_pb2.ReserveRequest(key_id="k", input_tokens=100))
    quota = h.quota(limiter_pb2.GetQuotaRequest(key_id="k"))
    assert by_name(quota)["tpm"].remaining == 900 and quota.open_reservations == 1
    with pytest.raises(SluiceError) as err:
        h.quota(limiter_pb2.GetQuotaRequest())
    assert err.value.code is ErrorCode.INVALID_REQUEST and err.value.param == "key_id"
