"""The usage consumer's guarantees when the cost-tracker process dies or stops in the
middle of a batch, and when its commit fails, on the real NATS server and SQLite file.

The guarantee (``domain.recording``): a message is acked only after its row is
committed, so what a crash leaves unacked comes back; a row already committed is found
again and counted a duplicate, and only rows new to the ledger publish a CostEvent.

The process tests aim their signal inside a batch by what they can see from outside:
the batch's rows in the ledger file (committed; its CostEvents and acks are still to be
sent, in the same event-loop step), or a commit held by another writer of the file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg
from sluice.bus import Bus
from sluice.cost.v1 import cost_pb2
from sluice.devtools.embedded import EmbeddedNats
from sluice.pricing import PriceTable
from sluice.topology import Consumers, ServiceName, Streams, Subjects

from services.cost_tracker.domain.usage import Pricer
from services.cost_tracker.handlers.nats import NAK_DELAY_SECONDS
from tests.consumers.conftest import AckTraffic
from tests.cost_tracker.harness import (
    REPO_CONFIG,
    eventually,
    publish_usage,
    start_tracker,
    unique,
    usage_event,
    write_prices,
)
from tests.support.stack import REPO, Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def ledger_ids(path: Path, key: str) -> set[str]:
    if not path.exists():
        return set()
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT request_id FROM ledger WHERE key_id = ?", (key,)).fetchall()
    return {r[0] for r in rows}


def ledger_total_nanos(path: Path, key: str) -> int:
    with sqlite3.connect(path) as conn:
        (total,) = conn.execute(
            "SELECT SUM(total_cost_nanos) FROM ledger WHERE key_id = ?", (key,)
        ).fetchone()
    return int(total)


def on_first_rows(path: Path, key: str, act: Callable[[], None], timeout: float = 60) -> None:
    """Call ``act`` as soon as a row of ``key`` is committed to the ledger at ``path``
    (polled every half millisecond: a batch announces and acks within tens of them)."""
    deadline = time.monotonic() + timeout
    conn: sqlite3.Connection | None = None
    try:
        while time.monotonic() < deadline:
            try:
                if conn is None and path.exists():
                    conn = sqlite3.connect(path, isolation_level=None)
                if (
                    conn is not None
                    and conn.execute(
                        "SELECT 1 FROM ledger WHERE key_id = ? LIMIT 1", (key,)
                    ).fetchone()
                ):
                    act()
                    return
            except sqlite3.OperationalError:
                pass  # the tracker is still creating the schema
            time.sleep(0.0005)
    finally:
        if conn is not None:
            conn.close()
    raise AssertionError(f"no row of {key} in {path} within {timeout}s")


async def publish_all(bus: Bus, events: list[cost_pb2.UsageEvent]) -> dict[str, int]:
    """Publish as the worker does; each request id's stream sequence."""
    return {e.request_id: (await publish_usage(bus, e)).seq for e in events}


class CostEvents:
    """The CostEvents of one key, on a connection of the test's own."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def on_msg(self, msg: Msg) -> None:
        self.seen.append(cost_pb2.CostEvent.FromString(msg.data).request_id)


async def acked_up_to(bus: Bus, durable: str) -> tuple[int, int]:
    """The durable's ack floor (a stream sequence) and its messages delivered, unacked."""
    info = await bus.js.consumer_info(Streams.USAGE.name, durable)
    assert info.ack_floor is not None
    return int(info.ack_floor.stream_seq or 0), int(info.num_ack_pending or 0)


