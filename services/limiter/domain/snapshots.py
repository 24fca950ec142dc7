"""The limiter's state across restarts: restored before it serves, written every few
seconds and once more at a graceful stop.

A crash (not a SIGTERM) forgets the spend since the last write, at most one interval.
Encoding and decoding run on a thread: a snapshot of many keys takes milliseconds, which
the event loop spends answering reserves instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from services.limiter.domain.admission import Clock
from services.limiter.domain.windows import Limiter, decode_snapshot, encode_snapshot

log = logging.getLogger(__name__)


class SnapshotStore(Protocol):
    """Where this instance's snapshot is kept (a KV key in the service)."""

    async def load(self) -> bytes | None:
        """The last snapshot written; None when there is none."""

    async def save(self, data: bytes) -> None: ...


class Snapshots:
    def __init__(
        self, limiter: Limiter, store: SnapshotStore, clock: Clock, *, interval_seconds: float
    ) -> None:
        self.limiter = limiter
        self.store = store
        self.clock = clock
        self.interval_seconds = interval_seconds
        self.written = 0

    async def restore(self) -> None:
        """Load the last snapshot into the limiter; an absent or unreadable one leaves
        the windows empty (and says so)."""
        data = await self.store.load()
        if not data:
            log.info("no limiter snapshot; starting with empty windows")
            return
        try:
            snapshot = await asyncio.to_thread(decode_snapshot, data)
        except (ValueError, KeyError, TypeError):
            log.exception("limiter snapshot unreadable; starting with empty windows")
            return
        self.limiter.restore(snapshot, self.clock())
        log.info(
            "limiter restored: %d keys, %d open reservations",
            self.limiter.tracked_keys,
            self.limiter.open_reservations,
        )

    async def save(self) -> None:
        """Expire what is due, then write the state."""
        now = self.clock()
        self.limiter.expire(now)
        data = await asyncio.to_thread(encode_snapshot, self.limiter.snapshot(now))
        await self.store.save(data)
        self.written += 1

    async def run(self, stopping: asyncio.Event) -> None:
        """Save every ``interval_seconds`` until ``stopping`` is set; a failed save is
        tried again at the next interval."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=self.interval_seconds)
            if stopping.is_set():
                return
            try:
                await self.save()
            except Exception:
                log.warning("limiter snapshot failed; will retry", exc_info=True)
