"""The limiter's window arithmetic, decisions, settlement, expiry and snapshots."""

from __future__ import annotations

import pytest

from services.limiter.domain.windows import (
    LEASE,
    RPM,
    TPM,
    Decision,
    Limiter,
    LimiterConfig,
    decode_snapshot,
    encode_snapshot,
)

T0 = 1_700_000_000_000  # a wall-clock ms on a sub-bucket boundary


def limiter(tpm: int = 1000, rpm: int = 100, ttl_ms: int = 600_000) -> Limiter:
    return Limiter(
        LimiterConfig(
            default_tokens_per_minute=tpm,
            default_requests_per_minute=rpm,
            reservation_ttl_ms=ttl_ms,
        )
    )


def reserve(
    lim: Limiter,
    tokens: int,
    at: int,
    key: str = "k",
    tokens_per_minute: int = 0,
    requests_per_minute: int = 0,
) -> Decision:
    return lim.reserve(
        key,
        input_tokens=tokens,
        max_output_tokens=0,
        now_ms=T0 + at,
        tokens_per_minute=tokens_per_minute,
        requests_per_minute=requests_per_minute,
    )


def policy(decision_or_view, name: str):
    return next(p for p in decision_or_view.policies if p.name == name)


def test_allowed_reservation_counts_input_plus_max_output_on_both_policies() -> None:
    lim = limiter()
    d = lim.reserve("k", input_tokens=120, max_output_tokens=80, now_ms=T0 + 250)
    assert d.allowed and d.reservation_id and d.reserved_tokens == 200
    tpm, rpm = policy(d, TPM), policy(d, RPM)
    assert (tpm.quota, tpm.remaining, tpm.window_seconds) == (1000, 800, 60)
    assert (rpm.quota, rpm.remaining) == (100, 99)
    # Spend in sub-bucket [T0, T0+1s) is held until T0+61s: 60.75 s from now.
    assert tpm.reset_ms == 60_750 and rpm.reset_ms == 60_750


def test_exactly_the_remaining_amount_fits_and_one_more_token_does_not() -> None:
    lim = limiter()
    assert reserve(lim, 600, 0).allowed
    assert not reserve(lim, 401, 10).allowed
    last = reserve(lim, 400, 20)
    assert last.allowed and policy(last, TPM).remaining == 0


def test_retry_after_is_when_enough_old_sub_buckets_age_out() -> None:
    lim = limiter()
    assert reserve(lim, 500, 0).allowed  # sub-bucket 0: expires at T0 + 61 s
    assert reserve(lim, 500, 10_000).allowed  # sub-bucket 10: expires at T0 + 71 s

    small = reserve(lim, 300, 20_000)
    assert not small.allowed and small.denied_by == TPM
    assert small.retry_after_ms == 41_000  # only the first bucket needs to go
    big = reserve(lim, 600, 20_000)
    assert big.retry_after_ms == 51_000  # both buckets need to go
    assert policy(big, TPM).reset_ms == 51_000 and policy(big, TPM).remaining == 0

    # Conservative edge: still held one ms before the announced time, free at it.
    assert not reserve(lim, 300, 60_999).allowed
    assert reserve(lim, 300, 61_000).allowed


def test_following_retry_after_admits_the_request() -> None:
    lim = limiter()
    reserve(lim, 1000, 3_456)
    denied = reserve(lim, 10, 30_000)
    assert not denied.allowed
    assert reserve(lim, 10, 30_000 + denied.retry_after_ms).allowed


def test_request_larger_than_the_whole_quota_is_refused_for_the_full_window() -> None:
    lim = limiter(tpm=1000)
    d = lim.reserve("k", input_tokens=900, max_output_tokens=101, now_ms=T0)
    assert not d.allowed and d.denied_by == TPM and d.retry_after_ms == 60_000
    assert d.reservation_id == "" and d.reserved_tokens == 0
    assert policy(d, TPM).remaining == 1000  # a refusal spends nothing
    assert policy(d, RPM).remaining == 100


def test_requests_per_minute_refuses_the_request_past_the_quota() -> None:
    lim = limiter(rpm=2)
    assert reserve(lim, 1, 0).allowed
    assert reserve(lim, 1, 5_000).allowed
    d = reserve(lim, 1, 6_000)
    assert not d.allowed and d.denied_by == RPM
    assert d.retry_after_ms == 55_000  # the first request's sub-bucket ages out at 61 s
    assert policy(d, RPM).remaining == 0


