"""The limiter service over NATS request/reply: reserve on the request path, release
and close leases off it.

Each request goes to the subject of its partition (``sluice.partitions``: by team, else
key), which only the partition's owner serves; a release or a lease's close goes to the
partition its reservation id names. While a partition has no owner (a replica handing it
over, or the lease of a killed one not yet lapsed), the request finds no responder (or,
sent to an owner as it died, no answer) and is sent again, for up to ``wait_seconds``: a
takeover delays requests instead of refusing them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.errors import NoRespondersError
from sluice.bus import NATS_FAILURES, Bus
from sluice.common.v1 import chat_pb2
from sluice.leases import Unused
from sluice.limiter.v1 import limiter_pb2
from sluice.partitions import partition_of, reservation_partition
from sluice.topology import PREFIX, Subjects

from services.gateway.domain.problems import unavailable

log = logging.getLogger(__name__)


RESERVE_SPAN = f"{PREFIX}.limiter.reserve.* request"
COMMIT_SPAN = f"{PREFIX}.limiter.commit.* request"
# First pause before asking a partition without an owner again; doubles up to the last.
RETRY_PAUSES = (0.02, 0.05, 0.1, 0.2, 0.25)


class LimiterClient:
    def __init__(self, bus: Bus, timeout: float, wait_seconds: float = 5.0) -> None:
        self._bus = bus
        self._timeout = timeout
        self._wait_seconds = wait_seconds
        self._background: set[asyncio.Task[None]] = set()
        self.owner_waits = 0
        # Partitions that did not answer for a whole wait, until when not to wait again.
        self._down_until: dict[int, float] = {}

    async def reserve(self, request: limiter_pb2.ReserveRequest) -> limiter_pb2.ReserveResponse:
        partition = partition_of(request.team_id, request.key_id)
        subject = Subjects.limiter_reserve(partition)
        now = time.monotonic()
        # A partition that stayed without an answer for a whole wait is asked once per
        # request, without waiting again, until it answers: an outage of the limiter
        # costs each request one attempt, not the wait.
        down = self._down_until.get(partition, 0.0) > now
        deadline = now if down else now + self._wait_seconds
        attempt = 0
        while True:
            try:
                reply = await self._bus.request(
                    subject,
                    request,
                    limiter_pb2.ReserveResponse,
                    timeout=self._timeout,
                    span_name=RESERVE_SPAN,
                )
                self._down_until.pop(partition, None)
                return reply
            except (NoRespondersError, TimeoutError) as exc:
                # The partition is between owners (no responder), or its owner died with
                # this request in hand (no answer): ask again shortly. A slow owner that
                # did decide holds that reservation until its TTL: the safe side.
                pause = RETRY_PAUSES[min(attempt, len(RETRY_PAUSES) - 1)]
                attempt += 1
                if time.monotonic() + pause > deadline:
                    log.warning("limiter reserve on %s failed: %s", subject, type(exc).__name__)
                    self._down_until[partition] = time.monotonic() + self._wait_seconds
                    raise unavailable("The rate limiter did not answer.") from None
                self.owner_waits += 1
                await asyncio.sleep(pause)
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

    def close_lease(self, lease_id: str, key_id: str, unused: Unused) -> None:
        """Hand back what an admission lease never admitted, off the response path."""
        commit = limiter_pb2.CommitRequest(
            reservation_id=lease_id,
            key_id=key_id,
            close_lease=True,
            unused_tokens=unused.tokens,
            unused_requests=unused.requests,
            unused_input_tokens=unused.input_tokens,
            unused_output_tokens=unused.output_tokens,
        )
        self._in_background(commit, "closing a lease")

    def _in_background(self, commit: limiter_pb2.CommitRequest, what: str) -> None:
        task = asyncio.create_task(self._commit(commit, what))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _commit(self, commit: limiter_pb2.CommitRequest, what: str) -> None:
        partition = reservation_partition(commit.reservation_id)
        if partition is None:
            log.warning("%s: reservation id names no partition", what)
            return
        deadline = time.monotonic() + self._wait_seconds
        attempt = 0
        while True:
            try:
                await self._bus.request(
                    Subjects.limiter_commit(partition),
                    commit,
                    limiter_pb2.CommitResponse,
                    timeout=self._timeout,
                    span_name=COMMIT_SPAN,
                )
                return
            except NoRespondersError:
                pause = RETRY_PAUSES[min(attempt, len(RETRY_PAUSES) - 1)]
                attempt += 1
                if time.monotonic() + pause > deadline:
                    log.warning("%s failed: the partition has no owner", what)
                    return
                await asyncio.sleep(pause)
            except NATS_FAILURES as exc:
                log.warning("%s failed: %s", what, type(exc).__name__)
                return

    async def drain(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
