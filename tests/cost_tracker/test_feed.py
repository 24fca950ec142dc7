import asyncio

from sluice.cost.v1 import cost_pb2

from services.cost_tracker.domain.feed import CostFeed


def ev(key: str, n: int) -> cost_pb2.CostEvent:
    return cost_pb2.CostEvent(request_id=f"r{n}", key_id=key)


async def collect(watcher, timeout: float = 1.0) -> list[str]:
    async def run():
        return [e.request_id async for e in watcher]

    return await asyncio.wait_for(run(), timeout)


async def test_fans_out_with_key_filter():
    feed = CostFeed()
    everything, only_a = feed.watch(), feed.watch("a")
    for n, key in enumerate(["a", "b", "a"]):
        feed.publish(ev(key, n))
    feed.close()
    assert await collect(everything) == ["r0", "r1", "r2"]
    assert await collect(only_a) == ["r0", "r2"]


async def test_slow_watcher_drops_oldest_and_never_blocks():
    feed = CostFeed(queue_size=3)
    slow, fast = feed.watch(), feed.watch()
    received: list[str] = []

    async def drain_fast():
        async for e in fast:
            received.append(e.request_id)

    task = asyncio.create_task(drain_fast())
    for n in range(10):
        feed.publish(ev("k", n))  # synchronous: cannot block on the slow watcher
        await asyncio.sleep(0)
    feed.close()
    await asyncio.wait_for(task, 1)
    assert received == [f"r{n}" for n in range(10)]
    # The slow watcher keeps the newest events; the end marker itself displaced one.
    assert await collect(slow) == ["r8", "r9"]
    assert slow.dropped == 8
    assert feed.dropped == 7


async def test_closed_watcher_stops_receiving_and_closed_feed_ends_new_watchers():
    feed = CostFeed()
    w = feed.watch()
    w.close()
    assert feed.watchers == 0
    feed.publish(ev("k", 1))
    feed.close()
    assert await collect(feed.watch()) == []