def test_when_both_policies_refuse_the_longer_wait_is_reported() -> None:
    lim = limiter(tpm=1000, rpm=1)
    assert reserve(lim, 400, 0).allowed  # rpm full until 61 s
    d = reserve(lim, 2000, 1_000)  # tpm: bigger than the quota -> full window
    assert d.denied_by == TPM and d.retry_after_ms == 60_000
    d = reserve(lim, 100, 1_000)  # tpm fits; only rpm refuses
    assert d.denied_by == RPM and d.retry_after_ms == 60_000


def test_per_request_quotas_override_the_defaults_and_are_reported() -> None:
    lim = limiter(tpm=1000, rpm=100)
    d = reserve(lim, 5000, 0, tokens_per_minute=10_000, requests_per_minute=7)
    assert d.allowed
    assert (policy(d, TPM).quota, policy(d, TPM).remaining) == (10_000, 5000)
    assert (policy(d, RPM).quota, policy(d, RPM).remaining) == (7, 6)
    view = lim.quota("k", T0 + 1)
    assert policy(view, TPM).quota == 10_000 and view.open_reservations == 1


def test_keys_are_independent() -> None:
    lim = limiter()
    assert reserve(lim, 1000, 0, key="a").allowed
    assert not reserve(lim, 1, 0, key="a").allowed
    assert reserve(lim, 1000, 0, key="b").allowed


def test_settle_replaces_the_reservation_by_actual_usage_once() -> None:
    lim = limiter()
    d = reserve(lim, 800, 0)
    settled = lim.settle(d.reservation_id, 200, T0 + 2_000)
    assert settled is not None and settled.delta == -600
    view = lim.quota("k", T0 + 2_000)
    assert policy(view, TPM).remaining == 800 and view.open_reservations == 0
    assert policy(view, RPM).remaining == 99  # the request itself still counted
    # A redelivered usage event, or a commit after it, changes nothing.
    assert lim.settle(d.reservation_id, 0, T0 + 3_000) is None
    assert policy(lim.quota("k", T0 + 3_000), TPM).remaining == 800


def test_settled_usage_ages_out_with_the_reservation_sub_bucket() -> None:
    lim = limiter()
    d = reserve(lim, 800, 0)
    lim.settle(d.reservation_id, 300, T0 + 30_000)
    assert policy(lim.quota("k", T0 + 60_999), TPM).remaining == 700
    assert policy(lim.quota("k", T0 + 61_000), TPM).remaining == 1000


def test_zero_usage_releases_the_whole_reservation() -> None:
    lim = limiter()
    d = reserve(lim, 1000, 0)
    assert not reserve(lim, 1, 100).allowed
    assert lim.settle(d.reservation_id, 0, T0 + 200) is not None
    assert reserve(lim, 1000, 300).allowed


def test_usage_above_an_aged_out_reservation_is_charged_now() -> None:
    lim = limiter()
    d = reserve(lim, 100, 0)
    # A long generation: the reservation's sub-bucket left the window at 61 s.
    settled = lim.settle(d.reservation_id, 700, T0 + 90_000)
    assert settled is not None and settled.delta == 600
    view = lim.quota("k", T0 + 90_000)
    assert policy(view, TPM).remaining == 400
    assert policy(view, TPM).reset_ms == 61_000


def test_refund_of_an_aged_out_reservation_changes_nothing() -> None:
    lim = limiter()
    d = reserve(lim, 900, 0)
    assert lim.settle(d.reservation_id, 100, T0 + 90_000) is not None
    assert policy(lim.quota("k", T0 + 90_000), TPM).remaining == 1000


def test_expired_reservation_keeps_its_reserved_amount_and_cannot_settle() -> None:
    lim = limiter(ttl_ms=5_000)
    d = reserve(lim, 700, 0)
    assert lim.expire(T0 + 4_999) == 0 and lim.open_reservations == 1
    assert lim.expire(T0 + 5_000) == 1
    assert lim.open_reservations == 0 and lim.expired_total == 1
    view = lim.quota("k", T0 + 5_000)
    assert policy(view, TPM).remaining == 300 and view.open_reservations == 0
    assert lim.settle(d.reservation_id, 0, T0 + 6_000) is None
    assert policy(lim.quota("k", T0 + 6_000), TPM).remaining == 300


