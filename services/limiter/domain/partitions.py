"""The limiter on several processes: partitions, their journal, their rebuild, and who
owns which.

**Partitions.** The state is split into ``LIMITER_PARTITIONS`` partitions by team (else
key; ``sluice.partitions``), so a key, its team and the team's end users are decided by
one owner with every level in view. Each partition is owned by one replica at a time,
which alone answers its reserve and commit subjects: a limit holds across replicas
because one process counts it, not by summing shares of it.

**Ownership** is a lease per partition in a KV bucket with a TTL: the owner creates the
key (only possible while nobody holds it) and renews it by revision every
``renew`` seconds; a replica that cannot renew for the lease time stops serving the
partition before anyone else can take it. Each replica also renews a member key. The
partition's preferred owner is the live member ranked first for it by rendezvous
hashing, so ownership is spread evenly and moves as little as possible when a member
comes or goes: a replica hands over partitions it holds for another live member
(final snapshot, then the lease is deleted) and takes the ones it is preferred for as
soon as their lease is free. A killed replica's leases lapse after the TTL and its
partitions go to the survivors.

**State across owners.** An owner writes each partition's snapshot (windows, spend,
open reservations, learned estimates) every snapshot interval, with two marks: the
number of the last journal entry it holds, and the last usage event (stream sequence)
applied. Between snapshots the journal records every change made other than by usage
(a reservation, a release, a lease closed), each entry numbered per partition. A new
owner loads the snapshot, applies the journal entries numbered past its mark, then the
usage events past its mark, and only then serves: the spend of every settled request
(usage is in ``SLUICE_USAGE`` for 90 days) and every reservation still open (in the
journal for 15 minutes, past the reservation TTL) is back. What a crash can lose is
only a journal entry published in the last moment before it (a core publish, no ack on
the request path); its request's usage, when it comes, is counted then.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sluice.cost.v1 import cost_pb2
from sluice.limiter.v1 import limiter_pb2
from sluice.partitions import partition_of

from services.limiter.domain.admission import Admission
from services.limiter.domain.windows import (
    Snapshot,
    decode_snapshot,
    encode_snapshot,
    reservation_from_record,
    reservation_record,
)

log = logging.getLogger(__name__)

JOURNAL_MARK = "journal"
USAGE_MARK = "usage"


class Journal(Protocol):
    """Where a partition's owner records its changes (a stream subject per partition)."""

    async def append(self, partition: int, entry: bytes) -> None: ...


@dataclass
class Partition:
    """One partition's state on its owner, and where it stands in its sources."""

    number: int
    admission: Admission
    journal: Journal
    # The last journal entry whose change is in the state.
    journal_mark: int = 0
    # Usage events up to this stream sequence are in the state.
    usage_mark: int = 0
    serving: bool = False
    # Changes made to the state (journal entries, usage applied), and how many of them
    # the last snapshot written holds (-1: none written yet); when it was written.
    changes: int = 0
    saved_changes: int = -1
    saved_at: float = 0.0

    # --- the request path -----------------------------------------------------------

    async def reserve(self, request: limiter_pb2.ReserveRequest) -> limiter_pb2.ReserveResponse:
        response = self.admission.reserve(request)
        if response.allowed:
            reservation = self.admission.limiter.reservation(response.reservation_id)
            if reservation is not None:
                await self._record({"op": "reserve", "r": reservation_record(reservation)})
        return response

    async def commit(self, request: limiter_pb2.CommitRequest) -> limiter_pb2.CommitResponse:
        response = self.admission.commit(request)
        if response.found:
            entry: dict[str, Any] = {"op": "close" if request.close_lease else "settle"}
            entry["id"] = request.reservation_id
            if request.close_lease:
                entry["tokens"] = request.unused_tokens
                entry["requests"] = request.unused_requests
                entry["in"] = request.unused_input_tokens
                entry["out"] = request.unused_output_tokens
            else:
                entry["in"] = request.actual.input_tokens
                entry["out"] = request.actual.output_tokens
            await self._record(entry)
        return response

    async def _record(self, entry: dict[str, Any]) -> None:
        self.changes += 1
        self.journal_mark += 1
        entry["n"] = self.journal_mark
        await self.journal.append(self.number, json.dumps(entry, separators=(",", ":")).encode())

    def apply_usage(self, event: cost_pb2.UsageEvent, sequence: int) -> None:
        """A usage event of this partition, once: events at or before the mark are in."""
        if sequence <= self.usage_mark:
            return
        self.admission.apply_usage(event, charge_unknown=True)
        self.usage_mark = sequence
        self.changes += 1

    # --- snapshots and rebuilds -----------------------------------------------------

    def copy(self) -> Snapshot:
        """The state and its marks, copied (on the event loop: integers only)."""
        limiter = self.admission.limiter
        now = self.admission.clock()
        limiter.expire(now)
        marks = {JOURNAL_MARK: self.journal_mark, USAGE_MARK: self.usage_mark}
        return limiter.snapshot(now, marks)

    def snapshot(self) -> bytes:
        """The state and its marks, encoded (zlib JSON)."""
        return encode_snapshot(self.copy())

    def restore(self, data: bytes | None) -> int:
        """Load a snapshot (absent or unreadable: empty state); returns its time (ms)."""
        if not data:
            return 0
        try:
            snapshot = decode_snapshot(data)
        except (ValueError, KeyError, TypeError, zlib.error):
            log.exception("limiter snapshot of partition %d unreadable; empty", self.number)
            return 0
        self.admission.limiter.restore(snapshot, self.admission.clock())
        self.journal_mark = snapshot.marks.get(JOURNAL_MARK, 0)
        self.usage_mark = snapshot.marks.get(USAGE_MARK, 0)
        return snapshot.taken_ms

    def apply_journal(self, raw: bytes) -> bool:
        """One journal entry of a previous owner; False when already in the state."""
        try:
            entry = json.loads(raw)
            number = int(entry["n"])
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable journal entry of partition %d skipped", self.number)
            return False
        if number <= self.journal_mark:
            return False
        self.journal_mark = number
        limiter = self.admission.limiter
        now = self.admission.clock()
        op = entry.get("op")
        if op == "reserve":
            limiter.adopt(reservation_from_record(entry["r"]), charge=True)
        elif op == "settle":
            tokens_in, tokens_out = int(entry.get("in", 0)), int(entry.get("out", 0))
            limiter.settle(
                str(entry["id"]),
                tokens_in + tokens_out,
                now,
                input_tokens=tokens_in,
                output_tokens=tokens_out,
            )
        elif op == "close":
            limiter.close_lease(
                str(entry["id"]),
                int(entry["tokens"]),
                int(entry["requests"]),
                now,
                unused_input_tokens=int(entry.get("in", 0)),
                unused_output_tokens=int(entry.get("out", 0)),
            )
        return True


