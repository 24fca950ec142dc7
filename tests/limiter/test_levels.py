"""Levels on one reservation: key, team and end-user limits and budgets, concurrency,
batch share, the learned output estimate, and the dollars held and settled."""

from __future__ import annotations

from decimal import Decimal

from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.leases import share_id
from sluice.limiter.v1 import limiter_pb2
from sluice.pricing import ModelPrice, PriceTable
from sluice.tenancy.v1 import tenancy_pb2

from services.limiter.domain.admission import Admission, LimiterMetrics, Prices
from services.limiter.domain.windows import (
    DAY_MS,
    Limiter,
    LimiterConfig,
    decode_snapshot,
    encode_snapshot,
)

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
MODEL = "m"
# 1 USD per million input tokens, 2 per million output: 1,000 and 2,000 nano-USD a token.
TABLE = PriceTable({MODEL: ModelPrice(Decimal(1), Decimal(2), Decimal(1))}, "t")


def make(batch_share: float = 0.5) -> tuple[Admission, list[int]]:
    now = [T0]
    lim = Limiter(LimiterConfig(default_tokens_per_minute=10**9, default_requests_per_minute=10**6))
    return (
        Admission(
            lim,
            LimiterMetrics(),
            clock=lambda: now[0],
            prices=Prices(TABLE),
            batch_share=batch_share,
        ),
        now,
    )


def ask(
    key: str = "k",
    team: str = "t",
    *,
    tokens_in: int = 10,
    tokens_out: int = 10,
    key_limits: tenancy_pb2.Limits | None = None,
    key_budgets: tenancy_pb2.Budgets | None = None,
    team_limits: tenancy_pb2.Limits | None = None,
    team_budgets: tenancy_pb2.Budgets | None = None,
    end_user: str = "",
    user_limits: tenancy_pb2.Limits | None = None,
    priority: str = "interactive",
    estimated: bool = False,
) -> limiter_pb2.ReserveRequest:
    return limiter_pb2.ReserveRequest(
        key_id=key,
        team_id=team,
        model=MODEL,
        request_id="r",
        input_tokens=tokens_in,
        max_output_tokens=tokens_out,
        key_limits=key_limits,
        key_budgets=key_budgets,
        team_limits=team_limits,
        team_budgets=team_budgets,
        end_user=end_user,
        end_user_limits=user_limits,
        priority=priority,
        output_estimated=estimated,
    )


def used(
    rid: str, key: str = "k", team: str = "t", i: int = 0, o: int = 0, **kw: object
) -> cost_pb2.UsageEvent:
    return cost_pb2.UsageEvent(
        key_id=key,
        team_id=team,
        reservation_id=rid,
        model_requested=MODEL,
        usage=chat_pb2.Usage(input_tokens=i, output_tokens=o),
        outcome="completed",
        **kw,  # type: ignore[arg-type]
    )


def names(resp: limiter_pb2.ReserveResponse) -> dict[str, limiter_pb2.PolicyState]:
    return {p.name: p for p in resp.policies}


def test_team_limit_binds_two_keys_and_the_refusal_names_it() -> None:
    h, _ = make()
    limits = tenancy_pb2.Limits(output_tokens_per_minute=100)
    assert h.reserve(ask("a", tokens_out=60, team_limits=limits)).allowed
    denied = h.reserve(ask("b", tokens_out=60, team_limits=limits))
    assert not denied.allowed and not denied.budget_exceeded
    assert denied.denied_by == "team.output_tokens_per_minute"
    assert 0 < denied.retry_after_ms <= 61_000
    policy = names(denied)["team.output_tokens_per_minute"]
    assert (policy.quota, policy.remaining, policy.unit) == (100, 40, "output_tokens")
    # Another team is not bound by it.
    assert h.reserve(ask("c", "other", tokens_out=60, team_limits=limits)).allowed


def test_actual_output_replaces_the_reserved_output_on_every_level() -> None:
    h, _ = make()
    limits = tenancy_pb2.Limits(output_tokens_per_minute=100, input_tokens_per_minute=50)
    first = h.reserve(ask("a", tokens_in=20, tokens_out=90, team_limits=limits, key_limits=limits))
    assert first.allowed
    assert not h.reserve(ask("b", tokens_out=20, team_limits=limits)).allowed
    h.apply_usage(used(first.reservation_id, "a", i=20, o=5))
    again = h.reserve(ask("b", tokens_in=30, tokens_out=20, team_limits=limits))
    assert again.allowed
    assert names(again)["team.output_tokens_per_minute"].remaining == 100 - 5 - 20
    assert names(again)["team.input_tokens_per_minute"].remaining == 50 - 20 - 30
    assert not h.reserve(ask("c", tokens_in=1, team_limits=limits)).allowed  # input full