def test_expire_forgets_idle_keys_only() -> None:
    lim = limiter()
    old = reserve(lim, 10, 0, key="old")
    lim.settle(old.reservation_id, 10, T0 + 1_000)
    d = reserve(lim, 10, 0, key="pending")
    recent = reserve(lim, 10, 50_000, key="recent")
    lim.settle(recent.reservation_id, 10, T0 + 51_000)
    lim.expire(T0 + 70_000)
    # "old" aged out and is settled; "pending" waits for usage; "recent" is in the window.
    assert lim.tracked_keys == 2
    lim.settle(d.reservation_id, 10, T0 + 70_000)
    lim.expire(T0 + 120_000)
    assert lim.tracked_keys == 0


def test_a_clock_stepping_back_is_clamped_to_the_newest_sub_bucket() -> None:
    lim = limiter()
    assert reserve(lim, 500, 10_000).allowed
    # Wall clock jumps 5 s back: spend goes to the newest bucket, eviction stays ordered.
    assert reserve(lim, 500, 5_000).allowed
    assert not reserve(lim, 1, 5_000).allowed
    assert reserve(lim, 1000, 71_000).allowed


def test_snapshot_round_trip_restores_windows_quotas_and_reservations() -> None:
    lim = limiter()
    open_one = reserve(lim, 300, 0, key="a", tokens_per_minute=5000)
    reserve(lim, 200, 20_000, key="b")
    settled = reserve(lim, 100, 20_000, key="b")
    lim.settle(settled.reservation_id, 40, T0 + 21_000)

    data = encode_snapshot(lim.snapshot(T0 + 30_000))
    restored = limiter()
    restored.restore(decode_snapshot(data), T0 + 31_000)

    for key in ("a", "b"):
        assert restored.quota(key, T0 + 31_000) == lim.quota(key, T0 + 31_000)
    assert policy(restored.quota("a", T0 + 31_000), TPM).quota == 5000
    assert restored.open_reservations == 2
    # Restored reservations still settle, exactly once.
    assert restored.settle(open_one.reservation_id, 0, T0 + 32_000) is not None
    assert restored.settle(open_one.reservation_id, 0, T0 + 32_000) is None
    assert restored.settle(settled.reservation_id, 0, T0 + 32_000) is None
    assert policy(restored.quota("a", T0 + 32_000), TPM).remaining == 5000
    # New reservation ids never collide with restored ones.
    fresh = reserve(restored, 1, 33_000, key="b")
    assert fresh.reservation_id != open_one.reservation_id


def test_restore_drops_what_aged_out_while_down() -> None:
    lim = limiter(ttl_ms=120_000)
    reserve(lim, 600, 0, key="a")
    reserve(lim, 100, 50_000, key="a")
    data = encode_snapshot(lim.snapshot(T0 + 55_000))
    restored = limiter(ttl_ms=120_000)
    restored.restore(decode_snapshot(data), T0 + 80_000)
    assert policy(restored.quota("a", T0 + 80_000), TPM).remaining == 900
    restored.restore(decode_snapshot(data), T0 + 200_000)
    assert restored.open_reservations == 0 and restored.tracked_keys == 0


def test_unknown_snapshot_version_is_rejected() -> None:
    import json
    import zlib

    with pytest.raises(ValueError, match="version"):
        decode_snapshot(zlib.compress(json.dumps({"version": 99}).encode()))


def test_config_rejects_a_window_that_is_not_whole_sub_buckets() -> None:
    with pytest.raises(ValueError):
        LimiterConfig(window_ms=60_000, sub_bucket_ms=7_000)


# --- admission leases ---------------------------------------------------------------


def lease(lim: Limiter, tokens: int, at: int, lease_requests: int = 10) -> Decision:
    return lim.reserve(
        "k",
        input_tokens=tokens,
        max_output_tokens=0,
        now_ms=T0 + at,
        lease_tokens=tokens * lease_requests,
        lease_requests=lease_requests,
    )


def test_lease_takes_at_most_a_share_of_what_is_left_and_counts_at_once() -> None:
    lim = limiter(tpm=10_000, rpm=100)
    d = lease(lim, 100, 0)
    # Left after this request: 9,900 tokens and 99 requests; a lease takes 1/8 of each.
    assert d.allowed and (d.lease_tokens, d.lease_requests) == (1000, 10)
    assert policy(d, TPM).remaining == 10_000 - 100 - 1000
    assert policy(d, RPM).remaining == 100 - 1 - 10
    assert lim.open_reservations == 1


