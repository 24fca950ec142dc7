"""The cache service's lookup over NATS request/reply."""

from __future__ import annotations

import logging
import time

from sluice.bus import NATS_FAILURES, Bus
from sluice.cache.v1 import cache_pb2
from sluice.topology import Subjects

from services.gateway.domain.ports import CacheResult

log = logging.getLogger(__name__)


class CacheClient:
    def __init__(self, bus: Bus, timeout: float) -> None:
        self._bus = bus
        self._timeout = timeout

    async def lookup(
        self, cache_key: str, request_id: str, semantic_text: str = "", semantic_scope: str = ""
    ) -> CacheResult:
        started = time.perf_counter()
        try:
            reply = await self._bus.request(
                Subjects.CACHE_LOOKUP,
                cache_pb2.LookupRequest(
                    cache_key=cache_key,
                    request_id=request_id,
                    semantic_text=semantic_text,
                    semantic_scope=semantic_scope,
                ),
                cache_pb2.LookupResponse,
                timeout=self._timeout,
            )
        except NATS_FAILURES as exc:
            log.warning("cache lookup failed: %s", type(exc).__name__)
            return CacheResult("error", None, (time.perf_counter() - started) * 1000)
        elapsed = (time.perf_counter() - started) * 1000
        if reply.hit and reply.HasField("answer"):
            if reply.semantic:
                return CacheResult("semantic-hit", reply.answer, elapsed, reply.similarity)
            return CacheResult("hit", reply.answer, elapsed)
        return CacheResult("miss", None, elapsed)
