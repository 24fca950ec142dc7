"""Admission leases at the gateway: local admission, expiry and close, one lease request
per key at a time. The limiter side of leases is in tests/limiter/test_domain.py, and
through the whole stack in tests/e2e (a lease-admitted request's trace)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sluice.leases import Unused, parse_share
from sluice.limiter.v1 import limiter_pb2

from services.gateway.domain.leases import LeasingLimiter
from services.limiter.domain.admission import Admission, LimiterMetrics
from services.limiter.domain.windows import Limiter, LimiterConfig


@dataclass
class InProcessLimiter:
    """The limiter's real admission and domain, called directly instead of over NATS."""

    now_ms: int = 1_700_000_000_000
    tpm: int = 100_000
    rpm: int = 600
    reserves: list[limiter_pb2.ReserveRequest] = field(default_factory=list)
    closes: list[tuple[str, int, int]] = field(default_factory=list)
    gate: asyncio.Event | None = None

    def __post_init__(self) -> None:
        self.domain = Limiter(
            LimiterConfig(default_tokens_per_minute=self.tpm, default_requests_per_minute=self.rpm)
        )
        self.admission = Admission(self.domain, LimiterMetrics(), clock=lambda: self.now_ms)

    async def reserve(self, request: limiter_pb2.ReserveRequest) -> limiter_pb2.ReserveResponse:
        self.reserves.append(request)
        if self.gate is not None:
            await self.gate.wait()
        return self.admission.reserve(request)

    def release(self, reservation_id: str, key_id: str, request_id: str) -> None:
        self.domain.settle(reservation_id, 0, self.now_ms)

    def close_lease(self, lease_id: str, key_id: str, unused: Unused) -> None:
        self.closes.append((lease_id, unused.tokens, unused.requests))
        self.domain.close_lease(
            lease_id,
            unused.tokens,
            unused.requests,
            self.now_ms,
            unused_input_tokens=unused.input_tokens,
            unused_output_tokens=unused.output_tokens,
        )

    async def drain(self) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def ask(tokens: int = 100, key: str = "k") -> limiter_pb2.ReserveRequest:
    return limiter_pb2.ReserveRequest(
        key_id=key, input_tokens=tokens // 2, max_output_tokens=tokens - tokens // 2
    )


def remaining(resp: limiter_pb2.ReserveResponse, name: str) -> int:
    return next(p.remaining for p in resp.policies if p.name == name)


async def test_one_round_trip_admits_a_lease_of_requests() -> None:
    limiter = InProcessLimiter()
    leasing = LeasingLimiter(limiter, lease_requests=4, clock=Clock())  # type: ignore[arg-type]
    answers = [await leasing.reserve(ask()) for _ in range(5)]
    assert all(a.allowed for a in answers)
    assert len(limiter.reserves) == 1 and leasing.admitted_locally == 4
    shares = [parse_share(a.reservation_id) for a in answers]
    assert all(s is not None and s.tokens == 100 for s in shares)
    assert len({a.reservation_id for a in answers}) == 5
    # Headers count the unadmitted part of the lease as the key's own.
    assert [remaining(a, "tpm") for a in answers] == [99_900, 99_800, 99_700, 99_600, 99_500]
    assert [remaining(a, "rpm") for a in answers] == [599, 598, 597, 596, 595]
    # The sixth asks again; the spent lease is closed with nothing left in it.
    await leasing.reserve(ask())
    assert len(limiter.reserves) == 2
    assert limiter.closes == [(shares[0].lease_id, 0, 0)]  # type: ignore[union-attr]


async def test_usage_of_each_share_reaches_the_limiter_window() -> None:
    limiter = InProcessLimiter()
    leasing = LeasingLimiter(limiter, lease_requests=4, clock=Clock())  # type: ignore[arg-type]
    a = await leasing.reserve(ask())
    b = await leasing.reserve(ask())
    assert limiter.domain.settle(a.reservation_id, 30, limiter.now_ms) is not None
    assert limiter.domain.settle(b.reservation_id, 250, limiter.now_ms) is not None
    await leasing.drain()
    view = limiter.domain.quota("k", limiter.now_ms)
    assert next(p.remaining for p in view.policies if p.name == "tpm") == 100_000 - 280
    assert next(p.remaining for p in view.policies if p.name == "rpm") == 600 - 2
    assert view.open_reservations == 0


