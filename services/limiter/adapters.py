"""The limiter's outside world: partition snapshots (``sluice_limiter_snapshots``),
partition leases and members (``sluice_limiter_owners``), the partitions' journal
(``SLUICE_LIMITER_JOURNAL``) and the usage stream read from a position."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue
from sluice.bus import Bus
from sluice.cost.v1 import cost_pb2
from sluice.topology import Buckets, Streams, Subjects


def snapshot_key(partition: int) -> str:
    return f"p{partition}"


class KvSnapshotStore:
    """Partition snapshots on ``Buckets.LIMITER_SNAPSHOTS``, one key per partition."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, bus: Bus) -> KvSnapshotStore:
        return cls(await bus.kv(Buckets.LIMITER_SNAPSHOTS))

    async def load(self, partition: int) -> bytes | None:
        try:
            entry = await self._kv.get(snapshot_key(partition))
        except KeyNotFoundError:
            return None
        return entry.value or None

    async def save(self, partition: int, data: bytes) -> None:
        await self._kv.put(snapshot_key(partition), data)


class KvLeases:
    """``Leases`` on ``Buckets.LIMITER_OWNERS``: "p.<n>" per partition, "member.<id>"
    per live replica; the bucket's TTL lets a dead replica's entries lapse."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, bus: Bus) -> KvLeases:
        return cls(await bus.kv(Buckets.LIMITER_OWNERS))

    async def heartbeat(self, member: str) -> set[str]:
        await self._kv.put(f"member.{member}", member.encode())
        try:
            keys = [k for k in await self._kv.keys() if k.startswith("member.")]
        except NoKeysError:
            keys = []
        return {k.removeprefix("member.") for k in keys}

    async def acquire(self, partition: int, member: str) -> int | None:
        try:
            return int(await self._kv.create(f"p.{partition}", member.encode()))
        except KeyWrongLastSequenceError:
            return None

    async def renew(self, partition: int, member: str, revision: int) -> int | None:
        try:
            return int(await self._kv.update(f"p.{partition}", member.encode(), last=revision))
        except KeyWrongLastSequenceError:
            return None

    async def release(self, partition: int, revision: int) -> None:
        with contextlib.suppress(KeyWrongLastSequenceError):
            await self._kv.delete(f"p.{partition}", last=revision)

    async def leave(self, member: str) -> None:
        await self._kv.delete(f"member.{member}")


class BusJournal:
    """``Journal`` on ``SLUICE_LIMITER_JOURNAL``: a core publish the stream captures (no
    acknowledgement waited for on the request path)."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def append(self, partition: int, entry: bytes) -> None:
        await self._bus.publish(Subjects.limiter_journal(partition), entry, traced=False)

    async def read(self, partition: int, after: int, since_ms: int) -> AsyncIterator[bytes]:
        """The partition's entries numbered past ``after``, from those stored since
        ``since_ms`` (0: all the stream holds), in order."""
        start = datetime.fromtimestamp(since_ms / 1000, tz=UTC) if since_ms else None
        async with contextlib.aclosing(
            self._bus.read_stream(
                Streams.LIMITER_JOURNAL.name,
                Subjects.limiter_journal(partition),
                start_time=start,
            )
        ) as messages:
            async for msg in messages:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    if int(json.loads(msg.data)["n"]) <= after:
                        continue
                yield bytes(msg.data)


class UsageLog:
    """``SLUICE_USAGE`` read from a position: the events stored after a stream
    sequence (or since a time), with their sequences."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def last_sequence(self) -> int:
        return await self._bus.stream_last_sequence(Streams.USAGE.name)

    async def read(
        self, after: int, until: int, since_ms: int = 0
    ) -> AsyncIterator[tuple[int, cost_pb2.UsageEvent]]:
        """Events with sequences in (``after``, ``until``]; with ``after`` 0 and
        ``since_ms``, from the first stored at or after that time."""
        if until <= after:
            return
        options: dict[str, object] = {}
        if after:
            options["start_sequence"] = after + 1
        elif since_ms:
            options["start_time"] = datetime.fromtimestamp(since_ms / 1000, tz=UTC)
        async with contextlib.aclosing(
            self._bus.read_stream(Streams.USAGE.name, Subjects.USAGE_ALL, **options)  # type: ignore[arg-type]
        ) as messages:
            async for msg in messages:
                sequence = msg.metadata.sequence.stream
                if sequence > until:
                    return
                event = cost_pb2.UsageEvent()
                try:
                    event.ParseFromString(msg.data)
                except Exception:
                    continue
                yield sequence, event
                if sequence >= until:
                    return
