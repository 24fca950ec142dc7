"""``EntryStore`` on the exact-cache KV bucket."""

from __future__ import annotations

import logging

from nats.js.errors import APIError, KeyDeletedError, KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue
from sluice.bus import Bus
from sluice.topology import Buckets, BucketSpec

log = logging.getLogger(__name__)


class KvEntryStore:
    def __init__(self, kv: KeyValue, bus: Bus, bucket: BucketSpec = Buckets.EXACT_CACHE) -> None:
        self._kv = kv
        self._bus = bus
        self._bucket = bucket

    @classmethod
    async def open(cls, bus: Bus, bucket: BucketSpec = Buckets.EXACT_CACHE) -> KvEntryStore:
        return cls(await bus.kv(bucket), bus, bucket)

    async def get(self, key: str) -> tuple[bytes, int] | None:
        try:
            entry = await self._kv.get(key, validate_keys=False)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if not entry.value:
            return None
        return entry.value, entry.revision or 0

    async def put(self, key: str, value: bytes) -> None:
        await self._kv.put(key, value, validate_keys=False)

    async def delete_if_unchanged(self, key: str, revision: int) -> None:
        try:
            await self._kv.delete(key, last=revision, validate_keys=False)
        except APIError as exc:
            # Wrong last sequence: a fresh answer replaced the stale one; keep it.
            log.debug("cache entry %s not deleted: %s", key, exc)

    async def remove(self, key: str) -> int:
        if await self.get(key) is None:
            return 0
        await self._kv.purge(key)
        return 1

    async def clear(self) -> int:
        removed = await self.count()
        # One stream purge drops entries and delete markers alike.
        await self._bus.purge_bucket(self._bucket)
        return removed

    async def count(self) -> int:
        try:
            return len(await self._kv.keys())
        except NoKeysError:
            return 0