def test_concurrency_counts_requests_in_flight_until_they_settle() -> None:
    h, _ = make()
    limits = tenancy_pb2.Limits(concurrent_requests=2)
    one = h.reserve(ask(key_limits=limits))
    assert one.allowed and h.reserve(ask(key_limits=limits)).allowed
    denied = h.reserve(ask(key_limits=limits))
    assert denied.denied_by == "key.concurrent_requests"
    assert names(denied)["key.concurrent_requests"].remaining == 0
    # A release (the gateway's commit of nothing) ends one.
    h.commit(limiter_pb2.CommitRequest(reservation_id=one.reservation_id, key_id="k"))
    assert h.reserve(ask(key_limits=limits)).allowed


def test_end_users_of_a_team_are_limited_each_on_their_own() -> None:
    h, _ = make()
    limits = tenancy_pb2.Limits(requests_per_minute=1)
    assert h.reserve(ask(end_user="ann", user_limits=limits)).allowed
    denied = h.reserve(ask("k2", end_user="ann", user_limits=limits))
    assert denied.denied_by == "end_user.requests_per_minute"
    assert h.reserve(ask(end_user="bob", user_limits=limits)).allowed


def test_a_day_budget_holds_the_worst_case_then_settles_to_the_actual_cost() -> None:
    h, now = make()
    budgets = tenancy_pb2.Budgets(usd_nanos_per_day=100_000)  # 0.0001 USD
    # Worst case: 10 * 1,000 + 30 * 2,000 = 70,000 nano-USD.
    first = h.reserve(ask(tokens_in=10, tokens_out=30, team_budgets=budgets))
    assert first.allowed and first.reserved_usd_nanos == 70_000
    assert first.spend_ceiling_usd_nanos == 100_000
    second = h.reserve(ask(tokens_in=10, tokens_out=30, team_budgets=budgets))
    # Admitted while something is left (30,000): it may cost that much before it runs out.
    assert second.allowed and second.spend_ceiling_usd_nanos == 30_000
    third = h.reserve(ask(tokens_in=10, tokens_out=30, team_budgets=budgets))
    assert not third.allowed and third.budget_exceeded
    assert third.denied_by == "team.usd_per_day"
    assert third.retry_after_ms == DAY_MS - T0 % DAY_MS
    # The first used 10 in and 5 out: 20,000 nano-USD, 50,000 back.
    h.apply_usage(used(first.reservation_id, i=10, o=5))
    fourth = h.reserve(ask(tokens_in=10, tokens_out=30, team_budgets=budgets))
    assert fourth.allowed and fourth.spend_ceiling_usd_nanos == 100_000 - 20_000 - 70_000
    day_policy = names(fourth)["team.usd_per_day"]
    assert (day_policy.unit, day_policy.window_seconds) == ("usd_nanos", 86_400)
    assert day_policy.remaining == 0  # 20,000 spent and 2 x 70,000 held
    # The next UTC day starts afresh.
    now[0] = (T0 // DAY_MS + 1) * DAY_MS
    assert h.reserve(ask(tokens_in=10, tokens_out=30, team_budgets=budgets)).allowed


def test_a_month_budget_refuses_once_spent_and_names_the_key_level() -> None:
    h, _ = make()
    budgets = tenancy_pb2.Budgets(usd_nanos_per_month=50_000)
    first = h.reserve(ask(tokens_in=10, tokens_out=10, key_budgets=budgets))
    h.apply_usage(used(first.reservation_id, i=10, o=20))  # 50,000: all of it
    denied = h.reserve(ask(key_budgets=budgets))
    assert denied.budget_exceeded and denied.denied_by == "key.usd_per_month"
    # 2023-11-14T22:13:20Z to 2023-12-01T00:00:00Z.
    assert denied.retry_after_ms == 1_701_388_800_000 - T0


def test_batch_work_is_admitted_within_its_share_of_each_limit() -> None:
    h, _ = make(batch_share=0.5)
    limits = tenancy_pb2.Limits(requests_per_minute=4)
    assert h.reserve(ask(team_limits=limits, priority="batch")).allowed
    assert h.reserve(ask(team_limits=limits, priority="batch")).allowed
    denied = h.reserve(ask(team_limits=limits, priority="batch"))
    assert denied.denied_by == "team.requests_per_minute"
    # Interactive work keeps the other half.
    assert h.reserve(ask(team_limits=limits)).allowed
    assert h.reserve(ask(team_limits=limits)).allowed
    assert not h.reserve(ask(team_limits=limits)).allowed


def test_without_max_tokens_the_learned_output_of_the_key_is_reserved() -> None:
    h, _ = make()
    limits = tenancy_pb2.Limits(output_tokens_per_minute=10_000)
    first = h.reserve(ask(tokens_out=1000, key_limits=limits, estimated=True))
    assert first.reserved_output_tokens == 1000  # nothing learned yet: the default
    h.apply_usage(used(first.reservation_id, i=10, o=100))
    second = h.reserve(ask(tokens_out=1000, key_limits=limits, estimated=True))
    assert second.reserved_output_tokens == 100
    h.apply_usage(used(second.reservation_id, i=10, o=200))
    # EWMA: 100 + 0.2 * (200 - 100) = 120.
    assert (
        h.reserve(ask(tokens_out=1000, key_limits=limits, estimated=True)).reserved_output_tokens
        == 120
    )
    # A request's own max_tokens is reserved as asked, and the estimate never raises it.
    assert h.reserve(ask(tokens_out=1000, key_limits=limits)).reserved_output_tokens == 1000
    assert (
        h.reserve(ask(tokens_out=50, key_limits=limits, estimated=True)).reserved_output_tokens
        == 50
    )


TEAM_LIMITS = tenancy_pb2.Limits(
    requests_per_minute=1000,
    input_tokens_per_minute=10**6,
    output_tokens_per_minute=10**6,
    concurrent_requests=100,
)
TEAM_BUDGETS = tenancy_pb2.Budgets(usd_nanos_per_day=10**12)


def leased(h: Admission, **kw: object) -> limiter_pb2.ReserveResponse:
    request = ask(team_limits=TEAM_LIMITS, team_budgets=TEAM_BUDGETS, **kw)  # type: ignore[arg-type]
    request.lease_tokens, request.lease_requests = 160, 8
    return h.reserve(request)


def price(i: int, o: int) -> int:
    return i * 1_000 + o * 2_000


def test_a_lease_counts_on_every_level_and_settles_to_exactly_what_was_used() -> None:
    h, now = make()
    grant = leased(h)
    assert grant.allowed
    assert (grant.lease_requests, grant.lease_tokens) == (8, 160)
    assert (grant.lease_input_tokens, grant.lease_output_tokens) == (160, 160)
    team = h.limiter._keys["team:t"]
    # Held at once on the team: 9 requests in its minute and in flight, and the most the
    # lease's tokens may cost beside the request's own.
    assert team.open_reservations == 9 and team.requests.total == 9
    assert team.input.total == 170 and team.output.total == 170
    assert h.limiter.spent("team:t", now[0])[0] == price(10, 10) + price(160, 160)
    assert names(grant)["team.concurrent_requests"].remaining == 91
    # The spend ceiling counts the lease's hold as spent by the key's next requests.
    assert grant.spend_ceiling_usd_nanos == 10**12 - price(160, 160)

    lease = grant.reservation_id
    shares = [share_id(lease, n, 20, 10) for n in (1, 2, 3)]
    actual = [(8, 5), (10, 10), (12, 1)]
    for sid, (i, o) in zip(shares[:2], actual[:2], strict=True):
        assert h.apply_usage(used(sid, i=i, o=o)) is not None
    assert team.open_reservations == 7
    # The gateway admitted three shares of 10 + 10 and closes the lease with the rest.
    closed = h.commit(
        limiter_pb2.CommitRequest(
            reservation_id=lease,
            key_id="k",
            close_lease=True,
            unused_tokens=180 - 60,
            unused_requests=9 - 3,
            unused_input_tokens=170 - 30,
            unused_output_tokens=170 - 30,
        )
    )
    assert closed.found and team.open_reservations == 1
    i, o = actual[2]
    assert h.apply_usage(used(shares[2], i=i, o=o)) is not None
    assert h.apply_usage(used(shares[2], i=i, o=o)) is None  # each share settles once
    assert team.open_reservations == 0
    assert team.requests.total == 3
    assert team.input.total == sum(i for i, _ in actual)
    assert team.output.total == sum(o for _, o in actual)
    assert h.limiter._keys["k"].tokens.total == sum(i + o for i, o in actual)
    assert h.limiter.spent("team:t", now[0])[0] == sum(price(i, o) for i, o in actual)


def test_no_lease_past_the_tightest_level() -> None:
    h, _ = make()
    # Eight in flight at most: a lease would take 1/8 of the 7 left, less than a request.
    assert leased(h, key_limits=tenancy_pb2.Limits(concurrent_requests=8)).lease_requests == 0
    # A day's budget with room for fewer than eight more requests like this one.
    small = tenancy_pb2.Budgets(usd_nanos_per_day=price(10, 10) * 8)
    assert leased(h, key="k2", key_budgets=small).lease_requests == 0
    # A budget this very request already passes (its worst case above what is left):
    # admitted, as a budget admits while anything is left, but never with a lease.
    tiny = tenancy_pb2.Budgets(usd_nanos_per_day=price(10, 10) // 2)
    past = leased(h, key="k4", key_budgets=tiny)
    assert past.allowed and past.lease_requests == 0
    # Input tokens per minute: the lease's input is cut to 1/8 of what is left.
    narrow = leased(h, key="k3", key_limits=tenancy_pb2.Limits(input_tokens_per_minute=810))
    assert narrow.lease_requests == 8 and narrow.lease_input_tokens == 100


def test_an_open_lease_survives_a_snapshot_and_settles_after_it() -> None:
    h, now = make()
    grant = leased(h)
    restored = Limiter(h.limiter.config)
    restored.restore(decode_snapshot(encode_snapshot(h.limiter.snapshot(now[0]))), now[0])
    h2 = Admission(restored, LimiterMetrics(), clock=lambda: now[0], prices=Prices(TABLE))
    team = restored._keys["team:t"]
    assert team.open_reservations == 9
    assert restored.spent("team:t", now[0])[0] == price(10, 10) + price(160, 160)
    h2.apply_usage(used(share_id(grant.reservation_id, 1, 20, 10), i=7, o=3))
    h2.commit(
        limiter_pb2.CommitRequest(
            reservation_id=grant.reservation_id,
            close_lease=True,
            unused_tokens=160,
            unused_requests=8,
            unused_input_tokens=160,
            unused_output_tokens=160,
        )
    )
    assert team.open_reservations == 0 and team.requests.total == 1
    assert restored.spent("team:t", now[0])[0] == price(7, 3)


def test_snapshot_keeps_spend_levels_and_open_reservations() -> None:
    h, now = make()
    budgets = tenancy_pb2.Budgets(usd_nanos_per_day=100_000)
    limits = tenancy_pb2.Limits(concurrent_requests=1)
    first = h.reserve(ask(tokens_in=10, tokens_out=30, team_budgets=budgets, team_limits=limits))
    restored = Limiter(h.limiter.config)
    restored.restore(decode_snapshot(encode_snapshot(h.limiter.snapshot(now[0]))), now[0])
    h2 = Admission(restored, LimiterMetrics(), clock=lambda: now[0], prices=Prices(TABLE))
    assert h2.reserve(ask("k2", team_limits=limits)).denied_by == "team.concurrent_requests"
    h2.apply_usage(used(first.reservation_id, i=10, o=45))  # 100,000: the whole budget
    denied = h2.reserve(ask("k2", team_budgets=budgets))
    assert denied.budget_exceeded and denied.denied_by == "team.usd_per_day"


def test_usage_of_an_unknown_reservation_is_charged_only_when_asked_and_once() -> None:
    h, now = make()
    budgets = tenancy_pb2.Budgets(usd_nanos_per_day=50_000)
    event = used("gone-1", i=10, o=20, occurred_unix_nanos=now[0] * 1_000_000)
    assert h.apply_usage(event) is None
    assert (
        h.reserve(ask(tokens_in=0, tokens_out=0, team_budgets=budgets)).spend_ceiling_usd_nanos
        == 50_000
    )
    h.apply_usage(event, charge_unknown=True)
    assert h.reserve(ask(team_budgets=budgets)).budget_exceeded
    settled = h.reserve(ask("k9", "t9", tokens_in=1, tokens_out=1, team_budgets=budgets))
    h.apply_usage(used(settled.reservation_id, "k9", "t9", i=1, o=1))
    # Settled here already: a second event of it is not an unknown spend.
    h.apply_usage(used(settled.reservation_id, "k9", "t9", i=1, o=1), charge_unknown=True)
    assert h.limiter.spent("team:t9", now[0]) == (3_000, 3_000)


def test_the_tiers_batch_share_wins_over_the_configured_one() -> None:
    h, _ = make(batch_share=0.5)
    limits = tenancy_pb2.Limits(requests_per_minute=4)
    request = ask(team_limits=limits, priority="batch")
    request.batch_share = 0.25
    assert h.reserve(request).allowed
    assert h.reserve(request).denied_by == "team.requests_per_minute"
