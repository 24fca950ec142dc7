"""The audit trail on ``SLUICE_AUDIT``: records are core publishes the stream captures
(``sluice.v1.audit.<team>.<kind>``), sent without waiting for anything, so a request
pays no round trip for its record. Request records leave in batches: one message per
team every ``batch_seconds`` (``AuditBatch``, with the header ``Sluice-Audit-Batch``);
an admin action is one message. Queries read the stream with an ephemeral ordered
consumer filtered by team and kind, from a cursor or a start time.

A record's cursor is its message's stream sequence times ``CURSOR_SPAN`` plus its place
in the message, so that a page can end inside a batch and the next one go on from there."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from sluice.bus import NATS_FAILURES, Bus
from sluice.tenancy.v1 import tenancy_pb2
from sluice.topology import Streams, Subjects

from services.gateway.domain.problems import unavailable
from services.gateway.domain.tenancy import audit
from services.gateway.domain.tenancy.ports import AuditPage, AuditQuery

log = logging.getLogger(__name__)

# At most this many stored messages are read for one page: a narrow filter over a long
# range answers with the cursor reached, and the next page goes on from there.
SCAN_LIMIT = 5000
BATCH_HEADER = "Sluice-Audit-Batch"
# At most this many records in one message, and the cursor's room for them.
MAX_BATCH = 512
CURSOR_SPAN = 1024


def records_of(msg: Msg) -> list[tenancy_pb2.AuditEvent]:
    """The records one stored message holds (none when it cannot be read)."""
    try:
        if msg.headers and BATCH_HEADER in msg.headers:
            batch = tenancy_pb2.AuditBatch()
            batch.ParseFromString(msg.data)
            return list(batch.events)
        event = tenancy_pb2.AuditEvent()
        event.ParseFromString(msg.data)
    except DecodeError:
        return []
    return [event]


class NatsAuditLog:
    def __init__(self, bus: Bus, read_timeout: float = 5.0, batch_seconds: float = 0.05) -> None:
        self.bus = bus
        self.read_timeout = read_timeout
        self.batch_seconds = batch_seconds
        # Request records wait here for the one sender task: no task per request, and
        # the records of a batch window leave in one message per team.
        self._queue: collections.deque[tenancy_pb2.AuditEvent] = collections.deque()
        self._admin_sends: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sender: asyncio.Task[None] | None = None
        self.dropped = 0
        self.messages = 0

    async def _publish(
        self, subject: str, data: bytes, records: int, headers: dict[str, str] | None = None
    ) -> None:
        """nats-py's publish appends to the connection's pending buffer and returns (it
        waits only when that buffer is full): no round trip, no ack."""
        try:
            await self.bus.publish(subject, data, headers=headers, traced=False)
            self.messages += 1
        except NATS_FAILURES as exc:
            self.dropped += records
            log.warning("%d audit records not sent: %s", records, type(exc).__name__)

    async def send(self, event: tenancy_pb2.AuditEvent, kind: str) -> None:
        """One record in a message of its own, now."""
        subject = Subjects.audit(event.team_id or audit.NO_TEAM, kind)
        await self._publish(subject, event.SerializeToString(), 1)

    def record(self, event: tenancy_pb2.AuditEvent, kind: str) -> None:
        loop = asyncio.get_running_loop()
        if kind != audit.REQUEST:
            # An admin action is rare and read back at once: its own message, now.
            task = loop.create_task(self.send(event, kind), name="gateway-audit-admin")
            self._admin_sends.add(task)
            task.add_done_callback(self._admin_sends.discard)
            return
        self._queue.append(event)
        self._idle.clear()
        self._wake.set()
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_queued(), name="gateway-audit-sender")

    async def _send_queued(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.batch_seconds > 0:
                # The window a batch gathers in: a record waits at most this long.
                await asyncio.sleep(self.batch_seconds)
            await self._flush()
            if not self._queue:
                self._idle.set()

    async def _flush(self) -> None:
        batches: dict[str, tenancy_pb2.AuditBatch] = {}
        while self._queue:
            event = self._queue.popleft()
            subject = Subjects.audit(event.team_id or audit.NO_TEAM, audit.REQUEST)
            batch = batches.get(subject)
            if batch is None:
                batch = batches[subject] = tenancy_pb2.AuditBatch()
            batch.events.append(event)
            if len(batch.events) >= MAX_BATCH:
                await self._send_batch(subject, batches.pop(subject))
        for subject, batch in batches.items():
            await self._send_batch(subject, batch)

    async def _send_batch(self, subject: str, batch: tenancy_pb2.AuditBatch) -> None:
        size = len(batch.events)
        await self._publish(
            subject, batch.SerializeToString(), size, headers={BATCH_HEADER: str(size)}
        )

    async def drain(self) -> None:
        """Sends every record handed over so far, then stops the sender (a record made
        later starts it again)."""
        if self._admin_sends:
            await asyncio.gather(*self._admin_sends)
        sender, self._sender = self._sender, None
        if sender is None or sender.done():
            return
        await self._idle.wait()
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        await self._flush()  # handed over while the sender was stopping

    async def query(self, query: AuditQuery) -> AuditPage:
        kind = audit.kind_of(query.action) if query.action else "*"
        subject = Subjects.audit(query.team_id or "*", kind)
        until = int(query.until.timestamp() * 1e9) if query.until else None
        # The message the cursor is in, and the last place in it already read.
        start, seen_in_start = divmod(query.after, CURSOR_SPAN) if query.after else (0, -1)
        page = AuditPage()
        scanned = 0
        last_seen = 0
        try:
            reader = self.bus.read_stream(
                Streams.AUDIT.name,
                subject,
                start_sequence=start,
                start_time=query.since if not query.after else None,
                idle_timeout=self.read_timeout,
            )
            async with contextlib.aclosing(reader) as messages:
                async for msg in messages:
                    sequence = msg.metadata.sequence.stream
                    scanned += 1
                    done = False
                    for place, event in enumerate(records_of(msg)):
                        if sequence == start and place <= seen_in_start:
                            continue
                        cursor = sequence * CURSOR_SPAN + place
                        last_seen = cursor
                        if until is not None and event.at_unix_nanos > until:
                            done = True
                            break
                        if audit.matches(
                            event, key_id=query.key_id, action=query.action, until_nanos=until
                        ):
                            page.events.append((cursor, event))
                            if len(page.events) >= query.limit:
                                page.next_after = cursor
                                done = True
                                break
                    if done:
                        break
                    if scanned >= SCAN_LIMIT:
                        page.next_after = last_seen
                        break
        except NATS_FAILURES:
            raise unavailable("The audit stream did not answer.") from None
        return page
