"""A request's stream events as they arrive: a mailbox whose reader waits with a timeout,
cheaper than a queue with ``wait_for`` (a task and a timer handle per message) on the
token hot path."""

from __future__ import annotations

import asyncio
from collections import deque


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Inbox:
    """``LiveEvents`` fed by ``put``. Whatever feeds it (a NATS subscription) ends the
    feed in ``close``; a bare inbox has nothing to end."""

    def __init__(self) -> None:
        self._items: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, data: bytes) -> None:
        self._items.append(data)
        if self._waiter is not None:
            _wake(self._waiter)

    def ready(self) -> bool:
        return bool(self._items)

    async def get(self, wait_seconds: float) -> bytes | None:
        """The next event, or None after ``wait_seconds`` without one."""
        if not self._items:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiter = waiter
            handle = loop.call_later(max(0.0, wait_seconds), _wake, waiter)
            try:
                await waiter
            finally:
                handle.cancel()
                self._waiter = None
            if not self._items:
                return None
        return self._items.popleft()

    async def close(self) -> None:
        return None
