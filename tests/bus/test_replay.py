"""Replaying what a stream holds on a subject (wildcards included), up to the message
that was last when the replay started. The messages go to subjects of SLUICE_STREAMS
under a fresh id, which no other reader of the session's server looks at."""

from __future__ import annotations

import contextlib
import uuid

from sluice.bus import Bus
from sluice.topology import Streams, Subjects


async def test_replays_in_order_up_to_the_last_message_at_the_start(bus: Bus) -> None:
    key = uuid.uuid4().hex
    subject = f"{Subjects.stream(key)}.*"
    for n in range(5):
        await bus.publish_durable(
            f"{Subjects.stream(key)}.{n % 2}", f"{n}".encode(), msg_id=f"{key}-{n}"
        )
    seen: list[bytes] = []
    async with contextlib.aclosing(bus.replay(Streams.STREAMS.name, subject)) as msgs:
        async for msg in msgs:
            seen.append(msg.data)
            if len(seen) == 1:
                # Stored after the replay started: left to the live consumers.
                await bus.publish_durable(
                    f"{Subjects.stream(key)}.0", b"late", msg_id=f"{key}-late"
                )
    assert seen == [b"0", b"1", b"2", b"3", b"4"]


async def test_a_subject_without_messages_replays_nothing(bus: Bus) -> None:
    subject = f"{Subjects.stream(uuid.uuid4().hex)}.*"
    assert [m async for m in bus.replay(Streams.STREAMS.name, subject)] == []
