"""The worker against a real NATS server (JetStream work queue, usage stream) and the
simulated provider."""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
import uuid

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sluice import tokens
from sluice.bus import Bus
from sluice.common.v1 import chat_pb2
from sluice.devtools.simulator import Simulator
from sluice.errors import ErrorCode
from sluice.inference.v1 import inference_pb2
from sluice.pricing import PriceTable
from sluice.topology import PriorityClass, Subjects

from services.inference_worker.domain.circuit import CircuitState
from services.inference_worker.handlers.grpc import ProviderHealthServicer
from tests.inference_worker.conftest import (
    StoreTap,
    Tap,
    WorkerFactory,
    new_work,
    publish_work,
    run,
    usage_events,
)
from tests.support.stack import REPO

pytestmark = pytest.mark.slow


async def test_non_stream_final_usage_and_cache_store(bus: Bus, make_worker: WorkerFactory) -> None:
    await make_worker()
    stores = StoreTap()
    sub = await bus.nc.subscribe(Subjects.CACHE_STORE, cb=stores.on_msg)
    work = new_work(sim={"output_tokens": 9}, cache_key=f"ck-{uuid.uuid4().hex}")
    result = await run(bus, work)
    assert [e.sequence for e in result.events] == [1]
    final = result.final
    assert len(final.choices) == 1 and len(final.choices[0].content.split()) == 9
    assert final.model_served == "sim-fast" and final.provider == "sim"
    assert final.usage.output_tokens == 9
    assert final.usage.input_tokens == tokens.count_chat(work.request)
    expected = PriceTable.load(REPO / "config" / "prices.yaml").price("sim-fast", final.usage)
    assert final.cost_usd == pytest.approx(float(expected.total_usd))
    assert final.response_id and final.created_unix > 0
    assert 0 < final.timing.upstream_total_us <= final.timing.worker_total_us
    assert final.timing.queue_wait_us > 0

    [usage] = await usage_events(bus, work.key_id)
    assert usage.request_id == work.request_id and usage.outcome == "completed"
    assert usage.reservation_id == work.reservation_id
    assert usage.model_requested == "sim-fast" and usage.model_served == "sim-fast"
    assert usage.usage == final.usage and usage.trace_id
    await asyncio.sleep(0.1)
    await sub.unsubscribe()
    [store] = [s for s in stores.stores if s.cache_key == work.cache_key]
    assert store.answer.choices == final.choices and store.ttl_seconds == 60


async def test_stream_deltas_in_order_then_final(bus: Bus, make_worker: WorkerFactory) -> None:
    await make_worker()
    stores = StoreTap()
    sub = await bus.nc.subscribe(Subjects.CACHE_STORE, cb=stores.on_msg)
    work = new_work(
        stream=True,
        sim={"output_tokens": 6, "tokens_per_second": 200},
        cache_key=f"ck-{uuid.uuid4().hex}",
    )
    result = await run(bus, work)
    # Paced tokens mostly leave one by one; any that reach the worker together (a busy
    # machine) leave joined, so the count is not fixed, the order and the text are.
    assert [e.sequence for e in result.events] == list(range(1, len(result.events) + 1))
    kinds = [e.WhichOneof("body") for e in result.events]
    assert kinds[-1] == "final" and set(kinds[:-1]) == {"delta"}
    text = "".join(d.content for d in result.deltas)
    assert len(text.split()) == 6
    assert result.deltas[-1].finish_reason == "stop"
    final = result.final
    assert not final.choices, "a streamed answer is in the deltas, not repeated"
    assert final.usage.output_tokens == 6
    assert 0 < final.timing.upstream_ttft_us < final.timing.upstream_total_us
    await asyncio.sleep(0.1)
    await sub.unsubscribe()
    [store] = [s for s in stores.stores if s.cache_key == work.cache_key]
    assert store.answer.choices[0].content == text


