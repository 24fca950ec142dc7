"""A consumer process that handles two messages and hangs in the third until it is
killed: ``python -m tests.consumers.crashing_consumer <nats url> <stream> <filter>
<ack policy> <marker file>``. The marker is written once the third message is in hand."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from sluice.bus import Bus
from sluice.consumers import ConsumerBroker, Delivery, DurableConsumer
from sluice.cost.v1 import cost_pb2
from sluice.topology import ConsumerSpec

HANDLED_BEFORE_HANG = 2


async def main(url: str, stream: str, filter_subject: str, ack_policy: str, marker: Path) -> None:
    bus = await Bus.connect(url, "crashing-consumer")
    spec = ConsumerSpec(
        stream=stream,
        durable="c",
        filter_subject=filter_subject,
        ack_wait_seconds=1.0,
        max_deliver=-1,
        ack_policy=ack_policy,
    )
    handled = 0

    async def handle(event: cost_pb2.UsageEvent, delivery: Delivery) -> None:
        nonlocal handled
        handled += 1
        if handled > HANDLED_BEFORE_HANG:
            marker.write_text(event.request_id)
            await asyncio.Event().wait()

    consumer = DurableConsumer(
        ConsumerBroker(bus), spec, cost_pb2.UsageEvent, handle, batch=16, window=0.5
    )
    await consumer.start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    url, stream, filter_subject, ack_policy, marker = sys.argv[1:6]
    asyncio.run(main(url, stream, filter_subject, ack_policy, Path(marker)))
