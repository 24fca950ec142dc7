"""Partitions in memory: the journal and snapshot a new owner rebuilds from, and the
ownership rounds over a lease table (the real KV leases: test_replicas.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.leases import share_id
from sluice.limiter.v1 import limiter_pb2
from sluice.partitions import id_prefix, partition_of, reservation_partition
from sluice.tenancy.v1 import tenancy_pb2

from services.limiter.domain.admission import Admission, LimiterMetrics
from services.limiter.domain.partitions import (
    Ownership,
    Partition,
    preferred_owner,
    rebuild,
)
from services.limiter.domain.replica import Replica
from services.limiter.domain.windows import Limiter, LimiterConfig

T0 = 1_700_000_000_000
TEAM = "acme"
P = partition_of(TEAM, "k")


class Recorder:
    def __init__(self) -> None:
        self.entries: list[bytes] = []

    async def append(self, partition: int, entry: bytes) -> None:
        assert partition == P
        self.entries.append(entry)


def partition(journal: Recorder, now: list[int]) -> Partition:
    limiter = Limiter(LimiterConfig(), id_prefix=id_prefix(P))
    return Partition(P, Admission(limiter, LimiterMetrics(), clock=lambda: now[0]), journal)


def ask(n: int) -> limiter_pb2.ReserveRequest:
    return limiter_pb2.ReserveRequest(
        key_id="k",
        team_id=TEAM,
        request_id=f"r{n}",
        input_tokens=10,
        max_output_tokens=10,
        team_limits=tenancy_pb2.Limits(requests_per_minute=5),
    )


async def items(values: list) -> AsyncIterator:  # type: ignore[type-arg]
    for value in values:
        yield value


def usage(rid: str, tokens: int) -> cost_pb2.UsageEvent:
    return cost_pb2.UsageEvent(
        key_id="k",
        team_id=TEAM,
        reservation_id=rid,
        usage=chat_pb2.Usage(input_tokens=tokens, output_tokens=0),
        outcome="completed",
    )


def test_reservation_ids_name_their_partition() -> None:
    assert reservation_partition(f"{id_prefix(7)}abc-1") == 7
    assert reservation_partition(f"{id_prefix(7)}abc-1~2~30") == 7  # a lease share
    assert reservation_partition("abc-1") is None and reservation_partition("px.1") is None
    assert partition_of(TEAM, "k1") == partition_of(TEAM, "k2")  # a team is one partition
    assert partition_of("", "k1") == partition_of("", "k1")


async def test_a_new_owner_rebuilds_from_snapshot_journal_and_usage() -> None:
    now = [T0]
    journal = Recorder()
    old = partition(journal, now)
    first = await old.reserve(ask(1))
    second = await old.reserve(ask(2))
    snapshot = old.snapshot()  # holds the two reservations, journal mark 2
    third = await old.reserve(ask(3))
    await old.commit(limiter_pb2.CommitRequest(reservation_id=second.reservation_id))
    # Usage of the first (applied before the snapshot? no: after) at stream seq 10.
    old.apply_usage(usage(first.reservation_id, 5), 10)
    assert [r.allowed for r in (first, second, third)] == [True, True, True]
    assert len(journal.entries) == 4  # 3 reservations, 1 release

    new = partition(Recorder(), now)
    new.restore(snapshot)
    assert new.journal_mark == 2
    # Every journal entry is offered (the reader's start is by time): those already in
    # the snapshot are skipped by number.
    entries, events = await rebuild(
        new, items(journal.entries), items([(10, usage(first.reservation_id, 5))]), 16
    )
    assert (entries, events) == (2, 1)
    assert new.journal_mark == 4 and new.usage_mark == 10
    limiter = new.admission.limiter
    assert limiter.open_reservations == 1  # the third; the first settled, the second released
    # Team window: 3 requests counted (a release gives back tokens, not the request).
    reply = new.admission.reserve(ask(4))
    team = next(p for p in reply.policies if p.name == "team.requests_per_minute")
    assert team.remaining == 5 - 4
    # The journal numbering goes on where the old owner's ended.
    await new.reserve(ask(5))
    assert new.journal_mark == 5


async def test_usage_is_applied_once_by_stream_position() -> None:
    now = [T0]
    p = partition(Recorder(), now)
    r = await p.reserve(ask(1))
    p.apply_usage(usage(r.reservation_id, 7), 3)
    p.apply_usage(usage(r.reservation_id, 7), 3)
    # An event of a reservation this state never saw is counted as spent, once.
    p.apply_usage(usage(f"{id_prefix(P)}gone-1", 100), 4)
    p.apply_usage(usage(f"{id_prefix(P)}gone-1", 100), 4)
    view = p.admission.limiter.quota("k", now[0])
    tpm = next(x for x in view.policies if x.name == "tpm")
    assert tpm.quota - tpm.remaining == 107


class Table:
    """Leases as the KV bucket keeps them: create only when free, update by revision."""

    def __init__(self) -> None:
        self.leases: dict[int, tuple[str, int]] = {}
        self.members: set[str] = set()
        self.revision = 0

    async def heartbeat(self, member: str) -> set[str]:
        self.members.add(member)
        return set(self.members)

    async def acquire(self, partition: int, member: str) -> int | None:
        if partition in self.leases:
            return None
        self.revision += 1
        self.leases[partition] = (member, self.revision)
        return self.revision

    async def renew(self, partition: int, member: str, revision: int) -> int | None:
        held = self.leases.get(partition)
        if held is None or held[1] != revision:
            return None
        self.revision += 1
        self.leases[partition] = (member, self.revision)
        return self.revision

    async def release(self, partition: int, revision: int) -> None:
        if self.leases.get(partition, ("", -1))[1] == revision:
            del self.leases[partition]

    async def leave(self, member: str) -> None:
        self.members.discard(member)

    def lapse(self, member: str) -> None:
        """What the bucket's TTL does to a dead member's entries."""
        self.members.discard(member)
        for number in [n for n, (m, _) in self.leases.items() if m == member]:
            del self.leases[number]


async def test_rounds_spread_hand_over_and_take_over_a_dead_members_partitions() -> None:
    table = Table()
    a, b, c = (Ownership(table, m, 16, 2.0) for m in ("a", "b", "c"))
    await a.round(0.0)
    assert set(a.held) == set(range(16))  # alone: everything
    await b.round(0.1)
    await c.round(0.1)
    plan = await a.round(0.5)
    # a hands over what b and c are preferred for; they take it on their next round.
    assert set(plan.hand_over) == {n for n in range(16) if preferred_owner(n, "abc") != "a"}
    for number in plan.hand_over:
        await a.release(number)
    await b.round(0.6)
    await c.round(0.6)
    owners = {n: m for n, (m, _) in table.leases.items()}
    assert owners == {n: preferred_owner(n, "abc") for n in range(16)}
    assert {"a", "b", "c"} == set(owners.values())

    table.lapse("c")  # SIGKILLed: its entries lapse after the TTL
    plan_a, plan_b = await a.round(3.0), await b.round(3.0)
    taken = set(plan_a.take) | set(plan_b.take)
    assert taken == {n for n, m in owners.items() if m == "c"}
    assert len(table.leases) == 16 and {m for m, _ in table.leases.values()} == {"a", "b"}


async def test_a_lease_renewed_by_someone_else_is_lost() -> None:
    table = Table()
    a = Ownership(table, "a", 2, 2.0)
    await a.round(0.0)
    table.leases[0] = ("z", 999)  # the lease lapsed and another member took it
    plan = await a.round(0.5)
    assert plan.lost == [0] and set(a.held) == {1}


async def test_a_lease_with_levels_is_rebuilt_from_the_journal_alone() -> None:
    """A new owner with no snapshot: the lease's grant and its close come from the
    journal, its shares' usage from the stream; the team's state ends where the old
    owner's did (requests, slots in flight)."""
    now = [T0]
    journal = Recorder()
    old = partition(journal, now)
    leased = ask(1)
    leased.team_limits.requests_per_minute = 1000
    leased.team_limits.concurrent_requests = 100
    leased.lease_tokens, leased.lease_requests = 160, 8
    grant = await old.reserve(leased)
    assert grant.lease_requests == 8
    lease_id = grant.reservation_id
    shares = [share_id(lease_id, n, 20, 10) for n in (1, 2)]
    await old.commit(
        limiter_pb2.CommitRequest(
            reservation_id=lease_id,
            close_lease=True,
            unused_tokens=180 - 40,
            unused_requests=9 - 2,
            unused_input_tokens=grant.lease_input_tokens + 10 - 20,
            unused_output_tokens=grant.lease_output_tokens + 10 - 20,
        )
    )
    events = [(n + 1, usage(sid, 12)) for n, sid in enumerate(shares)]
    for sequence, event in events:
        old.apply_usage(event, sequence)

    new = partition(Recorder(), now)
    await rebuild(new, items(journal.entries), items(events), 16)
    for owner in (old, new):
        team = owner.admission.limiter._keys[f"team:{TEAM}"]
        assert team.open_reservations == 0
        assert team.requests.total == 2
        assert team.input.total == 24 and team.output.total == 0


