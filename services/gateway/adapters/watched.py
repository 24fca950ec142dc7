"""A small in-memory cache of a KV bucket's entries that every replica keeps true: a
watch on the bucket (an ordered consumer from the next change on) drops an entry the
moment any replica writes it, so a revoked key or a changed team takes effect
everywhere within the watch's delivery time, not after a TTL. The TTL stays, as the
bound should the watch itself be down."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from sluice.bus import NATS_FAILURES, Bus
from sluice.topology import BucketSpec

log = logging.getLogger(__name__)

T = TypeVar("T")


class WatchedCache(Generic[T]):
    def __init__(
        self,
        bus: Bus,
        bucket: BucketSpec,
        *,
        ttl: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bus = bus
        self._bucket = bucket
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[T | None, float]] = {}
        # Bumped by every change seen: a read that started before a change must not
        # put what it read (perhaps the old value) back into the cache.
        self.generation = 0
        self._sub: Subscription | None = None
        self.changes_seen = 0

    async def start(self) -> None:
        prefix = self._bucket.key_subject("")

        async def on_change(msg: Msg) -> None:
            self.drop(msg.subject.removeprefix(prefix))
            self.changes_seen += 1

        self._sub = await self._bus.follow(
            self._bucket.key_subject(">"), self._bucket.stream_name, on_change, new_only=True
        )

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(*NATS_FAILURES):
                await self._sub.unsubscribe()
            self._sub = None

    def lookup(self, key: str) -> tuple[bool, T | None]:
        """(found, value); a value of None is a cached absence."""
        hit = self._entries.get(key)
        if hit is None or hit[1] <= self._clock():
            return False, None
        return True, hit[0]

    def put(self, key: str, value: T | None, generation: int) -> None:
        if generation != self.generation:
            return
        if len(self._entries) >= self._max:
            self._entries.clear()
        self._entries[key] = (value, self._clock() + self._ttl)

    def drop(self, key: str) -> None:
        self.generation += 1
        self._entries.pop(key, None)
