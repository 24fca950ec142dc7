"""The audit trail on ``SLUICE_AUDIT``: records are core publishes the stream captures
(``sluice.v1.audit.<team>.<kind>``), sent without waiting for anything, so a request
pays no round trip for its record; queries read the stream with an ephemeral ordered
consumer filtered by team and kind, from a cursor or a start time."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

from google.protobuf.message import DecodeError
from sluice.bus import NATS_FAILURES, Bus
from sluice.tenancy.v1 import tenancy_pb2
from sluice.topology import Streams, Subjects

from services.gateway.domain.problems import unavailable
from services.gateway.domain.tenancy import audit
from services.gateway.domain.tenancy.ports import AuditPage, AuditQuery

log = logging.getLogger(__name__)

# At most this many stored records are read for one page: a narrow filter over a long
# range answers with the cursor reached, and the next page goes on from there.
SCAN_LIMIT = 5000


class NatsAuditLog:
    def __init__(self, bus: Bus, read_timeout: float = 5.0) -> None:
        self.bus = bus
        self.read_timeout = read_timeout
        # Records wait here for the one sender task: no task per request, and the
        # records of one event-loop turn leave in one write.
        self._queue: collections.deque[tuple[tenancy_pb2.AuditEvent, str]] = collections.deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sender: asyncio.Task[None] | None = None
        self.dropped = 0

    async def send(self, event: tenancy_pb2.AuditEvent, kind: str) -> None:
        """nats-py's publish appends to the connection's pending buffer and returns (it
        waits only when that buffer is full): no round trip, no ack."""
        subject = Subjects.audit(event.team_id or audit.NO_TEAM, kind)
        try:
            await self.bus.publish(subject, event.SerializeToString(), traced=False)
        except NATS_FAILURES as exc:
            self.dropped += 1
            log.warning("audit record not sent: %s", type(exc).__name__)

    def record(self, event: tenancy_pb2.AuditEvent, kind: str) -> None:
        self._queue.append((event, kind))
        self._idle.clear()
        self._wake.set()
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(
                self._send_queued(), name="gateway-audit-sender"
            )

    async def _send_queued(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                event, kind = self._queue.popleft()
                await self.send(event, kind)
            self._idle.set()

    async def drain(self) -> None:
        """Sends every record handed over so far, then stops the sender (a record made
        later starts it again)."""
        sender, self._sender = self._sender, None
        if sender is None or sender.done():
            return
        await self._idle.wait()
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        while self._queue:  # handed over while the sender was stopping
            await self.send(*self._queue.popleft())

    async def query(self, query: AuditQuery) -> AuditPage:
        kind = audit.kind_of(query.action) if query.action else "*"
        subject = Subjects.audit(query.team_id or "*", kind)
        until = int(query.until.timestamp() * 1e9) if query.until else None
        page = AuditPage()
        scanned = 0
        last_seen = 0
        try:
            reader = self.bus.read_stream(
                Streams.AUDIT.name,
                subject,
                start_sequence=query.after + 1 if query.after else 0,
                start_time=query.since if not query.after else None,
                idle_timeout=self.read_timeout,
            )
            async with contextlib.aclosing(reader) as messages:
                async for msg in messages:
                    sequence = msg.metadata.sequence.stream
                    last_seen = sequence
                    scanned += 1
                    event = tenancy_pb2.AuditEvent()
                    try:
                        event.ParseFromString(msg.data)
                    except DecodeError:
                        continue
                    if until is not None and event.at_unix_nanos > until:
                        break
                    if audit.matches(
                        event, key_id=query.key_id, action=query.action, until_nanos=until
                    ):
                        page.events.append((sequence, event))
                        if len(page.events) >= query.limit:
                            page.next_after = sequence
                            break
                    if scanned >= SCAN_LIMIT:
                        page.next_after = last_seen
                        break
        except NATS_FAILURES:
            raise unavailable("The audit stream did not answer.") from None
        return page
