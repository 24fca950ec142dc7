"""Coalescing claims in the ``sluice_coalesce`` bucket: a key's atomic ``create`` elects
the leader of identical concurrent requests on every replica."""

from __future__ import annotations

import contextlib
import logging

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from sluice.bus import NATS_FAILURES

log = logging.getLogger(__name__)

# A key deleted between a failed create and the get: try again this many times.
_ATTEMPTS = 3


class KvCoalesceClaims:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def claim(self, key: str, request_id: str) -> tuple[str, int]:
        try:
            for _ in range(_ATTEMPTS):
                try:
                    return request_id, int(await self.kv.create(key, request_id.encode()))
                except KeyWrongLastSequenceError:
                    pass
                try:
                    entry = await self.kv.get(key)
                except KeyNotFoundError:
                    continue
                if entry.value:
                    return entry.value.decode(), int(entry.revision or 0)
        except NATS_FAILURES:
            # Coalescing saves money; it must never cost a request its answer.
            log.warning("coalescing store unavailable: the request runs alone")
        return request_id, 0

    async def release(self, key: str, revision: int) -> None:
        if not revision:
            return
        # A stale revision (the key expired and another leader took it) fails as a plain
        # BadRequestError, not KeyWrongLastSequenceError: every NATS failure is swallowed.
        with contextlib.suppress(*NATS_FAILURES):
            await self.kv.delete(key, last=revision)
