"""``Bus.publish_durable`` reads the stream's ack itself: the sequence of a stored
message, the same sequence for a duplicate ``Nats-Msg-Id``, and one of ``NATS_FAILURES``
when no stream takes the subject."""

from __future__ import annotations

import uuid

import pytest
from sluice.bus import NATS_FAILURES, Bus
from sluice.topology import Streams, Subjects


async def test_returns_the_stored_sequence_once_per_message_id(bus: Bus) -> None:
    key = uuid.uuid4().hex
    first = await bus.publish_durable(Subjects.stream(key), b"a", msg_id=f"{key}-a")
    again = await bus.publish_durable(Subjects.stream(key), b"a", msg_id=f"{key}-a")
    second = await bus.publish_durable(Subjects.stream(key), b"b", msg_id=f"{key}-b")
    assert first > 0 and again == first and second > first
    assert await bus.last_message(Streams.STREAMS.name, Subjects.stream(key)) == b"b"


async def test_a_subject_no_stream_takes_is_a_nats_failure(bus: Bus) -> None:
    with pytest.raises(NATS_FAILURES):
        await bus.publish_durable(
            f"nowhere.{uuid.uuid4().hex}", b"x", msg_id=uuid.uuid4().hex, timeout=0.5
        )
