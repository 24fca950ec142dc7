"""The durable consumer base (sluice.consumers) against a real NATS server: how each
message is settled by what its handler raises, what a crash leaves for redelivery,
acking a batch at once, spans, the graceful stop, and the one shared connection."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from sluice import telemetry
from sluice.bus import Bus
from sluice.consumers import ConsumerBroker, Delivery, DurableConsumer, Poison, Transient
from sluice.cost.v1 import cost_pb2
from sluice.devtools.embedded import EmbeddedNats, free_port
from sluice.service import ServiceRuntime
from sluice.settings import CommonSettings
from sluice.topology import ConsumerSpec, ServiceName, StreamSpec

from tests.consumers.conftest import AckTraffic, ScratchStream, eventually

REPO = Path(__file__).resolve().parents[2]

Seen = list[tuple[str, int]]


def recorder(seen: Seen):
    async def handle(event: cost_pb2.UsageEvent, delivery: Delivery) -> None:
        seen.append((event.request_id, delivery.attempt))

    return handle


@pytest.fixture
async def broker(bus: Bus) -> AsyncIterator[ConsumerBroker]:
    broker = ConsumerBroker(bus, graceful_timeout=10)
    yield broker
    await broker.stop()


async def settled(stream: ScratchStream, count: int, durable: str = "c") -> bool:
    info = await stream.info(durable)
    assert info.ack_floor is not None
    return info.ack_floor.stream_seq == count and info.num_ack_pending == 0


# --- disposition ------------------------------------------------------------------------


async def test_each_message_is_acked_naked_or_terminated_by_what_its_handler_raises(
    broker: ConsumerBroker, stream: ScratchStream, ack_traffic: AckTraffic
) -> None:
    attempts: dict[str, list[float]] = {}

    async def handle(event: cost_pb2.UsageEvent, delivery: Delivery) -> None:
        attempts.setdefault(event.request_id, []).append(time.monotonic())
        if event.request_id == "invalid":
            raise Poison("no key")
        if event.request_id == "store-down" and delivery.attempt == 1:
            raise Transient("ledger locked", delay=0.4)
        if event.request_id == "bug" and delivery.attempt == 1:
            raise KeyError("a bug")

    consumer = DurableConsumer(
        broker, stream.consumer(), cost_pb2.UsageEvent, handle, nak_delay=0.2, window=0.2
    )
    await consumer.start()
    await stream.publish(["ok", "invalid", "store-down", "bug"])
    await stream.publish_raw(b"\xff\xff")  # not a UsageEvent: never reaches the handler

    await eventually(lambda: settled(stream, 5))
    assert {rid: len(times) for rid, times in attempts.items()} == {
        "ok": 1,
        "invalid": 1,
        "store-down": 2,
        "bug": 2,
    }
    # Poison and undecodable: terminated. Transient: naked with its delay; a bug: with
    # the consumer's default. Then acked on the second attempt.
    assert ack_traffic.terms == 2
    assert sorted(delay or 0.0 for delay in ack_traffic.naks) == [0.2, 0.4]
    assert ack_traffic.acks == 3
    assert consumer.settled == {"ack": 3, "nak": 2, "term": 2}
    store_down = attempts["store-down"]
    assert store_down[1] - store_down[0] >= 0.35  # the server held it for the delay

    # Nothing comes back later: the terminated ones are settled for good.
    await asyncio.sleep(0.6)
    assert sum(len(times) for times in attempts.values()) == 6


async def test_after_batch_failure_naks_every_accepted_message(
    broker: ConsumerBroker, stream: ScratchStream, ack_traffic: AckTraffic
) -> None:
    seen: Seen = []
    commits: list[list[str]] = []
    staged: list[str] = []

    async def handle(event: cost_pb2.UsageEvent, delivery: Delivery) -> None:
        seen.append((event.request_id, delivery.attempt))
        if event.request_id == "invalid":
            raise Poison("no key")
        staged.append(event.request_id)

    async def commit() -> None:
        batch = sorted(staged)
        staged.clear()
        commits.append(batch)
        if len(commits) == 1:
            raise Transient("commit failed", delay=0.1)

    consumer = DurableConsumer(
        broker,
        stream.consumer(),
        cost_pb2.UsageEvent,
        handle,
        after_batch=commit,
        batch=8,
        window=0.3,
    )
    await stream.publish(["a", "invalid", "b"])
    await consumer.start()

    await eventually(lambda: settled(stream, 3))
    assert commits == [["a", "b"], ["a", "b"]]
    assert seen == [("a", 1), ("invalid", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert ack_traffic.terms == 1
    assert ack_traffic.naks == [0.1, 0.1]


# --- a crash mid-batch ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ack_policy", "redelivered"),
    [
        # Settled one by one: the two handled before the crash stay acked.
        ("explicit", ["2", "3", "4", "5"]),
        # One ack per batch, never sent: the whole batch comes back.
        ("all", ["0", "1", "2", "3", "4", "5"]),
    ],
)
async def test_a_crash_mid_batch_leaves_the_unacked_messages_for_redelivery(
    nats_server: EmbeddedNats,
    broker: ConsumerBroker,
    stream: ScratchStream,
    tmp_path: Path,
    ack_policy: str,
    redelivered: list[str],
) -> None:
    await stream.publish([str(i) for i in range(6)])
    marker = tmp_path / "in-hand"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "libs")])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.consumers.crashing_consumer",
            nats_server.url,
            stream.name,
            stream.spec.subjects[0],
            ack_policy,
            str(marker),
        ],
        cwd=REPO,
        env=env,
    )
    try:
        await eventually(marker.exists, timeout=30)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert marker.read_text() == "2"

    seen: Seen = []
    spec = stream.consumer(ack_wait_seconds=1.0, ack_policy=ack_policy)
    consumer = DurableConsumer(broker, spec, cost_pb2.UsageEvent, recorder(seen), window=0.2)
    await consumer.start()
    await eventually(lambda: settled(stream, 6))
    assert seen == [(rid, 2) for rid in redelivered]


# --- acking a batch at once (AckAll) ----------------------------------------------------


@pytest.mark.parametrize(("ack_policy", "acks"), [("explicit", 64), ("all", 1)])
async def test_a_batch_of_64_costs_one_ack_under_ack_all(
    broker: ConsumerBroker,
    stream: ScratchStream,
    ack_traffic: AckTraffic,
    ack_policy: str,
    acks: int,
) -> None:
    await stream.publish([str(i) for i in range(64)])
    seen: Seen = []
    spec = stream.consumer(ack_policy=ack_policy)
    consumer = DurableConsumer(broker, spec, cost_pb2.UsageEvent, recorder(seen), batch=64)
    await consumer.start()
    await eventually(lambda: settled(stream, 64))
    assert len(seen) == 64
    assert ack_traffic.acks == acks
    assert consumer.settled["ack"] == 64


async def test_ack_all_acks_before_a_transient_naks_from_it_and_resumes_there(
    broker: ConsumerBroker, stream: ScratchStream, ack_traffic: AckTraffic
) -> None:
    handled: list[tuple[str, int, float]] = []

    async def handle(event: cost_pb2.UsageEvent, delivery: Delivery) -> None:
        handled.append((event.request_id, delivery.attempt, time.monotonic()))
        if event.request_id == "3":
            raise Poison("invalid")
        if event.request_id == "5" and delivery.attempt == 1:
            raise Transient("store down", delay=0.3)

    await stream.publish([str(i) for i in range(10)])
    spec = stream.consumer(ack_policy="all")
    consumer = DurableConsumer(broker, spec, cost_pb2.UsageEvent, handle, batch=10, window=0.3)
    await consumer.start()
    await eventually(lambda: settled(stream, 10))

    order = [(rid, attempt) for rid, attempt, _ in handled]
    # 6..9 were fetched with 5, never attempted, and naked with it: their delivery count
    # is 2 when they are handled.
    assert order == [
        *[(str(i), 1) for i in range(6)],
        *[(str(i), 2) for i in range(5, 10)],
    ]
    assert ack_traffic.terms == 1
    assert ack_traffic.acks == 2  # "4" for 0..4, then "9" for 5..9
    assert ack_traffic.naks == [None] * 5  # 5..9, held by the consumer's pause instead
    assert handled[6][2] - handled[5][2] >= 0.25
    assert consumer.settled == {"ack": 9, "nak": 5, "term": 1}


# --- spans ------------------------------------------------------------------------------


async def test_each_message_is_processed_in_a_consumer_span_continued_from_its_headers(
    broker: ConsumerBroker, stream: ScratchStream, spans
) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    current: dict[str, trace.Span] = {}

    async def handle(event: cost_pb2.UsageEvent, delivery: Delivery) -> None:
        current[event.request_id] = trace.get_current_span()
        assert delivery.span is current[event.request_id]
        if event.request_id == "invalid":
            raise Poison("no key")

    spec = stream.consumer()
    consumer = DurableConsumer(broker, spec, cost_pb2.UsageEvent, handle, tracer=tracer)
    await consumer.start()
    with tracer.start_as_current_span("request") as parent:
        headers: dict[str, str] = {}
        telemetry.inject(headers)
    await stream.publish(["traced", "invalid"], headers=headers)
    await stream.publish(["untraced"])
    await eventually(lambda: settled(stream, 3))
    await eventually(lambda: len(exporter.get_finished_spans()) == 4)

    by_id = {
        s.attributes["messaging.destination.name"] + "/" + rid: s
        for s in exporter.get_finished_spans()
        if s.name != "request"
        for rid, span in current.items()
        if span.get_span_context().span_id == s.context.span_id
    }
    subject = f"{stream.subject_prefix}.key"
    traced = by_id[f"{subject}/traced"]
    assert traced.name == f"{spec.filter_subject} process"
    assert traced.kind is SpanKind.CONSUMER
    assert traced.context.trace_id == parent.get_span_context().trace_id
    assert traced.parent is not None
    assert traced.parent.span_id == parent.get_span_context().span_id
    assert dict(traced.attributes) == {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.type": "process",
        "messaging.consumer.group.name": spec.durable,
        "sluice.consumer.disposition": "ack",
    }
    invalid = by_id[f"{subject}/invalid"]
    assert invalid.parent.span_id == parent.get_span_context().span_id
    assert invalid.status.status_code is StatusCode.ERROR
    assert invalid.attributes["sluice.consumer.disposition"] == "term"
    untraced = by_id[f"{subject}/untraced"]
    assert untraced.parent is None
    assert untraced.context.trace_id != parent.get_span_context().trace_id


# --- graceful stop ----------------------------------------------------------------------


@pytest.mark.parametrize("ack_policy", ["explicit", "all"])
async def test_stop_finishes_and_acks_the_batch_in_hand(
    bus: Bus, stream: ScratchStream, ack_policy: str
) -> None:
    broker = ConsumerBroker(bus, graceful_timeout=10)
    seen: Seen = []
    first = asyncio.Event()

    async def slow(event: cost_pb2.UsageEvent, delivery: Delivery) -> None:
        first.set()
        await asyncio.sleep(0.05)
        seen.append((event.request_id, delivery.attempt))

    await stream.publish([str(i) for i in range(10)])
    spec = stream.consumer(ack_policy=ack_policy)
    consumer = DurableConsumer(broker, spec, cost_pb2.UsageEvent, slow, batch=10, window=0.3)
    await consumer.start()
    await asyncio.wait_for(first.wait(), 10)
    await broker.stop()

    assert not consumer.running
    assert seen == [(str(i), 1) for i in range(10)]
    # The acks left before stop returned; the server applies them on its own time.
    await eventually(lambda: settled(stream, 10), timeout=5)
    assert bus.connected  # the broker let go of the connection without closing it


async def test_the_runtime_stops_consumers_after_intake_and_before_its_stop_hooks(
    nats_server: EmbeddedNats, stream: ScratchStream, tmp_path: Path
) -> None:
    common = CommonSettings(nats_url=nats_server.url, state_dir=tmp_path, log_level="WARNING")
    runtime = ServiceRuntime(ServiceName.COST_TRACKER, common, grpc_port=0, metrics_port=None)
    # The runtime's bus, without the rest of start(): that would install this process's
    # telemetry providers for good (once per process), under the other suites' feet.
    bus = runtime.bus = await Bus.connect(nats_server.url, "sluice-cost-tracker")
    seen: Seen = []
    first = asyncio.Event()
    at_hook: list[tuple[int, int]] = []

    async def slow(event: cost_pb2.UsageEvent, delivery: Delivery) -> None:
        first.set()
        await asyncio.sleep(0.05)
        seen.append((event.request_id, delivery.attempt))

    async def hook() -> None:
        at_hook.append((len(seen), consumer.settled["ack"]))

    consumer = DurableConsumer(
        runtime.consumer_broker(), stream.consumer(), cost_pb2.UsageEvent, slow, batch=8
    )
    runtime.on_stop(hook)
    await stream.publish([str(i) for i in range(8)])
    await consumer.start()
    await asyncio.wait_for(first.wait(), 10)
    await runtime.shutdown()

    # Every message handled and its ack sent before the first stop hook ran.
    assert at_hook == [(8, 8)]
    assert not bus.connected
    await eventually(lambda: settled(stream, 8), timeout=5)


# --- one connection ---------------------------------------------------------------------


async def test_the_broker_runs_on_the_bus_connection(tmp_path: Path) -> None:
    monitor = free_port()
    server = EmbeddedNats.start(tmp_path / "nats", monitor_port=monitor)
    try:
        bus = await Bus.connect(server.url, "sluice-one-connection")
        await bus.ensure_topology()
        stream = ScratchStream(StreamSpec(name="ONE_CONNECTION", subjects=("test.one.>",)), bus)
        await bus.ensure_stream(stream.spec)
        broker = ConsumerBroker(bus)
        seen: Seen = []
        consumer = DurableConsumer(broker, stream.consumer(), cost_pb2.UsageEvent, recorder(seen))
        await consumer.start()
        await stream.publish(["a", "b"])
        await eventually(lambda: len(seen) == 2)

        assert broker.connection is bus.connection_for_consumers()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{monitor}/connz", params={"subs": "1"}) as resp,
        ):
            connz = await resp.json()
        assert [c["name"] for c in connz["connections"]] == ["sluice-one-connection"]

        await broker.stop()
        assert bus.connected
        await bus.publish("test.plain", b"still usable")
        await bus.flush()
        await bus.close()
    finally:
        server.stop()


def test_a_consumer_spec_with_an_unknown_ack_policy_is_refused(bus: Bus) -> None:
    spec = ConsumerSpec(stream="S", durable="d", filter_subject="s.>", ack_policy="none")
    with pytest.raises(ValueError, match="not supported"):
        DurableConsumer(ConsumerBroker(bus), spec, cost_pb2.UsageEvent, recorder([]))