async def test_a_tracker_killed_between_commit_and_acks_loses_and_double_counts_nothing(
    nats_server: EmbeddedNats, bus: Bus, tmp_path: Path
) -> None:
    """SIGKILL once the first batch is committed, before its acks leave: after a restart
    every request is in the ledger once, priced once, and announced at most once."""
    key, durable = unique("key"), unique("cost-crash")
    ledger, prices = tmp_path / "ledger.sqlite3", write_prices(tmp_path)
    # One batch as large as the durable lets a process hold (max_ack_pending), and more.
    batch = Consumers.COST_USAGE.max_ack_pending
    events = [usage_event(key, input_tokens=100 + i, output_tokens=i) for i in range(batch + 200)]
    seqs = await publish_all(bus, events)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "libs")])}

    def tracker() -> subprocess.Popen[bytes]:
        args = [nats_server.url, key, durable, "2", str(batch), str(ledger), str(prices)]
        return subprocess.Popen(
            [sys.executable, "-m", "tests.cost_tracker.crashing_tracker", *args],
            cwd=REPO,
            env=env,
        )

    announced = CostEvents()
    sub = await bus.nc.subscribe(Subjects.cost_recorded(key), cb=announced.on_msg)
    first = tracker()
    try:
        await asyncio.to_thread(
            on_first_rows, ledger, key, lambda: first.send_signal(signal.SIGKILL)
        )
        assert await asyncio.to_thread(first.wait, 30) == -signal.SIGKILL
        await bus.nc.flush()  # every CostEvent the dead process got out has arrived
        before_crash = list(announced.seen)
        committed = ledger_ids(ledger, key)
        floor, unacked = await acked_up_to(bus, durable)
        acked = {rid for rid, seq in seqs.items() if seq <= floor}
        assert 0 < len(committed) < len(events)
        assert acked <= committed, "a message was acked before its row was committed"
        # The kill landed where it was aimed: rows committed whose messages were not
        # acked, so they come back to a ledger that holds them.
        assert committed - acked and unacked > 0
        assert set(before_crash) <= committed

        announced.seen.clear()
        second = tracker()
        try:

            async def all_settled() -> bool:
                floor, unacked = await acked_up_to(bus, durable)
                return floor >= max(seqs.values()) and unacked == 0

            await eventually(all_settled, timeout=60)
        finally:
            second.send_signal(signal.SIGKILL)
            second.wait(10)
        await bus.nc.flush()
        after_restart = list(announced.seen)
    finally:
        await sub.unsubscribe()
        await bus.js.delete_consumer(Streams.USAGE.name, durable)

    # Every request once in the ledger, priced once.
    assert ledger_ids(ledger, key) == set(seqs)
    pricer = Pricer(PriceTable.load(prices))
    assert ledger_total_nanos(ledger, key) == sum(pricer.price(e).total_cost_nanos for e in events)
    # The redelivered committed rows were duplicates: no second CostEvent for any request,
    # and after the restart one for each row new to the ledger. (The ones the kill
    # committed but had not announced yet are lost as live events, never as rows.)
    assert max(Counter(before_crash + after_restart).values()) == 1
    assert set(after_restart) == set(seqs) - committed


