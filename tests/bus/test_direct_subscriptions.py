"""``Bus.subscribe_data``: a request's own subject delivered straight from the read loop
(no task, no queue per subscription), in order, and nothing after the unsubscribe; the
subscription is one nats-py knows, so a reconnect subscribes it again."""

from __future__ import annotations

import asyncio
import uuid

import nats.errors
from sluice.bus import Bus, CoalescingClient


async def test_payloads_arrive_in_order_without_a_task_and_stop_at_unsubscribe(bus: Bus) -> None:
    subject = f"sluice.test.direct.{uuid.uuid4().hex}"
    got: list[bytes] = []
    tasks_before = len(asyncio.all_tasks())
    sub = await bus.subscribe_data(subject, got.append)
    assert len(asyncio.all_tasks()) == tasks_before, "a direct subscription starts no task"
    assert sub._id in bus.nc._subs  # resubscribed by nats-py after a reconnect

    for n in range(50):
        await bus.nc.publish(subject, b"%d" % n, headers={"Nats-Msg-Id": str(n)})
    await bus.nc.flush()
    for _ in range(100):
        if len(got) == 50:
            break
        await asyncio.sleep(0.01)
    assert got == [b"%d" % n for n in range(50)]

    await Bus.unsubscribe(sub)
    await bus.nc.publish(subject, b"late")
    await bus.nc.flush()
    await asyncio.sleep(0.1)
    assert got[-1] == b"49" and sub._id not in bus.nc._subs


async def test_other_subscriptions_still_get_whole_messages(bus: Bus) -> None:
    subject = f"sluice.test.direct.{uuid.uuid4().hex}"
    direct: list[bytes] = []
    plain: asyncio.Queue[tuple[bytes, str | None]] = asyncio.Queue()

    async def on_message(msg):  # type: ignore[no-untyped-def]
        await plain.put((msg.data, (msg.headers or {}).get("k")))

    direct_sub = await bus.subscribe_data(subject, direct.append)
    plain_sub = await bus.subscribe(subject, on_message)
    await bus.nc.publish(subject, b"both", headers={"k": "v"})
    assert await asyncio.wait_for(plain.get(), 5) == (b"both", "v")
    assert direct == [b"both"]
    await Bus.unsubscribe(direct_sub)
    await Bus.unsubscribe(plain_sub)


async def _interest(bus: Bus, subject: str) -> bool:
    """Whether the server still routes the subject to a subscriber (a request with no
    subscriber is answered 'no responders' at once)."""
    try:
        await bus.nc.request(subject, b"?", timeout=0.2)
    except nats.errors.NoRespondersError:
        return False
    except nats.errors.TimeoutError:
        return True
    return True


async def test_an_unsubscribe_leaves_with_the_next_write(bus: Bus) -> None:
    subject = f"sluice.test.direct.{uuid.uuid4().hex}"
    got: list[bytes] = []
    sub = await bus.subscribe_data(subject, got.append)
    await bus.nc.flush()
    assert await _interest(bus, subject)

    await Bus.unsubscribe(sub)
    assert isinstance(bus.nc, CoalescingClient)
    assert sub._id not in bus.nc._subs and sub._id not in bus.nc.direct
    assert bus.nc._pending_data_size > 0, "the UNSUB waits for another write"
    # The next write carries it: a flush is a PING written after what is pending.
    await bus.nc.flush()
    assert not await _interest(bus, subject)
    await bus.nc.publish(subject, b"late")
    await bus.nc.flush()
    await asyncio.sleep(0.05)
    assert got == [b"?"], "only what came while subscribed (the probe above)"
    await Bus.unsubscribe(sub)  # twice: nothing more


async def test_an_unsubscribe_with_nothing_else_to_write_leaves_soon(bus: Bus) -> None:
    subject = f"sluice.test.direct.{uuid.uuid4().hex}"
    sub = await bus.subscribe_data(subject, lambda _data: None)
    await bus.nc.flush()
    await Bus.unsubscribe(sub)
    await asyncio.sleep(CoalescingClient.UNSUBSCRIBE_WRITE_WAIT_SECONDS * 4)
    assert bus.nc._pending_data_size == 0
    assert not await _interest(bus, subject)