async def rebuild(
    partition: Partition,
    journal: AsyncIterator[bytes],
    usage: AsyncIterator[tuple[int, cost_pb2.UsageEvent]],
    partitions: int,
) -> tuple[int, int]:
    """Over a restored snapshot: the journal entries past its mark, then this
    partition's usage events past its mark (the iterators read from there). Returns
    (journal entries, usage events) applied."""
    entries = 0
    async for raw in journal:
        entries += partition.apply_journal(raw)
    events = 0
    async for sequence, event in usage:
        if partition_of(event.team_id, event.key_id, partitions) == partition.number:
            before = partition.usage_mark
            partition.apply_usage(event, sequence)
            events += partition.usage_mark != before
        partition.usage_mark = max(partition.usage_mark, sequence)
    return entries, events


# --- ownership ---------------------------------------------------------------------------


def preferred_owner(partition: int, members: Iterable[str]) -> str:
    """Rendezvous hashing: the member ranked first for this partition."""
    return max(members, key=lambda m: (zlib.crc32(f"{m}/{partition}".encode()), m))


class Leases(Protocol):
    """The partition leases and the member list (a KV bucket with a TTL)."""

    async def heartbeat(self, member: str) -> set[str]:
        """Renew this member; returns every live member (this one included)."""
        ...

    async def acquire(self, partition: int, member: str) -> int | None:
        """Take a free partition; its lease revision, or None when someone holds it."""
        ...

    async def renew(self, partition: int, member: str, revision: int) -> int | None:
        """Renew a held lease; the new revision, or None when it was lost."""
        ...

    async def release(self, partition: int, revision: int) -> None: ...

    async def leave(self, member: str) -> None: ...


@dataclass
class Plan:
    """What one ownership round decided."""

    take: list[int] = field(default_factory=list)
    hand_over: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)


class Ownership:
    """Which partitions this replica holds, round by round (see the module doc)."""

    def __init__(self, leases: Leases, member: str, partitions: int, lease_seconds: float) -> None:
        self.leases = leases
        self.member = member
        self.partitions = partitions
        self.lease_seconds = lease_seconds
        # partition -> (lease revision, monotonic time of the last renewal)
        self.held: dict[int, tuple[int, float]] = {}
        self.members: set[str] = {member}

    async def round(self, now: float) -> Plan:
        """Renew what is held, then decide what to take and what to hand over. A lease
        that could not be renewed for ``lease_seconds`` is lost (the caller stops
        serving it at once: by then another replica may hold it)."""
        plan = Plan()
        try:
            self.members = await self.leases.heartbeat(self.member) | {self.member}
        except Exception:
            log.warning("limiter membership heartbeat failed", exc_info=True)
        for number, (revision, renewed) in list(self.held.items()):
            try:
                new = await self.leases.renew(number, self.member, revision)
            except Exception:
                log.warning("renewing partition %d failed", number, exc_info=True)
                new = revision if now - renewed < self.lease_seconds * 0.75 else None
                if new is not None:
                    continue
            if new is None:
                del self.held[number]
                plan.lost.append(number)
            else:
                self.held[number] = (new, now)
        for number in range(self.partitions):
            preferred = preferred_owner(number, self.members)
            if number in self.held:
                if preferred != self.member:
                    plan.hand_over.append(number)
            elif preferred == self.member:
                try:
                    taken = await self.leases.acquire(number, self.member)
                except Exception:
                    log.warning("taking partition %d failed", number, exc_info=True)
                    continue
                if taken is not None:
                    self.held[number] = (taken, now)
                    plan.take.append(number)
        return plan

    async def release(self, number: int) -> None:
        held = self.held.pop(number, None)
        if held is not None:
            try:
                await self.leases.release(number, held[0])
            except Exception:
                log.warning("releasing partition %d failed", number, exc_info=True)

    async def leave(self) -> None:
        for number in list(self.held):
            await self.release(number)
        try:
            await self.leases.leave(self.member)
        except Exception:
            log.warning("leaving the limiter members failed", exc_info=True)
