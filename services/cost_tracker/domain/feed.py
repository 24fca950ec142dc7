"""Fan-out of cost events to live watchers (the ``WatchCostEvents`` streams).

While anyone watches, the service subscribes to every recorded cost event once and
hands each to every watcher's own bounded queue; with nobody watching it is not
subscribed, so the events it publishes are not delivered back to it (one NATS message
per request fewer on the common path). A slow watcher loses its oldest events
(counted) rather than holding up the others or the usage consumer: the live feed is a
convenience, the ledger is the record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from opentelemetry import metrics
from sluice.cost.v1 import cost_pb2

log = logging.getLogger(__name__)


class Watcher:
    """One subscriber's queue. Iterate it to receive events until the feed closes."""

    def __init__(self, feed: CostFeed, key_id: str, size: int) -> None:
        self.key_id = key_id
        self.dropped = 0
        self._feed = feed
        # None marks the end of the feed.
        self._queue: asyncio.Queue[cost_pb2.CostEvent | None] = asyncio.Queue(size)

    def offer(self, event: cost_pb2.CostEvent | None) -> bool:
        """Enqueue without waiting; drop the oldest queued event when full."""
        dropped = False
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
            dropped = True
        self._queue.put_nowait(event)
        return dropped

    async def __aiter__(self) -> AsyncIterator[cost_pb2.CostEvent]:
        while True:
            event = await self._queue.get()
            if event is None:
                return
            yield event

    def close(self) -> None:
        """Stop watching: no more events are queued for this watcher."""
        self._feed.remove(self)


class Listener(Protocol):
    """The subscription that feeds ``CostFeed.publish`` (every instance's cost events, in
    ``handlers/nats.py``): started for the first watcher, stopped after the last one
    leaves."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class CostFeed:
    def __init__(self, queue_size: int = 1024) -> None:
        self.queue_size = queue_size
        self.dropped = 0
        self._watchers: set[Watcher] = set()
        self._closed = False
        self._listener: Listener | None = None
        self.listening = False
        # Start and stop one at a time, each deciding on the watchers it finds then.
        self._switch = asyncio.Lock()
        self._stopping: set[asyncio.Task[None]] = set()
        self._dropped_counter = metrics.get_meter("sluice.cost_tracker").create_counter(
            "sluice.cost.watch.dropped",
            unit="{event}",
            description="Cost events dropped for watchers too slow to keep up",
        )

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def watch(self, key_id: str = "") -> Watcher:
        """A watcher receiving every event published from now on (for ``key_id`` only
        when given). On a closed feed it is already at its end."""
        watcher = Watcher(self, key_id, self.queue_size)
        if self._closed:
            watcher.offer(None)
        else:
            self._watchers.add(watcher)
        return watcher

    def attach(self, listener: Listener) -> None:
        """The subscription to start for the first watcher (before any watcher)."""
        self._listener = listener

    async def open(self, key_id: str = "") -> Watcher:
        """``watch``, once the subscription behind the feed is in place: the watcher
        receives every event recorded after this returns."""
        watcher = self.watch(key_id)
        try:
            await self._switch_listener()
        except BaseException:
            self.remove(watcher)
            raise
        return watcher

    def remove(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)
        if not self._watchers and self.listening:
            task = asyncio.create_task(self._switch_listener())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def _switch_listener(self) -> None:
        if self._listener is None:
            return
        async with self._switch:
            wanted = bool(self._watchers) and not self._closed
            if wanted and not self.listening:
                await self._listener.start()
                self.listening = True
            elif not wanted and self.listening:
                self.listening = False
                try:
                    await self._listener.stop()
                except Exception:
                    log.warning("cost feed subscription not stopped", exc_info=True)

    def publish(self, event: cost_pb2.CostEvent) -> None:
        """Hand ``event`` to every matching watcher; never waits."""
        for watcher in self._watchers:
            if watcher.key_id and watcher.key_id != event.key_id:
                continue
            if watcher.offer(event):
                self.dropped += 1
                self._dropped_counter.add(1)
                if watcher.dropped == 1:
                    log.warning("cost watcher too slow; dropping its oldest events")

    def close(self) -> None:
        """End every watcher's stream (shutdown); the bus closing ends the subscription."""
        self._closed = True
        for watcher in list(self._watchers):
            watcher.offer(None)
        self._watchers.clear()