def test_no_lease_when_the_key_has_no_room_for_another_request() -> None:
    lim = limiter(tpm=1000, rpm=100)
    d = lease(lim, 900, 0)
    assert d.allowed and d.lease_tokens == 0 and d.lease_requests == 0
    assert policy(d, TPM).remaining == 100
    # A plain reservation: usage settles it as before.
    assert lim.settle(d.reservation_id, 500, T0 + 10) is not None
    assert lim.open_reservations == 0


def test_a_lease_only_ask_holds_nothing_without_room_for_a_lease() -> None:
    """A holder renewing ahead asks for a lease alone: granted, the ask is the lease's
    first share; with no room for one, it is refused and nothing is counted."""
    lim = limiter(tpm=10_000, rpm=100)
    d = lim.reserve(
        "k",
        input_tokens=100,
        max_output_tokens=0,
        now_ms=T0,
        lease_tokens=1000,
        lease_requests=10,
        lease_only=True,
    )
    assert d.allowed and (d.lease_tokens, d.lease_requests) == (1000, 10)

    tight = limiter(tpm=1000, rpm=100)
    assert reserve(tight, 850, 0).allowed
    refused = tight.reserve(
        "k",
        input_tokens=100,
        max_output_tokens=0,
        now_ms=T0 + 1,
        lease_tokens=1000,
        lease_requests=10,
        lease_only=True,
    )
    assert not refused.allowed and refused.denied_by == LEASE and refused.retry_after_ms == 0
    assert policy(refused, TPM).remaining == 150 and policy(refused, RPM).remaining == 99
    assert tight.open_reservations == 1
    # The room is still there for a request of its own.
    assert reserve(tight, 150, 2).allowed


def test_lease_shares_settle_once_each_and_close_returns_the_unused() -> None:
    from sluice.leases import share_id

    lim = limiter(tpm=10_000, rpm=100)
    d = lease(lim, 100, 0)
    first = share_id(d.reservation_id, 1, 100, 100)
    second = share_id(d.reservation_id, 2, 100, 100)
    # The first request used 40 of its 100; the second request (from the lease) 250.
    assert lim.settle(first, 40, T0 + 10) is not None
    assert lim.settle(first, 40, T0 + 11) is None, "a redelivered usage event changes nothing"
    assert lim.settle(second, 250, T0 + 12) is not None
    # The holder admitted one request of its 10 and 100 of its 1000 tokens.
    assert lim.close_lease(d.reservation_id, 900, 9, T0 + 20)
    view = lim.quota("k", T0 + 30)
    assert policy(view, TPM).remaining == 10_000 - 40 - 250
    assert policy(view, RPM).remaining == 100 - 2
    assert view.open_reservations == 0
    assert not lim.close_lease(d.reservation_id, 900, 9, T0 + 21)


def test_late_share_after_close_still_lands_once() -> None:
    from sluice.leases import share_id

    lim = limiter(tpm=10_000, rpm=100)
    d = lease(lim, 100, 0)
    assert lim.close_lease(d.reservation_id, 1000, 10, T0 + 5)
    late = share_id(d.reservation_id, 1, 100, 100)
    assert lim.settle(late, 160, T0 + 50) is not None
    assert lim.settle(late, 160, T0 + 51) is None
    assert policy(lim.quota("k", T0 + 60), TPM).remaining == 10_000 - 160


def test_lease_survives_a_snapshot() -> None:
    from sluice.leases import share_id

    lim = limiter(tpm=10_000, rpm=100)
    d = lease(lim, 100, 0)
    assert lim.settle(share_id(d.reservation_id, 1, 100, 100), 100, T0 + 1) is not None
    restored = limiter(tpm=10_000, rpm=100)
    restored.restore(decode_snapshot(encode_snapshot(lim.snapshot(T0 + 2))), T0 + 3)
    assert restored.settle(share_id(d.reservation_id, 1, 100, 100), 100, T0 + 4) is None
    assert restored.close_lease(d.reservation_id, 1000, 10, T0 + 5)
    assert policy(restored.quota("k", T0 + 6), TPM).remaining == 10_000 - 100
