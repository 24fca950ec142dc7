"""Closing a connection: pull subscriptions must not hold a graceful stop hostage."""

from __future__ import annotations

import asyncio
import contextlib
import time

from nats.js.api import StreamConfig
from sluice.bus import Bus
from sluice.devtools.embedded import EmbeddedNats


async def test_close_is_prompt_after_a_pull_fetch_timed_out(nats_server: EmbeddedNats) -> None:
    # An idle consumer's fetches time out; the server's late "request timeout" status
    # messages are then taken off the queue by the next fetch without being marked done.
    # Draining such a subscription used to wait out the whole 10 s drain timeout.
    bus = await Bus.connect(nats_server.url, "close-test")
    try:
        await bus.js.add_stream(StreamConfig(name="CLOSE_TEST", subjects=["close-test.>"]))
        sub = await bus.js.pull_subscribe("close-test.x", durable="idle", stream="CLOSE_TEST")
        for _ in range(3):
            with contextlib.suppress(TimeoutError):
                await sub.fetch(batch=4, timeout=0.2)
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await asyncio.wait_for(bus.close(), timeout=8)
        # A healthy close takes milliseconds; the hang was the 10 s drain timeout.
        assert time.monotonic() - started < 5
        assert bus.nc.is_closed
    finally:
        if not bus.nc.is_closed:
            await bus.nc.close()
        cleanup = await Bus.connect(nats_server.url, "close-test-cleanup")
        await cleanup.js.delete_stream("CLOSE_TEST")
        await cleanup.close()