class Snapshots:
    def __init__(self) -> None:
        self.saved: list[int] = []
        self.data: dict[int, bytes] = {}

    async def load(self, partition: int) -> bytes | None:
        return self.data.get(partition)

    async def save(self, partition: int, data: bytes) -> None:
        self.saved.append(partition)
        self.data[partition] = data


async def test_only_changed_or_old_snapshots_are_written() -> None:
    """An owner writes a partition's snapshot when its state changed since the last one,
    or when the last one is ``max_age`` old (to move its usage mark); an idle partition
    costs no write every interval. What is written rebuilds the state."""
    now, mono = [T0], [100.0]
    snapshots = Snapshots()
    replica = Replica(
        config=LimiterConfig(),
        prices=cast(Any, None),
        batch_share=1.0,
        metrics=LimiterMetrics(),
        clock=lambda: now[0],
        ownership=cast(Any, None),
        snapshots=snapshots,
        journal=cast(Any, None),
        usage=cast(Any, None),
        partitions=16,
        monotonic=lambda: mono[0],
    )
    busy, idle = partition(Recorder(), now), partition(Recorder(), now)
    idle.number = (P + 1) % 16
    replica.served = {P: busy, idle.number: idle}

    assert await replica.save_snapshots(max_age=10) == 2  # never written: both
    mono[0] += 2
    assert await replica.save_snapshots(max_age=10) == 0  # nothing changed
    granted = await busy.reserve(ask(1))
    assert granted.allowed
    mono[0] += 2
    assert await replica.save_snapshots(max_age=10) == 1  # the busy one only
    assert snapshots.saved == [P, idle.number, P]
    busy.apply_usage(usage(granted.reservation_id, 7), sequence=5)
    mono[0] += 2
    assert await replica.save_snapshots(max_age=10) == 1  # usage applied: changed
    mono[0] += 9
    assert await replica.save_snapshots(max_age=10) == 1  # the idle one, 15 s old
    assert snapshots.saved[-1] == idle.number

    rebuilt = partition(Recorder(), now)
    rebuilt.restore(snapshots.data[P])
    assert rebuilt.journal_mark == busy.journal_mark and rebuilt.usage_mark == 5
