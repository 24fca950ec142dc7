"""The audit trail's request records leave in batches (one message per team and flush)
and read back one by one: paged through the middle of a batch without a record lost or
shown twice, beside admin actions (a message each, at once) and records stored one per
message by earlier versions. On a real NATS with the real stream."""

from __future__ import annotations

import asyncio
import secrets
import time

from sluice.bus import Bus
from sluice.tenancy.v1 import tenancy_pb2
from sluice.topology import Streams, Subjects

from services.gateway.adapters.audit import CURSOR_SPAN, NatsAuditLog
from services.gateway.domain.tenancy import audit
from services.gateway.domain.tenancy.ports import AuditQuery


def request_record(team: str, n: int) -> tenancy_pb2.AuditEvent:
    return tenancy_pb2.AuditEvent(
        event_id=f"aud_{team}_{n}",
        at_unix_nanos=time.time_ns(),
        actor="k1",
        team_id=team,
        action=audit.REQUEST,
        target=f"req_{n}",
        status=200,
    )


async def stored_messages(bus: Bus, subject: str) -> int:
    count = 0
    async for _ in bus.read_stream(Streams.AUDIT.name, subject, idle_timeout=2):
        count += 1
    return count


async def stored(log: NatsAuditLog, bus: Bus) -> None:
    """Drained, and every message sent is in the stream (core publishes the stream
    captures on the server's side)."""
    await log.drain()
    await bus.nc.flush()
    await asyncio.sleep(0.1)


async def test_a_batch_pages_record_by_record(bus: Bus) -> None:
    team, other = "t" + secrets.token_hex(4), "t" + secrets.token_hex(4)
    log = NatsAuditLog(bus, batch_seconds=0.05)
    for n in range(7):
        log.record(request_record(team, n), audit.REQUEST)
    log.record(request_record(other, 99), audit.REQUEST)
    log.record(
        audit.admin_event(
            actor="admin", team_id=team, action="key.create", target="k2", trace_id="", details={}
        ),
        audit.ADMIN,
    )
    await stored(log, bus)

    # Seven records of one team in one message; the other team's in its own.
    assert await stored_messages(bus, Subjects.audit(team, audit.REQUEST)) == 1
    assert await stored_messages(bus, Subjects.audit(team, audit.ADMIN)) == 1
    assert log.messages == 3 and log.dropped == 0

    seen: list[str] = []
    cursors: list[int] = []
    after = 0
    while True:
        page = await log.query(AuditQuery(team_id=team, action=audit.REQUEST, limit=3, after=after))
        seen += [event.target for _, event in page.events]
        cursors += [cursor for cursor, _ in page.events]
        if not page.next_after:
            break
        after = page.next_after
    assert seen == [f"req_{n}" for n in range(7)]
    assert cursors == sorted(set(cursors))
    assert len({cursor // CURSOR_SPAN for cursor in cursors}) == 1

    everything = await log.query(AuditQuery(team_id=team, limit=50))
    assert (
        sorted(event.action for _, event in everything.events)
        == ["key.create"] + [audit.REQUEST] * 7
    )


async def test_records_stored_one_per_message_still_read(bus: Bus) -> None:
    team = "t" + secrets.token_hex(4)
    for n in range(2):
        # As versions before batches sent them: one AuditEvent, no header.
        await bus.publish(
            Subjects.audit(team, audit.REQUEST),
            request_record(team, n).SerializeToString(),
            traced=False,
        )
    log = NatsAuditLog(bus, batch_seconds=0.05)
    log.record(request_record(team, 2), audit.REQUEST)
    await stored(log, bus)
    first = await log.query(AuditQuery(team_id=team, limit=2))
    rest = await log.query(AuditQuery(team_id=team, limit=2, after=first.next_after))
    assert [e.target for _, e in first.events + rest.events] == ["req_0", "req_1", "req_2"]
