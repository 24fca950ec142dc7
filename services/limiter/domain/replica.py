"""One limiter replica: the partitions it owns, taken, rebuilt, served, snapshotted and
handed over, round by round (the rules are in ``domain.partitions``).

Usage events reach every replica in stream order (``on_usage``); each applies those of
the partitions it serves. While a partition is being rebuilt its events are not applied
live: the rebuild reads the usage stream up to the position the live feed had reached
when the rebuild began (``usage_position``), and the live feed applies what comes after.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Protocol

from sluice.cost.v1 import cost_pb2
from sluice.limiter.v1 import limiter_pb2
from sluice.partitions import id_prefix, partition_of

from services.limiter.domain.admission import Admission, Clock, LimiterMetrics, Prices
from services.limiter.domain.partitions import Journal, Ownership, Partition, rebuild
from services.limiter.domain.windows import Limiter, LimiterConfig, encode_snapshot

log = logging.getLogger(__name__)

# A journal entry can be stored a moment before the snapshot that holds it was taken:
# the rebuild reads the journal from this long before the snapshot (entries already in
# the state are skipped by number).
JOURNAL_MARGIN_MS = 5_000


class SnapshotStore(Protocol):
    async def load(self, partition: int) -> bytes | None: ...

    async def save(self, partition: int, data: bytes) -> None: ...


class JournalLog(Journal, Protocol):
    def read(self, partition: int, after: int, since_ms: int) -> AsyncIterator[bytes]: ...


class UsageSource(Protocol):
    def read(
        self, after: int, until: int, since_ms: int = 0
    ) -> AsyncIterator[tuple[int, cost_pb2.UsageEvent]]: ...


class Server(Protocol):
    """Serving one partition's subjects (the NATS handlers)."""

    async def serve(self, partition: Partition) -> None: ...

    async def unserve(self, number: int) -> None: ...


