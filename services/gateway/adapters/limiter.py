"""The limiter service over NATS request/reply: reserve on the request path, release
and close leases off it."""

from __future__ import annotations

import asyncio
import logging

from sluice.bus import NATS_FAILURES, Bus
from sluice.common.v1 import chat_pb2
from sluice.limiter.v1 import limiter_pb2
from sluice.topology import Subjects

from services.gateway.domain.problems import unavailable

log = logging.getLogger(__name__)


class LimiterClient:
    def __init__(self, bus: Bus, timeout: float) -> None:
        self._bus = bus
        self._timeout = timeout
        self._background: set[asyncio.Task[None]] = set()

    async def reserve(self, request: limiter_pb2.ReserveRequest) -> limiter_pb2.ReserveResponse:
        try:
            return await self._bus.request(
                Subjects.LIMITER_RESERVE,
                request,
                limiter_pb2.ReserveResponse,
                timeout=self._timeout,
            )
        except NATS_FAILURES as exc:
            # Fail closed: without the limiter nobody knows what a request may spend.
            log.warning("limiter reserve failed: %s", type(exc).__name__)
            raise unavailable("The rate limiter did not answer.") from None

    def release(self, reservation_id: str, key_id: str, request_id: str) -> None:
        """Give back a reservation that will not be used, off the response path."""
        if not reservation_id:
            return
        commit = limiter_pb2.CommitRequest(
            reservation_id=reservation_id,
            key_id=key_id,
            actual=chat_pb2.Usage(),
            request_id=request_id,
        )
        self._in_background(commit, "releasing reservation")

    def close_lease(
        self, lease_id: str, key_id: str, unused_tokens: int, unused_requests: int
    ) -> None:
        """Hand back what an admission lease never admitted, off the response path."""
        commit = limiter_pb2.CommitRequest(
            reservation_id=lease_id,
            key_id=key_id,
            close_lease=True,
            unused_tokens=unused_tokens,
            unused_requests=unused_requests,
        )
        self._in_background(commit, "closing a lease")

    def _in_background(self, commit: limiter_pb2.CommitRequest, what: str) -> None:
        task = asyncio.create_task(self._commit(commit, what))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _commit(self, commit: limiter_pb2.CommitRequest, what: str) -> None:
        try:
            await self._bus.request(
                Subjects.LIMITER_COMMIT, commit, limiter_pb2.CommitResponse, timeout=self._timeout
            )
        except NATS_FAILURES as exc:
            log.warning("%s failed: %s", what, type(exc).__name__)

    async def drain(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
