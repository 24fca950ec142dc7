"""The cost-tracker in process against a real NATS server: SLUICE_USAGE in, SQLite rows,
cost events on NATS and over gRPC, usage queries, traces, redelivery and rebuild."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import replace
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sluice import telemetry
from sluice.consumers import process_span_name
from sluice.cost.v1 import cost_pb2
from sluice.localtrace import LocalTracerProvider
from sluice.pricing import PriceTable
from sluice.topology import Consumers, Streams, Subjects

from services.cost_tracker.adapters.ledger import SqliteLedger, sqlite_rebuilding
from services.cost_tracker.adapters.rebuild import rebuild_ledger
from services.cost_tracker.domain.usage import Pricer, UsageFilter
from services.cost_tracker.handlers.grpc import WATCHING_METADATA_KEY
from tests.cost_tracker.harness import (
    eventually,
    publish_usage,
    start_tracker,
    unique,
    usage_event,
    write_prices,
)

# The name every usage consumer's CONSUMER spans take (the limiter's too).
PROCESS_SPAN_NAME = process_span_name(Consumers.COST_USAGE)


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    # The tracer the service runs with when spans stay local.
    provider = LocalTracerProvider(Resource.create({"service.name": "cost-tracker"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
async def running(bus, tmp_path, spans):
    provider, _ = spans
    tracker = await start_tracker(bus, tmp_path, tracer=provider.get_tracer("test"))
    yield tracker
    await tracker.stop()


async def watch(stub, key_id: str = ""):
    """Start WatchCostEvents and wait until the server has registered the watcher."""
    call = stub.WatchCostEvents(cost_pb2.WatchCostEventsRequest(key_id=key_id))
    metadata = await asyncio.wait_for(call.initial_metadata(), 5)
    assert (WATCHING_METADATA_KEY, "1") in tuple(metadata)
    return call


async def read_events(call, n: int, timeout: float = 10.0) -> list[cost_pb2.CostEvent]:
    out = []
    for _ in range(n):
        out.append(await asyncio.wait_for(call.read(), timeout))
    return out


def ledger_rows(path, key_id: str) -> list[sqlite3.Row]:
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(
            "SELECT * FROM ledger WHERE key_id = ? ORDER BY occurred_unix_nanos", (key_id,)
        ).fetchall()


async def test_usage_to_ledger_to_watchers_and_queries(running, bus, spans):
    provider, exporter = spans
    key = unique("key")
    call = await watch(running.stub, key)

    # The worker publishes usage inside its own span; the cost-tracker continues it.
    worker = provider.get_tracer("worker")
    t0 = 1_800_000_000_000_000_000
    events = [
        usage_event(key, input_tokens=1000, cached=200, output_tokens=500, occurred_unix_nanos=t0),
        usage_event(key, cache_hit=True, occurred_unix_nanos=t0 + 1),
        usage_event(
            key, input_tokens=40, output_tokens=7, outcome="failed", occurred_unix_nanos=t0 + 2
        ),
    ]
    publisher_spans = {}
    for event in events:
        with worker.start_as_current_span("worker publish usage", kind=SpanKind.PRODUCER) as span:
            headers: dict[str, str] = {}
            telemetry.inject(headers)
            await publish_usage(bus, event, headers=headers)
            publisher_spans[event.request_id] = span.get_span_context()

    received = await read_events(call, 3)
    assert [e.request_id for e in received] == [e.request_id for e in events]
    first, hit, failed = received
    assert first.input_cost_usd == pytest.approx(0.00009)
    assert first.output_cost_usd == pytest.approx(0.0002)
    assert first.total_cost_usd == pytest.approx(0.00029)
    assert first.usage.cached_input_tokens == 200
    assert first.price_version == running.tracker.pricer.table.version
    assert hit.cache_hit and hit.total_cost_usd == 0
    assert failed.outcome == "failed"
    assert failed.total_cost_usd == pytest.approx((40 * 0.10 + 7 * 0.40) / 1e6)

    rows = ledger_rows(running.settings.ledger_file, key)
    assert [r["request_id"] for r in rows] == [e.request_id for e in events]
    assert rows[0]["input_cost_nanos"] == 90_000
    assert rows[0]["output_cost_nanos"] == 200_000
    assert rows[0]["total_cost_nanos"] == 290_000
    assert rows[0]["stream_seq"] > 0
    assert (rows[1]["cache_hit"], rows[1]["total_cost_nanos"]) == (1, 0)
    assert rows[2]["total_cost_nanos"] == 40 * 100 + 7 * 400
    # No trace id in the events: the row keeps the trace they travelled in.
    assert rows[0]["trace_id"] == f"{publisher_spans[events[0].request_id].trace_id:032x}"

    summary = await running.stub.QueryUsage(cost_pb2.UsageQuery(key_id=key))
    assert summary.requests == 3
    assert summary.total_cost_usd == pytest.approx((290_000 + 0 + 4_000 + 2_800) / 1e9)
    assert [(r.key_id, r.model, r.requests) for r in summary.rows] == [(key, "sim-fast", 3)]
    assert summary.rows[0].usage.input_tokens == 1000 + 1000 + 40
    window = await running.stub.QueryUsage(
        cost_pb2.UsageQuery(key_id=key, since_unix_nanos=t0 + 1, until_unix_nanos=t0 + 2)
    )
    assert window.requests == 1 and window.total_cost_usd == 0

    # One CONSUMER span per message, a child of the publisher's span.
    process = {
        s.attributes["sluice.request_id"]: s
        for s in exporter.get_finished_spans()
        if s.name == PROCESS_SPAN_NAME and s.attributes.get("sluice.key_id") == key
    }
    assert set(process) == set(publisher_spans)
    for request_id, parent in publisher_spans.items():
        span = process[request_id]
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is not None
        assert span.parent.span_id == parent.span_id
        assert span.context.trace_id == parent.trace_id
        assert span.attributes["sluice.ledger.inserted"] is True
    call.cancel()


async def test_cost_event_carries_the_consumer_span_as_parent(running, bus, spans):
    _, exporter = spans
    key = unique("key")
    got: asyncio.Queue[Any] = asyncio.Queue()
    sub = await bus.nc.subscribe(Subjects.cost_recorded(key), cb=got.put)
    event = usage_event(key)
    await publish_usage(bus, event)
    msg = await asyncio.wait_for(got.get(), 10)
    await sub.unsubscribe()
    recorded = cost_pb2.CostEvent.FromString(msg.data)
    assert recorded.request_id == event.request_id
    ctx = telemetry.extract(msg.headers)
    parent = trace.get_current_span(ctx).get_span_context()
    span = await eventually(
        lambda: _async(
            [
                s
                for s in exporter.get_finished_spans()
                if s.attributes.get("sluice.request_id") == event.request_id
            ]
        )
    )
    assert parent.span_id == span[0].context.span_id


async def _async(value):
    return value


async def test_watch_filters_by_key(running, bus):
    key_a, key_b = unique("key-a"), unique("key-b")
    only_a = await watch(running.stub, key_a)
    everything = await watch(running.stub)
    ev_a1, ev_b, ev_a2 = usage_event(key_a), usage_event(key_b), usage_event(key_a)
    for event in (ev_a1, ev_b, ev_a2):
        await publish_usage(bus, event)
    assert [e.request_id for e in await read_events(only_a, 2)] == [
        ev_a1.request_id,
        ev_a2.request_id,
    ]
    seen: list[str] = []
    while len([r for r in seen if r in {ev_a1.request_id, ev_b.request_id, ev_a2.request_id}]) < 3:
        seen.append((await read_events(everything, 1))[0].request_id)
    ours = [r for r in seen if r in {ev_a1.request_id, ev_b.request_id, ev_a2.request_id}]
    assert ours == [ev_a1.request_id, ev_b.request_id, ev_a2.request_id]
    # Nothing for key_b reached the key_a watcher: its next read would wait.
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(only_a.read(), 0.3)
    only_a.cancel()
    everything.cancel()


async def test_watch_streams_end_when_the_service_stops(bus, tmp_path):
    tracker = await start_tracker(bus, tmp_path)
    call = await watch(tracker.stub)
    await tracker.tracker.stop()

    async def until_eof():
        # Events of earlier tests, replayed by this tracker's new durable, may come first.
        while (item := await call.read()) is not grpc.aio.EOF:
            assert isinstance(item, cost_pb2.CostEvent)
        return item

    assert await asyncio.wait_for(until_eof(), 5) is grpc.aio.EOF
    assert await call.code() is grpc.StatusCode.OK
    await tracker.stop()


async def test_same_request_republished_is_recorded_and_announced_once(running, bus):
    key = unique("key")
    call = await watch(running.stub, key)
    event = usage_event(key)
    # A second publish with another message id passes JetStream's dedup window check.
    await publish_usage(bus, event, msg_id=event.request_id)
    await publish_usage(bus, event, msg_id=event.request_id + "-retry")
    marker = usage_event(key)
    await publish_usage(bus, marker)
    received = await read_events(call, 2)
    # The marker comes right after the first: the duplicate produced no cost event.
    assert [e.request_id for e in received] == [event.request_id, marker.request_id]
    assert len(ledger_rows(running.settings.ledger_file, key)) == 2
    recorder = running.tracker.recorder
    assert recorder is not None and recorder.duplicates >= 1
    call.cancel()


async def test_rows_committed_before_a_crash_are_duplicates_when_redelivered(bus, tmp_path):
    """What a crash between the commit and the acks leaves: the rows in the ledger, their
    messages unacked. Delivered again, each finds its row: counted a duplicate, announced
    never, and acked; the one event the crash had not committed is recorded as new."""
    key = unique("key")
    events = [usage_event(key) for _ in range(3)]
    pricer = Pricer(PriceTable.load(write_prices(tmp_path)))
    crashed = SqliteLedger(tmp_path / "ledger.sqlite3")
    await crashed.open()
    await crashed.record([pricer.price(e) for e in events[:2]])
    await crashed.close()

    announced: list[str] = []

    async def on_cost(msg):
        announced.append(cost_pb2.CostEvent.FromString(msg.data).request_id)

    sub = await bus.nc.subscribe(Subjects.cost_recorded(key), cb=on_cost)
    for event in events:
        await publish_usage(bus, event)
    spec = replace(
        Consumers.COST_USAGE, durable=unique("cost-redeliver"), filter_subject=Subjects.usage(key)
    )
    running = await start_tracker(bus, tmp_path, consumer_spec=spec)
    try:
        recorder = running.tracker.recorder
        assert recorder is not None

        async def all_settled():
            info = await bus.js.consumer_info(Streams.USAGE.name, spec.durable)
            return info.ack_floor.stream_seq and info.num_pending + info.num_ack_pending == 0

        await eventually(all_settled)
        await bus.nc.flush()
        rows = await running.tracker.ledger.entries(UsageFilter(key_id=key))
        assert sorted(r.request_id for r in rows) == sorted(e.request_id for e in events)
        assert (recorder.recorded, recorder.duplicates) == (1, 2)
        assert announced == [events[2].request_id]
    finally:
        await running.stop()  # deletes its durable too
        await sub.unsubscribe()


async def test_poison_message_is_terminated_and_the_stream_goes_on(running, bus):
    key = unique("key")
    await bus.js.publish(Subjects.usage(key), b"\xff\xff not a protobuf")
    anonymous = usage_event(key)
    anonymous.request_id = ""
    await publish_usage(bus, anonymous, msg_id=unique("no-request-id"))
    good = usage_event(key)
    await publish_usage(bus, good)

    async def recorded():
        return ledger_rows(running.settings.ledger_file, key)

    rows = await eventually(recorded)
    assert [r["request_id"] for r in rows] == [good.request_id]

    # The batch's acks follow its commit (and its alert check): wait for them. Nothing
    # stays pending, the two poison messages included (terminated, not redelivered).
    async def settled():
        info = await bus.js.consumer_info(Streams.USAGE.name, running.settings.consumer_durable)
        return info.num_ack_pending == 0 and info.num_pending == 0 and info

    info = await eventually(settled)
    assert info.num_redelivered == 0


async def test_unknown_model_recorded_at_zero_and_warned_once(running, bus, caplog):
    key = unique("key")
    caplog.set_level(logging.WARNING, logger="services.cost_tracker.domain.recording")
    model = unique("mystery-model")
    events = [usage_event(key, model=model) for _ in range(3)]
    for event in events:
        await publish_usage(bus, event)

    async def recorded():
        rows = ledger_rows(running.settings.ledger_file, key)
        return rows if len(rows) == 3 else None

    rows = await eventually(recorded)
    assert all(r["total_cost_nanos"] == 0 and r["priced"] == 0 for r in rows)
    warnings = [r for r in caplog.records if model in r.getMessage()]
    assert len(warnings) == 1


async def test_query_rejects_inverted_range_and_continues_caller_trace(running, spans):
    provider, exporter = spans
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.stub.QueryUsage(cost_pb2.UsageQuery(since_unix_nanos=5, until_unix_nanos=1))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    with provider.get_tracer("client").start_as_current_span("operator query") as client_span:
        carrier: dict[str, str] = {}
        telemetry.inject(carrier)
        await running.stub.QueryUsage(
            cost_pb2.UsageQuery(key_id=unique("nobody")), metadata=tuple(carrier.items())
        )
    server = [
        s
        for s in exporter.get_finished_spans()
        if s.name.endswith("/QueryUsage")
        and s.parent is not None
        and s.parent.span_id == client_span.get_span_context().span_id
    ]
    assert len(server) == 1 and server[0].kind is SpanKind.SERVER


async def test_rebuild_reproduces_the_ledger(running, bus, tmp_path):
    keys = [unique("key"), unique("key")]
    events = [
        usage_event(keys[0], input_tokens=123, output_tokens=45, cached=20),
        usage_event(keys[0], cache_hit=True),
        usage_event(keys[1], model="big-model", input_tokens=7, output_tokens=9, outcome="failed"),
        usage_event(keys[1], model="no-such-model"),
    ]
    for event in events:
        await publish_usage(bus, event)
    # A republished duplicate must not appear twice after the replay either.
    await publish_usage(bus, events[0], msg_id=events[0].request_id + "-again")
    live = running.tracker.ledger

    async def all_recorded():
        got = [e for k in keys for e in await live.entries(UsageFilter(key_id=k))]
        return got if len(got) == len(events) else None

    before = await eventually(all_recorded)

    target = tmp_path / "rebuilt" / "ledger.sqlite3"
    target.parent.mkdir()
    # An existing (wrong) ledger at the target is replaced, stale WAL included.
    stale = SqliteLedger(target)
    await stale.open()
    await stale.record([replace(before[0], request_id="bogus", key_id=keys[0])])
    await stale.close()
    (target.parent / "ledger.sqlite3-wal").write_bytes(b"stale wal")

    report = await rebuild_ledger(
        bus, sqlite_rebuilding(target), running.tracker.pricer, where=str(target), batch_size=3
    )
    assert report.messages >= len(events) + 1
    assert report.recorded <= report.messages - 1  # at least our duplicate was ignored
    rebuilt = SqliteLedger(target)
    await rebuilt.open()
    after = [e for k in keys for e in await rebuilt.entries(UsageFilter(key_id=k))]
    await rebuilt.close()
    assert after == before
    assert not list(target.parent.glob("*.rebuild-*"))


class BrokenPricer(Pricer):
    def price(self, event, *, stream_seq=0):
        raise RuntimeError("pricing exploded")


async def test_failed_rebuild_leaves_the_old_ledger(bus, tmp_path):
    await publish_usage(bus, usage_event(unique("key")))
    path = tmp_path / "ledger.sqlite3"
    old = SqliteLedger(path)
    await old.open()
    keep = Pricer(PriceTable.load(write_prices(tmp_path))).price(usage_event(unique("key")))
    await old.record([keep])
    await old.close()
    with pytest.raises(RuntimeError, match="pricing exploded"):
        await rebuild_ledger(
            bus,
            sqlite_rebuilding(path),
            BrokenPricer(PriceTable.load(write_prices(tmp_path))),
            where=str(path),
        )
    assert not list(tmp_path.glob("*.rebuild-*"))
    reopened = SqliteLedger(path)
    await reopened.open()
    assert await reopened.entries(UsageFilter()) == [keep]
    await reopened.close()


async def test_usage_arriving_within_the_window_is_committed_as_one_batch(bus, tmp_path):
    running = await start_tracker(bus, tmp_path, batch_window_seconds=0.5)
    ledger = running.tracker.ledger
    batches: list[int] = []
    record = ledger.record

    key = unique("key")

    async def counting_record(entries):
        # The stream also holds earlier tests' usage, which this new consumer reads too.
        mine = sum(1 for e in entries if e.key_id == key)
        if mine:
            batches.append(mine)
        return await record(entries)

    ledger.record = counting_record  # type: ignore[method-assign]
    try:
        await publish_usage(bus, usage_event(key))
        await eventually(lambda: _rows_async(running, key, 1))
        # The consumer now waits out its window: these gather at the server meanwhile.
        for _ in range(10):
            await publish_usage(bus, usage_event(key))
        await eventually(lambda: _rows_async(running, key, 11))
        assert batches == [1, 10]
    finally:
        await running.stop()


async def _rows_async(running, key: str, count: int) -> bool:
    return len(ledger_rows(running.settings.ledger_file, key)) == count


async def test_the_feed_subscribes_only_while_someone_watches(running, bus):
    feed = running.tracker.feed
    assert not feed.listening, "nobody watches: the tracker's own cost events are not sent back"
    key = unique("key")
    call = await watch(running.stub, key)
    assert feed.listening
    event = usage_event(key)
    await publish_usage(bus, event)
    assert [e.request_id for e in await read_events(call, 1)] == [event.request_id]
    call.cancel()
    await eventually(lambda: _async(not feed.listening or None))
    # A watcher after the last one left gets a subscription again.
    again = await watch(running.stub, key)
    later = usage_event(key)
    await publish_usage(bus, later)
    assert [e.request_id for e in await read_events(again, 1)] == [later.request_id]
    again.cancel()


async def test_query_usage_groups_by_tag_and_end_user_over_grpc(running, bus):
    key = unique("key")
    events = [usage_event(key, input_tokens=100 * (i + 1), output_tokens=7) for i in range(3)]
    events[0].tags.extend(["web", "beta"])
    events[1].tags.append("web")
    events[0].end_user = events[2].end_user = "alice"
    for event in events:
        await publish_usage(bus, event)
    pricer = running.tracker.pricer
    cost = [pricer.price(e).total_cost_nanos for e in events]

    async def by_tag():
        summary = await running.stub.QueryUsage(
            cost_pb2.UsageQuery(key_id=key, group_by=[cost_pb2.USAGE_DIMENSION_TAG])
        )
        return summary if summary.requests == 3 else None

    summary = await eventually(by_tag)
    assert {(r.tag, r.requests, r.cost_usd_nanos) for r in summary.rows} == {
        ("", 1, cost[2]),
        ("beta", 1, cost[0]),
        ("web", 2, cost[0] + cost[1]),
    }
    assert summary.cost_usd_nanos == sum(cost)
    assert list(summary.group_by) == [cost_pb2.USAGE_DIMENSION_TAG]
    users = await running.stub.QueryUsage(
        cost_pb2.UsageQuery(key_id=key, group_by=[cost_pb2.USAGE_DIMENSION_END_USER], limit=1)
    )
    assert [(r.end_user, r.requests) for r in users.rows] == [("", 1)]
    assert users.truncated
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.stub.QueryUsage(
            cost_pb2.UsageQuery(
                group_by=[cost_pb2.USAGE_DIMENSION_DAY, cost_pb2.USAGE_DIMENSION_HOUR]
            )
        )
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_usage_queries_over_nats_answer_or_say_why(running, bus):
    key = unique("key")
    event = usage_event(key)
    await publish_usage(bus, event)

    async def ask(query):
        return await bus.request(
            Subjects.COST_USAGE_QUERY, query, cost_pb2.UsageQueryReply, timeout=5
        )

    async def recorded():
        reply = await ask(cost_pb2.UsageQuery(key_id=key))
        return reply if reply.summary.requests == 1 else None

    reply = await eventually(recorded)
    assert not reply.problem.code
    assert reply.summary.cost_usd_nanos == running.tracker.pricer.price(event).total_cost_nanos
    bad = await ask(cost_pb2.UsageQuery(since_unix_nanos=10, until_unix_nanos=5))
    assert bad.problem.code == "invalid_request" and bad.problem.http_status == 400
    await running.tracker.ledger.close()
    closed = await ask(cost_pb2.UsageQuery(key_id=key))
    assert closed.problem.code == "service_unavailable" and closed.problem.retryable
