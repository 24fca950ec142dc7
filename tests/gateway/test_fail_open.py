"""The local allowance a gateway admits from while the limiter does not answer, for a
tier that fails open (the real limiter killed: tests/limiter/test_fail_open.py)."""

from __future__ import annotations

import pytest
from sluice.errors import ErrorCode
from sluice.limiter.v1 import limiter_pb2
from sluice.partitions import partition_of, reservation_partition
from sluice.tenancy.v1 import tenancy_pb2

from services.gateway.domain.fail_open import FailOpenAllowance, reserve
from services.gateway.domain.problems import GatewayError, unavailable
from services.gateway.domain.tenancy.tiers import LimiterFailure, parse_tiers


def ask(key: str = "k", team: str = "t", team_rpm: int = 0) -> limiter_pb2.ReserveRequest:
    return limiter_pb2.ReserveRequest(
        key_id=key,
        team_id=team,
        input_tokens=5,
        max_output_tokens=5,
        team_limits=tenancy_pb2.Limits(requests_per_minute=team_rpm),
    )


def test_a_share_of_each_requests_limit_per_minute_then_refused() -> None:
    now = [100.0]
    allowance = FailOpenAllowance(0.1, 600, clock=lambda: now[0])
    admitted = [allowance.admit(ask("a", team_rpm=50)) for _ in range(5)]
    assert all(r.allowed for r in admitted)
    # The reservation id names the team's partition: its usage reaches the owner.
    assert {reservation_partition(r.reservation_id) for r in admitted} == {partition_of("t", "a")}
    refused = allowance.admit(ask("b", team_rpm=50))  # another key, the same team
    assert not refused.allowed and refused.denied_by == "fail_open.team.requests_per_minute"
    assert 59_000 < refused.retry_after_ms <= 60_000
    assert allowance.admit(ask("c", team="u", team_rpm=50)).allowed  # another team
    now[0] += 60.0
    assert allowance.admit(ask("b", team_rpm=50)).allowed
    # Without levels, the key's own rate (or the default) is the one shared.
    lone = FailOpenAllowance(0.1, 20, clock=lambda: now[0])
    assert [lone.admit(ask("z", team="")).allowed for _ in range(3)] == [True, True, False]


class Silent:
    async def reserve(self, request: limiter_pb2.ReserveRequest) -> limiter_pb2.ReserveResponse:
        raise unavailable("The rate limiter did not answer.")

    def release(self, reservation_id: str, key_id: str, request_id: str) -> None: ...

    async def drain(self) -> None: ...


async def test_the_tier_decides_between_the_allowance_and_limiter_unavailable() -> None:
    allowance = FailOpenAllowance(0.5, 600)
    opened = await reserve(Silent(), ask(team_rpm=10), LimiterFailure.FAIL_OPEN, allowance)
    assert opened.allowed and "open-" in opened.reservation_id
    with pytest.raises(GatewayError) as closed:
        await reserve(Silent(), ask(team_rpm=10), LimiterFailure.FAIL_CLOSED, allowance)
    assert closed.value.code is ErrorCode.LIMITER_UNAVAILABLE and closed.value.status == 503


def test_tiers_name_their_limiter_failure_and_refuse_another_word() -> None:
    table = parse_tiers("tiers:\n  a:\n    limiter_failure: fail_open\n  b: {}\n")
    assert table.tiers["a"].limiter_failure is LimiterFailure.FAIL_OPEN
    assert table.tiers["b"].limiter_failure is LimiterFailure.FAIL_CLOSED
    with pytest.raises(ValueError, match=r"tiers.yaml:3: limiter_failure of tier 'a'"):
        parse_tiers("tiers:\n  a:\n    limiter_failure: maybe\n")


def test_a_tier_may_set_its_batch_share_within_zero_and_one() -> None:
    table = parse_tiers("tiers:\n  a:\n    batch_share: 0.25\n  b: {}\n")
    assert table.tiers["a"].batch_share == 0.25 and table.tiers["b"].batch_share == 0.0
    for bad in ("0", "1.5", "yes", "half"):
        with pytest.raises(ValueError, match=r"tiers.yaml:3: batch_share of tier 'a'"):
            parse_tiers(f"tiers:\n  a:\n    batch_share: {bad}\n")