async def test_a_stopped_tracker_settles_the_batch_in_hand(
    nats_server: EmbeddedNats, bus: Bus, tmp_path: Path
) -> None:
    """SIGTERM to the real service process while a batch is in hand, held in its commit
    by another writer of the ledger: the stop waits for the batch, which is committed,
    announced and acked before the process exits; nothing it committed comes back and
    nothing it acked is missing."""
    key, durable = unique("key"), unique("cost-stop")
    model = next(iter(PriceTable.load(REPO_CONFIG / "prices.yaml").prices))
    events = [usage_event(key, model=model) for _ in range(300)]
    stack = Stack(nats_server.url, tmp_path, {"SLUICE_COST_CONSUMER_DURABLE": durable})
    ledger = tmp_path / "ledger.sqlite3"

    announced = CostEvents()
    sub = await bus.nc.subscribe(Subjects.cost_recorded(key), cb=announced.on_msg)
    first = stack.start(ServiceName.COST_TRACKER)
    blocker: sqlite3.Connection | None = None
    try:
        await stack.wait_ready([ServiceName.COST_TRACKER])

        # The service's durable reads every key: first it records what earlier tests
        # left on the stream, so that the batch held below is this test's usage.
        async def idle() -> bool:
            info = await bus.js.consumer_info(Streams.USAGE.name, durable)
            return info.num_pending == 0 and info.num_ack_pending == 0

        await eventually(idle, timeout=30)
        # The tracker's next commit waits for this writer (up to its 5 s busy timeout).
        blocker = sqlite3.connect(ledger, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        seqs = await publish_all(bus, events)

        async def delivered() -> bool:
            return (await acked_up_to(bus, durable))[1] > 0

        await eventually(delivered, timeout=10, interval=0.01)
        # Past the end of the fetch that brought them (its timeout, 1 s) and of pricing
        # them (milliseconds): the batch is in hand, waiting in its commit.
        await asyncio.sleep(1.2)
        first.signal(signal.SIGTERM)

        async def stopping() -> bool:
            return "cost-tracker stopping" in first.log()

        await eventually(stopping, timeout=3, interval=0.01)
        # Well into the stop, whose consumers' part waits for the batch in hand.
        await asyncio.sleep(0.5)
        assert first.process.poll() is None
        assert ledger_ids(ledger, key) == set()
        blocker.execute("ROLLBACK")
        assert await asyncio.to_thread(first.process.wait, 30) == 0, first.log()[-3000:]
        await bus.nc.flush()
        before_stop = list(announced.seen)
        committed = ledger_ids(ledger, key)
        floor, unacked = await acked_up_to(bus, durable)
        assert 0 < len(committed) < len(events)
        assert unacked == 0
        assert committed == {rid for rid, seq in seqs.items() if seq <= floor}
        assert sorted(before_stop) == sorted(committed)

        announced.seen.clear()
        stack.start(ServiceName.COST_TRACKER)

        async def all_recorded() -> bool:
            return len(ledger_ids(ledger, key)) == len(events)

        await eventually(all_recorded, timeout=30)
        stack.stop_all()
        await bus.nc.flush()
        after_restart = list(announced.seen)
    finally:
        if blocker is not None:
            blocker.close()
        stack.stop_all()
        await sub.unsubscribe()
        await bus.js.delete_consumer(Streams.USAGE.name, durable)

    # Nothing was delivered twice: every request announced exactly once overall.
    assert Counter(before_stop + after_restart) == Counter(list(seqs))


async def test_a_failed_commit_naks_the_batch_and_the_redelivery_records_it(
    nats_server: EmbeddedNats, bus: Bus, tmp_path: Path
) -> None:
    """A locked ledger (another writer, longer than the tracker's 5 s busy timeout): the
    commit fails, the message is naked with the tracker's delay, comes back and is
    recorded and announced once."""
    key = unique("key")
    spec = replace(
        Consumers.COST_USAGE, durable=unique("cost-locked"), filter_subject=Subjects.usage(key)
    )
    running = await start_tracker(bus, tmp_path, consumer_spec=spec)
    watcher = await nats.connect(nats_server.url, name="ack-watcher")
    traffic = AckTraffic()

    async def on_ack(msg: Msg) -> None:
        traffic.seen(msg)

    await watcher.subscribe(f"$JS.ACK.{Streams.USAGE.name}.{spec.durable}.>", cb=on_ack)
    await watcher.flush()
    announced: list[str] = []

    async def on_cost(msg: Msg) -> None:
        announced.append(cost_pb2.CostEvent.FromString(msg.data).request_id)

    sub = await bus.nc.subscribe(Subjects.cost_recorded(key), cb=on_cost)
    blocker = sqlite3.connect(running.settings.ledger_file, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        event = usage_event(key)
        await publish_usage(bus, event)

        async def naked() -> bool:
            return bool(traffic.naks)

        await eventually(naked, timeout=15)
        blocker.execute("ROLLBACK")
        assert ledger_ids(running.settings.ledger_file, key) == set()

        async def acked() -> bool:
            return traffic.acks == 1

        await eventually(acked, timeout=15)
        await bus.nc.flush()
        assert traffic.naks == [NAK_DELAY_SECONDS]
        assert ledger_ids(running.settings.ledger_file, key) == {event.request_id}
        assert announced == [event.request_id]
        recorder = running.tracker.recorder
        assert recorder is not None and (recorder.recorded, recorder.duplicates) == (1, 0)
    finally:
        blocker.close()
        await sub.unsubscribe()
        await watcher.close()
        await running.stop()