async def test_an_expired_lease_is_closed_and_returns_what_it_held() -> None:
    clock = Clock()
    limiter = InProcessLimiter()
    leasing = LeasingLimiter(limiter, lease_requests=4, clock=clock)  # type: ignore[arg-type]
    first = await leasing.reserve(ask())
    clock.t += 2.5
    await leasing.reserve(ask())
    lease_id = parse_share(first.reservation_id).lease_id  # type: ignore[union-attr]
    assert limiter.closes == [(lease_id, 400, 4)]
    assert len(limiter.reserves) == 2


async def test_a_key_near_its_quota_is_admitted_one_request_at_a_time() -> None:
    limiter = InProcessLimiter(tpm=1000)
    leasing = LeasingLimiter(limiter, lease_requests=32, clock=Clock())  # type: ignore[arg-type]
    answers = [await leasing.reserve(ask(300)) for _ in range(4)]
    assert [a.allowed for a in answers] == [True, True, True, False]
    assert len(limiter.reserves) == 4 and leasing.admitted_locally == 0
    assert answers[-1].denied_by == "tpm" and answers[-1].retry_after_ms > 0


async def test_concurrent_requests_of_a_key_wait_for_one_lease() -> None:
    limiter = InProcessLimiter(gate=asyncio.Event())
    leasing = LeasingLimiter(limiter, lease_requests=8, clock=Clock())  # type: ignore[arg-type]
    pending = [asyncio.create_task(leasing.reserve(ask())) for _ in range(6)]
    await asyncio.sleep(0.01)
    assert limiter.gate is not None
    limiter.gate.set()
    answers = await asyncio.gather(*pending)
    assert all(a.allowed for a in answers)
    assert len(limiter.reserves) == 1 and leasing.admitted_locally == 5


async def test_changed_quotas_end_the_lease_and_zero_disables_leases() -> None:
    limiter = InProcessLimiter()
    leasing = LeasingLimiter(limiter, lease_requests=4, clock=Clock())  # type: ignore[arg-type]
    await leasing.reserve(ask())
    changed = ask()
    changed.tokens_per_minute = 50_000
    await leasing.reserve(changed)
    assert len(limiter.reserves) == 2 and len(limiter.closes) == 1

    plain = InProcessLimiter()
    off = LeasingLimiter(plain, lease_requests=0, clock=Clock())  # type: ignore[arg-type]
    answers = [await off.reserve(ask()) for _ in range(3)]
    assert len(plain.reserves) == 3
    assert all(parse_share(a.reservation_id) is None for a in answers)
    assert all(r.lease_tokens == 0 for r in plain.reserves)


def team_ask(concurrent: int) -> limiter_pb2.ReserveRequest:
    request = ask()
    request.team_id = "t"
    request.team_limits.concurrent_requests = concurrent
    request.team_limits.requests_per_minute = 1000
    return request


