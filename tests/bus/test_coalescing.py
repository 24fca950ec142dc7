"""The NATS client's flusher: with turns to let pass, publishes made a turn or two apart
leave in one write; without, each turn's publishes leave on their own. Either way every
message arrives, in order, and a flush waits for its write."""

from __future__ import annotations

import asyncio
from typing import Any

from sluice.bus import Bus
from sluice.devtools.embedded import EmbeddedNats


async def _writes_for_three_turns(url: str, flush_yields: int) -> tuple[int, list[bytes]]:
    bus = await Bus.connect(url, "sluice-coalescing-test", flush_yields=flush_yields)
    received: list[bytes] = []
    done = asyncio.Event()

    async def on_message(msg: Any) -> None:
        received.append(msg.data)
        if len(received) == 3:
            done.set()

    sub = await bus.subscribe("coalesce.test", on_message)
    await bus.nc.flush()
    transport: Any = bus.nc._transport
    writes = 0
    original = transport.writelines

    def counting(data: Any) -> None:
        nonlocal writes
        writes += 1
        original(data)

    transport.writelines = counting
    try:
        # Three publishes, one per event-loop turn.
        for n in range(3):
            await bus.publish("coalesce.test", str(n).encode(), traced=False)
            await asyncio.sleep(0)
        await asyncio.wait_for(done.wait(), timeout=5)
        counted = writes
    finally:
        transport.writelines = original
        await bus.unsubscribe(sub)
        await bus.close()
    return counted, received


async def test_publishes_a_turn_apart_leave_in_one_write_when_the_flusher_waits(
    nats_server: EmbeddedNats,
) -> None:
    eager, eager_got = await _writes_for_three_turns(nats_server.url, 0)
    patient, patient_got = await _writes_for_three_turns(nats_server.url, 2)
    assert eager_got == patient_got == [b"0", b"1", b"2"]
    assert eager >= 2
    assert patient == 1


async def test_a_flush_returns_once_its_messages_are_written(nats_server: EmbeddedNats) -> None:
    bus = await Bus.connect(nats_server.url, "sluice-coalescing-flush", flush_yields=3)
    try:
        sub = await bus.nc.subscribe("coalesce.flush")
        await bus.publish("coalesce.flush", b"x", traced=False)
        await bus.nc.flush(timeout=2)
        msg = await sub.next_msg(timeout=2)
        assert msg.data == b"x"
    finally:
        await bus.close()
