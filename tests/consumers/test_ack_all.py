"""What JetStream does with term and nak under the AckAll policy, on the real server.
``sluice.consumers`` settles a batch by these findings (see its module docstring); each
test here keeps one of them checked against the server the project ships."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from nats.js.api import AckPolicy, ConsumerInfo
from sluice.bus import consumer_config
from sluice.cost.v1 import cost_pb2

from tests.consumers.conftest import ScratchStream


async def ack_all_subscription(stream: ScratchStream, ack_wait: float = 5.0):
    spec = stream.consumer(ack_policy="all", ack_wait_seconds=ack_wait)
    config = consumer_config(spec)
    assert config.ack_policy is AckPolicy.ALL
    await stream.bus.js.add_consumer(stream.name, config)
    return await stream.bus.js.pull_subscribe_bind(durable=spec.durable, stream=stream.name)


def floor(info: ConsumerInfo) -> int:
    assert info.ack_floor is not None
    return int(info.ack_floor.stream_seq or 0)


def request_ids(msgs) -> list[str]:
    return [cost_pb2.UsageEvent.FromString(m.data).request_id for m in msgs]


async def test_an_ack_settles_every_earlier_message(stream: ScratchStream) -> None:
    await stream.publish([str(i) for i in range(5)])
    sub = await ack_all_subscription(stream)
    msgs = await sub.fetch(5, timeout=2)
    await msgs[-1].ack_sync()
    info = await stream.info()
    assert floor(info) == 5
    assert info.num_ack_pending == 0


async def test_a_term_settles_only_its_message_and_is_not_redelivered(
    stream: ScratchStream,
) -> None:
    await stream.publish([str(i) for i in range(5)])
    sub = await ack_all_subscription(stream, ack_wait=1.0)
    msgs = await sub.fetch(5, timeout=2)
    await msgs[2].term()
    await msgs[1].ack_sync()
    info = await stream.info()
    # The ack of 2 settles 1 and 2; 3 was settled by its term; 4 and 5 are still open.
    assert floor(info) == 3
    assert info.num_ack_pending == 2
    # After ack_wait the unacked ones after the floor come back; the terminated one not.
    await asyncio.sleep(1.2)
    again = await sub.fetch(5, timeout=2)
    assert [m.metadata.sequence.stream for m in again] == [4, 5]


async def test_a_later_ack_overrides_a_delayed_nak(stream: ScratchStream) -> None:
    await stream.publish([str(i) for i in range(5)])
    sub = await ack_all_subscription(stream)
    msgs = await sub.fetch(5, timeout=2)
    await msgs[2].nak(delay=0.5)
    await msgs[4].ack_sync()
    info = await stream.info()
    assert floor(info) == 5
    assert info.num_ack_pending == 0
    await asyncio.sleep(0.8)
    try:
        redelivered = await sub.fetch(5, timeout=0.5)
    except TimeoutError:
        redelivered = []
    assert redelivered == []  # the naked message is gone


async def test_a_fetch_during_a_nak_delay_brings_new_messages_whose_ack_swallows_it(
    stream: ScratchStream,
) -> None:
    await stream.publish(["0", "1", "2"])
    sub = await ack_all_subscription(stream)
    msgs = await sub.fetch(3, timeout=2)
    await msgs[0].ack()
    for m in msgs[1:]:
        await m.nak(delay=0.5)
    await stream.publish(["3", "4"])
    newer = await sub.fetch(5, timeout=1)
    assert request_ids(newer) == ["3", "4"]
    await newer[-1].ack_sync()
    await asyncio.sleep(0.8)
    try:
        redelivered = await sub.fetch(5, timeout=0.5)
    except TimeoutError:
        redelivered = []
    assert redelivered == []


async def test_naked_messages_come_back_before_new_ones_in_the_order_naked(
    stream: ScratchStream,
) -> None:
    await stream.publish(["0", "1", "2", "3", "4"])
    sub = await ack_all_subscription(stream)
    msgs = await sub.fetch(5, timeout=2)
    await msgs[1].ack()
    for m in msgs[2:]:
        await m.nak()
    await stream.publish(["5", "6"])
    following = await sub.fetch(10, timeout=1)
    assert [m.metadata.sequence.stream for m in following] == [3, 4, 5, 6, 7]

    for m in reversed(following):
        await m.nak()
    # A nak is not acknowledged by the server: gather what comes back until all five are.
    again: list[Any] = []
    deadline = asyncio.get_running_loop().time() + 5
    while len(again) < 5 and asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(TimeoutError):
            again += await sub.fetch(10 - len(again), timeout=0.5)
    assert [m.metadata.sequence.stream for m in again] == [7, 6, 5, 4, 3]
