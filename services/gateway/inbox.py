"""A per-request mailbox for stream events, cheaper than ``Subscription.next_msg`` (which
spawns a task and a ``wait_for`` per message) on the token hot path."""

from __future__ import annotations

import asyncio
from collections import deque

from nats.aio.msg import Msg


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Inbox:
    def __init__(self) -> None:
        self._items: deque[Msg] = deque()
        self._waiter: asyncio.Future[None] | None = None

    async def push(self, msg: Msg) -> None:
        self._items.append(msg)
        if self._waiter is not None:
            _wake(self._waiter)

    def ready(self) -> bool:
        return bool(self._items)

    async def get(self, wait_seconds: float) -> Msg | None:
        """The next message, or None after ``wait_seconds`` without one."""
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
