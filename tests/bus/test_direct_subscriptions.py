"""``Bus.subscribe_data``: a request's own subject delivered straight from the read loop
(no task, no queue per subscription), in order, and nothing after the unsubscribe; the
subscription is one nats-py knows, so a reconnect subscribes it again."""

from __future__ import annotations

import asyncio
import uuid

from sluice.bus import Bus


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
