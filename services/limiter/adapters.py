"""The limiter's outside world: its snapshot, one key of the snapshots KV bucket."""

from __future__ import annotations

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from sluice.bus import Bus
from sluice.topology import Buckets


class KvSnapshotStore:
    """``SnapshotStore`` on ``Buckets.LIMITER_SNAPSHOTS``, under this instance's key."""

    def __init__(self, kv: KeyValue, key: str) -> None:
        self._kv = kv
        self._key = key

    @classmethod
    async def open(cls, bus: Bus, key: str) -> KvSnapshotStore:
        return cls(await bus.kv(Buckets.LIMITER_SNAPSHOTS), key)

    async def load(self) -> bytes | None:
        try:
            entry = await self._kv.get(self._key)
        except KeyNotFoundError:
            return None
        return entry.value or None

    async def save(self, data: bytes) -> None:
        await self._kv.put(self._key, data)
