"""Readiness: every service asked over NATS whether it is ready (the data path itself,
not a side channel); answers are reused for a short while."""

from __future__ import annotations

import asyncio
import time

from sluice.bus import NATS_FAILURES, Bus
from sluice.common.v1 import chat_pb2
from sluice.topology import ALL_SERVICES, Subjects


class Readiness:
    def __init__(self, bus: Bus, cache_seconds: float, timeout: float = 0.5) -> None:
        self._bus = bus
        self._cache_seconds = cache_seconds
        self._timeout = timeout
        self._checked_at = -1e9
        self._last: dict[str, bool] = {}
        self._lock = asyncio.Lock()

    async def _ask(self, service: str) -> bool:
        try:
            reply = await self._bus.request_raw(
                Subjects.health(service), b"", timeout=self._timeout
            )
        except NATS_FAILURES:
            return False
        status = chat_pb2.ServiceStatus()
        status.ParseFromString(reply)
        return status.ready

    async def check(self) -> dict[str, bool]:
        async with self._lock:
            now = time.monotonic()
            if now - self._checked_at < self._cache_seconds:
                return self._last
            if not self._bus.connected:
                result = {str(s): False for s in ALL_SERVICES}
            else:
                answers = await asyncio.gather(*(self._ask(str(s)) for s in ALL_SERVICES))
                result = {str(s): ok for s, ok in zip(ALL_SERVICES, answers, strict=True)}
            self._last = result
            self._checked_at = time.monotonic()
            return result