class Replica:
    def __init__(
        self,
        *,
        config: LimiterConfig,
        prices: Prices,
        batch_share: float,
        metrics: LimiterMetrics,
        clock: Clock,
        ownership: Ownership,
        snapshots: SnapshotStore,
        journal: JournalLog,
        usage: UsageSource,
        partitions: int,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.prices = prices
        self.batch_share = batch_share
        self.metrics = metrics
        self.clock = clock
        self.ownership = ownership
        self.snapshots = snapshots
        self.journal = journal
        self.usage = usage
        self.partitions = partitions
        self.monotonic = monotonic
        self.server: Server | None = None
        # Served partitions, and those being rebuilt (their live usage is not applied).
        self.served: dict[int, Partition] = {}
        # Live usage of a partition being rebuilt, applied once the rebuild is done.
        self._rebuilding: dict[int, list[tuple[int, cost_pb2.UsageEvent]]] = {}
        self._taking: dict[int, asyncio.Task[None]] = {}
        # The last usage event the live feed delivered (its stream sequence).
        self.usage_position = 0
        self.rebuilds = 0

    # --- usage --------------------------------------------------------------------------

    def serves(self, event: cost_pb2.UsageEvent) -> bool:
        """Whether the event's partition is served here."""
        return partition_of(event.team_id, event.key_id, self.partitions) in self.served

    def on_usage(self, sequence: int, event: cost_pb2.UsageEvent) -> None:
        self.usage_position = max(self.usage_position, sequence)
        number = partition_of(event.team_id, event.key_id, self.partitions)
        partition = self.served.get(number)
        if partition is not None:
            partition.apply_usage(event, sequence)
        elif number in self._rebuilding:
            self._rebuilding[number].append((sequence, event))

    # --- rounds -------------------------------------------------------------------------

    async def round(self) -> None:
        """Renew, then act on what the round decided: stop serving what was lost, hand
        over what another member is preferred for, take and rebuild the rest."""
        plan = await self.ownership.round(self.monotonic())
        for number in plan.lost:
            log.warning("limiter partition %d lost (lease not renewed)", number)
            task = self._taking.pop(number, None)
            if task is not None:
                task.cancel()
            self._rebuilding.pop(number, None)
            await self._stop_serving(number)
        for number in plan.hand_over:
            if number not in self._taking:  # a rebuild in progress is handed over later
                await self.hand_over(number)
        # Rebuilds run beside the rounds, so that leases held are renewed meanwhile.
        for number in plan.take:
            task = asyncio.create_task(self._take(number), name=f"limiter-take-{number}")
            self._taking[number] = task

    async def settled(self) -> None:
        """Wait for the rebuilds in progress."""
        while self._taking:
            await asyncio.gather(*self._taking.values(), return_exceptions=True)

    async def _take(self, number: int) -> None:
        try:
            await self.take(number)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("rebuilding partition %d failed; handing it back", number)
            self._rebuilding.pop(number, None)
            await self.ownership.release(number)
        finally:
            self._taking.pop(number, None)

    async def take(self, number: int) -> Partition:
        """Rebuild a partition whose lease this replica now holds, then serve it."""
        started = self.monotonic()
        partition = Partition(number, self._admission(number), self.journal)
        self._rebuilding[number] = []
        until = self.usage_position
        taken_ms = partition.restore(await self.snapshots.load(number))
        since = max(0, taken_ms - JOURNAL_MARGIN_MS) if taken_ms else 0
        after = partition.usage_mark
        entries, events = await rebuild(
            partition,
            self.journal.read(number, partition.journal_mark, since),
            self.usage.read(after, until, 0 if after else self._month_start_ms()),
            self.partitions,
        )
        partition.usage_mark = max(partition.usage_mark, until)
        for sequence, event in self._rebuilding.pop(number, []):
            partition.apply_usage(event, sequence)
        self.served[number] = partition
        if self.server is not None:
            await self.server.serve(partition)
        partition.serving = True
        self.rebuilds += 1
        log.info(
            "limiter partition %d taken in %.0f ms: %d journal entries, %d usage events, "
            "%d open reservations",
            number,
            (self.monotonic() - started) * 1000,
            entries,
            events,
            partition.admission.limiter.open_reservations,
        )
        return partition

    async def hand_over(self, number: int) -> None:
        """Stop serving, write the final snapshot, then free the lease for its
        preferred owner."""
        partition = self.served.get(number)
        if partition is not None:
            partition.usage_mark = max(partition.usage_mark, self.usage_position)
        await self._stop_serving(number)
        if partition is not None:
            try:
                data = await asyncio.to_thread(encode_snapshot, partition.copy())
                await self.snapshots.save(number, data)
            except Exception:
                log.warning("final snapshot of partition %d failed", number, exc_info=True)
        await self.ownership.release(number)

    async def _stop_serving(self, number: int) -> None:
        partition = self.served.pop(number, None)
        if partition is not None:
            partition.serving = False
            if self.server is not None:
                await self.server.unserve(number)

    async def save_snapshots(self, max_age: float = 0.0) -> int:
        """The snapshot of every served partition that changed since its last one, or
        whose last one is ``max_age`` seconds old (it moves the partition's usage mark,
        so a takeover reads at most that much of the usage stream); the state and its
        marks copied on the event loop, encoded off it. Returns how many were written.
        An unchanged partition is not written every interval: 16 partitions' puts every
        2 s were most of an idle limiter's wake-ups, and of NATS's."""
        written = 0
        now = self.monotonic()
        for number, partition in list(self.served.items()):
            if partition.changes == partition.saved_changes and now - partition.saved_at < max_age:
                continue
            # Everything the live feed delivered for this partition is applied.
            partition.usage_mark = max(partition.usage_mark, self.usage_position)
            changes = partition.changes
            copy = partition.copy()
            try:
                await self.snapshots.save(number, await asyncio.to_thread(encode_snapshot, copy))
            except Exception:
                log.warning("snapshot of partition %d failed", number, exc_info=True)
                continue
            partition.saved_changes, partition.saved_at = changes, now
            written += 1
        return written

    async def stop(self) -> None:
        """Graceful stop: hand every partition over (final snapshots), leave."""
        for task in list(self._taking.values()):
            task.cancel()
        await asyncio.gather(*self._taking.values(), return_exceptions=True)
        for number in list(self.served):
            await self.hand_over(number)
        await self.ownership.leave()

    # --- helpers ------------------------------------------------------------------------

    def _admission(self, number: int) -> Admission:
        limiter = Limiter(self.config, id_prefix=id_prefix(number))
        return Admission(
            limiter, self.metrics, self.clock, prices=self.prices, batch_share=self.batch_share
        )

    def _month_start_ms(self) -> int:
        """With no snapshot, usage is read from the start of this month (UTC): what the
        month's budgets need; windows need only the last minute of it."""
        now = datetime.fromtimestamp(self.clock() / 1000, tz=UTC)
        return int(datetime(now.year, now.month, 1, tzinfo=UTC).timestamp() * 1000)

    @property
    def open_reservations(self) -> int:
        return sum(p.admission.limiter.open_reservations for p in self.served.values())

    def quota(self, request: limiter_pb2.GetQuotaRequest) -> limiter_pb2.GetQuotaResponse:
        """A key's quota state, from the served partition that tracks it (GetQuota
        knows only the key); a key no partition here tracks reads as unused."""
        for partition in self.served.values():
            if partition.admission.limiter.tracks(request.key_id):
                return partition.admission.quota(request)
        return self._admission(0).quota(request)