async def test_two_gateways_leasing_under_a_team_limit_admit_exactly_up_to_it() -> None:
    """Leases carry the team's levels: both gateways admit locally, the team's requests in
    flight never pass its limit, and every slot is used before anyone is refused."""
    limiter = InProcessLimiter()
    gateways = [
        LeasingLimiter(limiter, lease_requests=8, clock=Clock())  # type: ignore[arg-type]
        for _ in range(2)
    ]
    admitted: list[tuple[LeasingLimiter, str]] = []
    for n in range(120):
        gateway = gateways[n % 2]
        answer = await gateway.reserve(team_ask(40))
        if answer.allowed:
            admitted.append((gateway, answer.reservation_id))
        else:
            assert answer.denied_by == "team.concurrent_requests"
        assert limiter.domain._keys["team:t"].open_reservations <= 40
        await asyncio.sleep(0)  # a lease asked for ahead arrives between requests
    assert len(admitted) == 40
    # Every request was admitted from a lease or by a round trip of its own (a refusal
    # is one too); the other round trips asked for leases ahead.
    asked_ahead = sum(g.asked_ahead for g in gateways)
    by_round_trip = len(limiter.reserves) - asked_ahead - 80
    assert sum(g.admitted_locally for g in gateways) == 40 - by_round_trip > 0
    assert sum(g.refilled_ahead for g in gateways) > 0
    # Each request ends; the leases close: nothing is left in flight or held.
    for gateway, reservation_id in admitted:
        gateway.release(reservation_id, "k", "")
    for gateway in gateways:
        await gateway.drain()
    team = limiter.domain._keys["team:t"]
    assert team.open_reservations == 0 and team.requests.total == 40


async def test_a_changed_team_limit_ends_the_lease() -> None:
    limiter = InProcessLimiter()
    leasing = LeasingLimiter(limiter, lease_requests=4, clock=Clock())  # type: ignore[arg-type]
    await leasing.reserve(team_ask(40))
    await leasing.reserve(team_ask(40))
    assert len(limiter.reserves) == 1
    await leasing.reserve(team_ask(41))
    assert len(limiter.reserves) == 2 and len(limiter.closes) == 1


async def test_the_next_lease_is_asked_ahead_and_no_request_waits_for_it() -> None:
    """When the lease in use runs low, the next is asked for in the background; the
    requests after the last of the old one take from it without a round trip, even
    while the limiter is slow to answer anything else."""
    limiter = InProcessLimiter()
    leasing = LeasingLimiter(limiter, lease_requests=4, clock=Clock())  # type: ignore[arg-type]
    first = [await leasing.reserve(ask()) for _ in range(4)]
    # Four of the five taken: one left, under the quarter mark: the next was asked for.
    await asyncio.sleep(0)
    assert len(limiter.reserves) == 2 and limiter.reserves[1].lease_only
    assert leasing.refilled_ahead == 1 and leasing.open_leases == 2
    limiter.gate = asyncio.Event()  # from now on the limiter does not answer
    later = [await asyncio.wait_for(leasing.reserve(ask()), 1) for _ in range(4)]
    assert all(a.allowed for a in first + later)
    ids = [parse_share(a.reservation_id) for a in first + later]
    leases = [s.lease_id for s in ids]  # type: ignore[union-attr]
    assert len(set(leases[:5])) == 1 and leases[5] != leases[0] and len(set(leases[5:])) == 1
    # The spent lease was closed with nothing left; the next one's first share is its
    # own (the ask admitted no request), so it has admitted 3 of its 5.
    assert limiter.closes == [(leases[0], 0, 0)]
    limiter.gate.set()
    await leasing.drain()
    view = limiter.domain.quota("k", limiter.now_ms)
    assert view.open_reservations == len(first + later)  # the admitted, unsettled
    assert next(p.remaining for p in view.policies if p.name == "rpm") == 600 - 8


async def test_a_key_near_its_limit_gets_no_lease_ahead_and_nothing_is_held() -> None:
    limiter = InProcessLimiter(tpm=2000)
    leasing = LeasingLimiter(limiter, lease_requests=4, clock=Clock())  # type: ignore[arg-type]
    answers = []
    for _ in range(20):
        answers.append(await leasing.reserve(ask()))
        await asyncio.sleep(0)
    await leasing.drain()
    assert sum(a.allowed for a in answers) == 20
    view = limiter.domain.quota("k", limiter.now_ms)
    # Exactly what the 20 requests reserved, nothing for leases refused ahead.
    assert next(p.remaining for p in view.policies if p.name == "tpm") == 0
    assert next(p.remaining for p in view.policies if p.name == "rpm") == 600 - 20
    assert any(r.lease_only for r in limiter.reserves)