async def test_one_trace_from_work_message_to_provider_call(
    bus: Bus, make_worker: WorkerFactory, spans: InMemorySpanExporter
) -> None:
    await make_worker()
    trace_id = secrets.token_hex(16)
    parent_span = secrets.token_hex(8)
    work = new_work(sim={"output_tokens": 3}, text="private words")
    work.request.sampling.temperature = 0.25
    async with Tap(bus, work) as tap:
        await bus.js.publish(
            Subjects.infer(PriorityClass.INTERACTIVE),
            work.SerializeToString(),
            headers={
                "Nats-Msg-Id": work.request_id,
                "traceparent": f"00-{trace_id}-{parent_span}-01",
            },
        )
        await tap.wait()
    [usage] = await usage_events(bus, work.key_id)
    assert usage.trace_id == trace_id
    mine = [s for s in spans.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id]
    by_name = {s.name: s for s in mine}
    consumer = by_name["sluice.v1.infer.interactive process"]
    assert consumer.kind is SpanKind.CONSUMER and consumer.parent is not None
    assert f"{consumer.parent.span_id:016x}" == parent_span
    client = by_name["chat sim-fast"]
    assert client.kind is SpanKind.CLIENT and client.parent is not None
    assert client.parent.span_id == consumer.context.span_id
    attrs = dict(client.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "sim"
    assert attrs["gen_ai.request.model"] == "sim-fast"
    assert attrs["gen_ai.response.model"] == "sim-fast"
    assert attrs["gen_ai.request.max_tokens"] == 64
    assert attrs["gen_ai.request.temperature"] == 0.25
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["gen_ai.usage.output_tokens"] == 3
    assert str(attrs["gen_ai.response.id"]).startswith("chatcmpl-")
    # Named by the subject pattern, not the key in the subject (low cardinality).
    producer = by_name["sluice.v1.usage publish"]
    assert producer.kind is SpanKind.PRODUCER
    assert (producer.attributes or {})["messaging.destination.name"] == Subjects.usage(work.key_id)
    assert not any("private words" in str(s.attributes) for s in mine)


async def test_failed_call_span_has_error_type(
    bus: Bus, make_worker: WorkerFactory, spans: InMemorySpanExporter
) -> None:
    await make_worker()
    work = new_work(sim={"fault": "context_length"})
    await run(bus, work)
    [usage] = await usage_events(bus, work.key_id)
    failed = [
        s
        for s in spans.get_finished_spans()
        if f"{s.context.trace_id:032x}" == usage.trace_id and s.name == "chat sim-fast"
    ]
    assert failed and dict(failed[0].attributes or {})["error.type"] == "context_length_exceeded"


async def test_usage_is_deduplicated_when_work_runs_twice(
    bus: Bus, make_worker: WorkerFactory
) -> None:
    await make_worker()
    work = new_work()
    first = await run(bus, work)
    # The same request again (as after a lost ack): published under another message id.
    async with Tap(bus, work) as tap:
        await publish_work(bus, work, msg_id=f"{work.request_id}-again")
        second = await tap.wait()
    assert first.final.usage == second.final.usage
    events = await usage_events(bus, work.key_id, expect=2, timeout=1.5)
    assert len(events) == 1


@pytest.mark.parametrize(
    ("sim", "code", "calls"),
    [
        ({"fault": "429", "retry_after_ms": 20}, ErrorCode.UPSTREAM_RATE_LIMITED, 2),
        ({"fault": "500"}, ErrorCode.UPSTREAM_ERROR, 2),
        ({"fault": "context_length"}, ErrorCode.CONTEXT_LENGTH_EXCEEDED, 1),
        ({"fault": "nonsense"}, ErrorCode.INVALID_REQUEST, 1),
    ],
)
async def test_failures_are_reported_and_released(
    bus: Bus,
    make_worker: WorkerFactory,
    simulator: Simulator,
    spans: InMemorySpanExporter,
    sim: dict[str, object],
    code: ErrorCode,
    calls: int,
) -> None:
    await make_worker()
    sim_id = uuid.uuid4().hex
    work = new_work(sim={**sim, "id": sim_id}, text="secret-prompt-words")
    result = await run(bus, work)
    assert [e.sequence for e in result.events] == [1]
    problem = result.failure.problem
    assert problem.code == str(code)
    assert "secret-prompt-words" not in problem.message
    assert simulator.stats.by_id[sim_id] == calls
    [usage] = await usage_events(bus, work.key_id)
    assert usage.outcome == "failed" and usage.usage.output_tokens == 0
    assert usage.reservation_id == work.reservation_id
    # Each provider call is billed as an attempt and is one CLIENT span with its error.
    assert usage.attempts == calls
    called = [
        s
        for s in spans.get_finished_spans()
        if f"{s.context.trace_id:032x}" == usage.trace_id and s.name == "chat sim-fast"
    ]
    assert len(called) == calls
    assert all(s.kind is SpanKind.CLIENT and (s.attributes or {}).get("error.type") for s in called)


async def test_unknown_model_fails_without_calling(bus: Bus, make_worker: WorkerFactory) -> None:
    await make_worker()
    work = new_work(model="no-such-model")
    result = await run(bus, work)
    assert result.failure.problem.code == "model_not_found"
    [usage] = await usage_events(bus, work.key_id)
    assert usage.outcome == "failed"


async def test_provider_without_its_key_fails_by_name_and_falls_back(
    bus: Bus, make_worker: WorkerFactory, simulator: Simulator
) -> None:
    worker = await make_worker()
    sim_id = uuid.uuid4().hex
    result = await run(bus, new_work(model="keyless", sim={"id": sim_id}))
    problem = result.failure.problem
    assert problem.code == "upstream_unavailable"
    assert "SLUICE_TEST_KEY_NEVER_SET" in problem.message
    assert simulator.stats.by_id[sim_id] == 0, "no call without the key"
    assert worker.circuits.get("keyless").requests_total == 0, "not a provider failure"
    result = await run(bus, new_work(model="keyless-chain", sim={"id": sim_id}))
    assert result.final.model_served == "sim-fast"
    assert simulator.stats.by_id[sim_id] == 1


async def test_cut_stream_bills_partial_usage(
    bus: Bus, make_worker: WorkerFactory, simulator: Simulator
) -> None:
    await make_worker()
    sim_id = uuid.uuid4().hex
    work = new_work(
        stream=True, sim={"fault": "cut", "cut_after": 3, "output_tokens": 10, "id": sim_id}
    )
    result = await run(bus, work)
    kinds = [e.WhichOneof("body") for e in result.events]
    assert kinds[-1] == "failure" and set(kinds[:-1]) == {"delta"}
    assert [e.sequence for e in result.events] == list(range(1, len(kinds) + 1))
    failure = result.failure
    assert failure.problem.code == "upstream_stream_interrupted"
    assert failure.partial_usage.output_tokens == tokens.count_text(
        "".join(d.content for d in result.deltas)
    )
    assert failure.model_served == "sim-fast"
    assert simulator.stats.by_id[sim_id] == 1, "no retry once output was relayed"
    [usage] = await usage_events(bus, work.key_id)
    assert usage.outcome == "interrupted" and usage.usage == failure.partial_usage


async def test_a_spend_ceiling_cuts_the_stream_with_budget_exceeded_and_partial_usage(
    bus: Bus, make_worker: WorkerFactory
) -> None:
    """A key that cuts on a spent budget: past the spend ceiling the limiter gave, the
    worker stops the generation, ends the stream with budget_exceeded and bills what was
    produced (and a ceiling that is not reached changes nothing)."""
    await make_worker()
    prices = PriceTable.load(REPO / "config" / "prices.yaml")
    work = new_work(stream=True, sim={"output_tokens": 40, "tokens_per_second": 400})
    prompt = tokens.count_chat(work.request)

    def cost(output_tokens: int) -> int:
        usage = chat_pb2.Usage(input_tokens=prompt, output_tokens=output_tokens)
        return prices.price("sim-fast", usage).total_nanos

    # Room for the prompt and 10 output tokens, not 11.
    work.spend_ceiling_usd_nanos = cost(10)
    result = await run(bus, work)
    kinds = [e.WhichOneof("body") for e in result.events]
    assert kinds[-1] == "failure" and set(kinds[:-1]) == {"delta"}
    failure = result.failure
    assert failure.problem.code == "budget_exceeded"
    relayed = tokens.count_text("".join(d.content for d in result.deltas))
    assert failure.partial_usage.output_tokens == relayed
    assert 10 < relayed < 40, relayed
    assert cost(relayed) > work.spend_ceiling_usd_nanos
    [usage] = await usage_events(bus, work.key_id)
    assert usage.outcome == "cancelled" and usage.usage == failure.partial_usage

    roomy = new_work(stream=True, sim={"output_tokens": 12, "tokens_per_second": 400})
    roomy.spend_ceiling_usd_nanos = cost(1000)
    assert (await run(bus, roomy)).final.usage.output_tokens == 12


async def test_retry_before_first_token_is_invisible(
    bus: Bus, make_worker: WorkerFactory, simulator: Simulator
) -> None:
    await make_worker()
    sim_id = uuid.uuid4().hex
    work = new_work(
        stream=True, sim={"fault": "503", "fail_times": 1, "id": sim_id, "output_tokens": 4}
    )
    result = await run(bus, work)
    # One sequence, no gap or restart: the failed attempt relayed nothing.
    assert [e.sequence for e in result.events] == list(range(1, len(result.events) + 1))
    assert result.events[0].delta.role == "assistant"
    assert result.final.usage.output_tokens == 4
    assert simulator.stats.by_id[sim_id] == 2


async def test_fallback_serves_when_primary_keeps_failing(
    bus: Bus, make_worker: WorkerFactory, simulator: Simulator
) -> None:
    await make_worker()
    sim_id = uuid.uuid4().hex
    # Two attempts on the primary fail; the third call is the fallback's and succeeds.
    work = new_work(model="sim-chain", sim={"fault": "500", "fail_times": 2, "id": sim_id})
    result = await run(bus, work)
    assert result.final.model_served == "sim-backup"
    assert result.final.provider == "sim-backup"
    assert simulator.stats.by_id[sim_id] == 3
    [usage] = await usage_events(bus, work.key_id)
    assert usage.model_requested == "sim-chain" and usage.model_served == "sim-backup"


async def test_circuit_opens_and_is_reported(bus: Bus, make_worker: WorkerFactory) -> None:
    worker = await make_worker(circuit_failure_threshold=3)
    for _ in range(2):
        result = await run(bus, new_work(model="dead-chain"))
        assert result.final.model_served == "sim-fast"
    # Breakers are per deployment; a one-deployment model's deployment is named after it.
    breaker = worker.circuits.get("dead-chain")
    assert breaker.current() is CircuitState.OPEN
    # While open, the dead provider is skipped without a call.
    calls = breaker.requests_total
    result = await run(bus, new_work(model="dead-chain"))
    assert result.final.model_served == "sim-fast" and breaker.requests_total == calls
    health = await ProviderHealthServicer(worker.catalog, worker.circuits).GetProviderHealth(
        inference_pb2.ProviderHealthRequest(),
        None,  # type: ignore[arg-type]
    )
    states = {p.provider: p for p in health.providers}
    assert states["dead"].circuit == "open" and states["dead"].failures_total >= 3
    assert states["sim"].circuit == "closed" and "sim-fast" in states["sim"].models
    deployments = {d.deployment: d for d in health.deployments}
    assert deployments["dead-chain"].state == "open"
    assert deployments["dead-chain"].reason == "errors"
    assert deployments["dead-chain"].open_until_unix_nanos > time.time_ns()


async def test_deadline_passed_in_queue(bus: Bus, make_worker: WorkerFactory) -> None:
    await make_worker()
    work = new_work(deadline_s=-1)
    result = await run(bus, work)
    problem = result.failure.problem
    assert problem.code == "model_timeout" and problem.http_status == 504
    assert int(problem.details["elapsed_ms"]) >= int(problem.details["deadline_ms"])


async def test_shutdown_naks_unfinished_work_and_another_worker_restarts_it(
    bus: Bus, make_worker: WorkerFactory
) -> None:
    first = await make_worker()
    work = new_work(stream=True, sim={"output_tokens": 40, "tokens_per_second": 20})
    async with Tap(bus, work) as tap:
        await publish_work(bus, work)
        for _ in range(100):
            if tap.result.events:
                break
            await asyncio.sleep(0.05)
        assert tap.result.events, "generation started"
        await first.stop(grace=0.1)
        assert first.consumer.processed == 0
        await asyncio.sleep(0.2)
        before = [e for e in tap.result.events if e.HasField("delta")]
        tap.result.events.clear()
        second = await make_worker()
        result = await tap.wait(timeout=20)
    # The second worker continues the published prefix (assistant prefill) instead of
    # starting over, and bills the whole answer once.
    prefix = "".join(e.delta.content for e in before)
    assert result.events[0].sequence == before[-1].sequence + 1
    assert [e.sequence for e in result.events] == list(
        range(before[-1].sequence + 1, before[-1].sequence + 1 + len(result.events))
    )
    continued = "".join(e.delta.content for e in result.events if e.HasField("delta"))
    assert len((prefix + continued).split()) == 40
    assert result.final.usage.output_tokens == tokens.count_text(prefix) + 40 - len(prefix.split())
    for _ in range(100):
        if second.consumer.processed:
            break
        await asyncio.sleep(0.02)
    assert second.consumer.processed == 1
    [usage] = await usage_events(bus, work.key_id)
    assert usage.outcome == "completed"


async def test_gives_up_after_max_deliveries(bus: Bus, make_worker: WorkerFactory) -> None:
    worker = await make_worker()
    work = new_work()
    async with Tap(bus, work) as tap:
        outcome = await worker.engine.process(
            work, priority="interactive", delivery=worker.settings.max_deliveries + 1
        )
        result = await tap.wait()
    assert outcome == "failed"
    assert result.failure.problem.code == "service_unavailable"
    [usage] = await usage_events(bus, work.key_id)
    assert usage.outcome == "failed"


async def test_in_progress_acks_keep_the_claim(bus: Bus, make_worker: WorkerFactory) -> None:
    worker = await make_worker(in_progress_interval_seconds=0.05)

    class FakeMsg:
        progress = 0

        async def in_progress(self) -> None:
            self.progress += 1

    held, done = FakeMsg(), FakeMsg()
    worker.consumer.claims[id(held)] = (held, time.monotonic())  # type: ignore[assignment]
    worker.consumer.claims[id(done)] = (done, time.monotonic())  # type: ignore[assignment]
    await asyncio.sleep(0.12)
    del worker.consumer.claims[id(done)]
    progress_when_done = done.progress
    await asyncio.sleep(0.3)
    assert held.progress >= 3
    # A message no longer held is not renewed.
    assert done.progress == progress_when_done


async def test_saturated_worker_prefers_system_then_interactive_then_batch(
    bus: Bus, make_worker: WorkerFactory
) -> None:
    await make_worker(concurrency=1)
    blocker = new_work(sim={"ttft_ms": 600})
    order: list[str] = []
    works = {
        "batch": new_work(priority=chat_pb2.PRIORITY_BATCH),
        "interactive": new_work(),
        "system": new_work(priority=chat_pb2.PRIORITY_SYSTEM),
    }
    taps = [Tap(bus, w) for w in (blocker, *works.values())]
    for tap in taps:
        await tap.__aenter__()
    try:
        await publish_work(bus, blocker)
        await asyncio.sleep(0.3)  # the only slot is busy
        await publish_work(bus, works["batch"], PriorityClass.BATCH)
        await publish_work(bus, works["interactive"], PriorityClass.INTERACTIVE)
        await publish_work(bus, works["system"], PriorityClass.SYSTEM)

        async def finish(name: str, tap: Tap) -> None:
            await tap.wait(timeout=15)
            order.append(name)

        await asyncio.gather(*(finish(n, t) for n, t in zip(works, taps[1:], strict=True)))
    finally:
        for tap in taps:
            await tap.__aexit__()
    assert order == ["system", "interactive", "batch"]


async def test_pickup_latency(bus: Bus, make_worker: WorkerFactory) -> None:
    await make_worker()
    await run(bus, new_work())  # warm the connection pool
    waits = []
    for _ in range(30):
        result = await run(bus, new_work(sim={"output_tokens": 1}))
        waits.append(result.final.timing.queue_wait_us / 1000)
    p50 = statistics.median(waits)
    p95 = sorted(waits)[int(len(waits) * 0.95) - 1]
    print(f"pickup latency: p50 {p50:.2f} ms, p95 {p95:.2f} ms")
    assert p50 < 20, waits


async def test_a_burst_of_tokens_is_relayed_in_few_events(
    bus: Bus, make_worker: WorkerFactory
) -> None:
    await make_worker()
    # No pacing: the simulator writes the tokens back to back, so most reach the
    # worker in the same reads and leave joined.
    work = new_work(stream=True, sim={"output_tokens": 40})
    result = await run(bus, work)
    assert result.final.usage.output_tokens == 40
    assert len(result.deltas) < 40
    # The simulator's tokens are words, each with its leading space: none lost or doubled.
    assert len("".join(d.content for d in result.deltas).split()) == 40
    assert [e.sequence for e in result.events] == list(range(1, len(result.events) + 1))
