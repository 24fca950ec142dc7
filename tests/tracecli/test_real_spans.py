"""``sluice trace`` on spans written by the real span processor: a publisher continuing
into the real cost-tracker consumer over a real NATS server, each with its own span file."""

from __future__ import annotations

import json
import time

from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanKind
from sluice import telemetry
from sluice.consumers import process_span_name
from sluice.devtools import tracecli
from sluice.localtrace import LocalTracerProvider
from sluice.telemetry import JsonLinesSpanProcessor, spans_dir
from sluice.topology import Consumers

from services.cost_tracker.domain.usage import UsageFilter
from tests.cost_tracker.harness import eventually, publish_usage, start_tracker, unique, usage_event

PROCESS_SPAN_NAME = process_span_name(Consumers.COST_USAGE)


def provider_for(service: str, state) -> LocalTracerProvider:
    provider = LocalTracerProvider(Resource.create({"service.name": service}))
    provider.add_span_processor(JsonLinesSpanProcessor(spans_dir(state) / f"{service}.jsonl"))
    return provider


def test_processor_writes_in_the_background_and_on_flush(tmp_path):
    path = tmp_path / "spans" / "svc.jsonl"
    processor = JsonLinesSpanProcessor(path, flush_interval=0.05)
    provider = LocalTracerProvider(Resource.create({"service.name": "svc"}))
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    try:
        with tracer.start_as_current_span("first", attributes={"n": 1}):
            pass
        # Written by the writer thread within a few flush intervals, no flush asked for.
        deadline = time.monotonic() + 5
        while not (path.exists() and path.read_bytes()) and time.monotonic() < deadline:
            time.sleep(0.01)
        first = [json.loads(line) for line in path.read_text().splitlines()]
        assert [s["name"] for s in first] == ["first"]
        assert first[0]["service"] == "svc"
        assert first[0]["attributes"] == {"n": 1}
        with tracer.start_as_current_span("second"):
            pass
        assert provider.force_flush()
        names = [json.loads(line)["name"] for line in path.read_text().splitlines()]
        assert names == ["first", "second"]
    finally:
        provider.shutdown()
    with tracer.start_as_current_span("after shutdown"):
        pass
    names = [json.loads(line)["name"] for line in path.read_text().splitlines()]
    assert names == ["first", "second"]


async def test_trace_of_worker_into_cost_tracker(bus, tmp_path, capsys):
    state = tmp_path / "state"
    worker = provider_for("inference-worker", state)
    cost = provider_for("cost-tracker", state)
    running = await start_tracker(bus, tmp_path, tracer=cost.get_tracer("sluice.cost_tracker"))
    try:
        key = unique("key")
        event = usage_event(key, input_tokens=300, output_tokens=50)
        tracer = worker.get_tracer("sluice.inference_worker")
        with (
            tracer.start_as_current_span(
                "sluice.v1.infer.interactive process", kind=SpanKind.CONSUMER
            ) as root,
            tracer.start_as_current_span(
                "sluice.v1.usage publish",
                kind=SpanKind.PRODUCER,
                attributes={"gen_ai.request.model": "sim-fast", "gen_ai.prompt": "do not show me"},
            ),
        ):
            headers: dict[str, str] = {}
            telemetry.inject(headers)
            await publish_usage(bus, event, headers=headers)
        trace_id = f"{root.get_span_context().trace_id:032x}"

        async def recorded():
            return await running.tracker.ledger.entries(UsageFilter(key_id=key))

        await eventually(recorded)
    finally:
        await running.stop()
        worker.shutdown()
        cost.shutdown()

    code = tracecli.main([trace_id, "--state-dir", str(state)])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(
        f"trace {trace_id}  3 spans, 2 services (cost-tracker, inference-worker)"
    )
    body = lines[2:]
    assert body[0].split()[:2] == ["inference-worker", "sluice.v1.infer.interactive"]
    assert body[1].split()[:2] == ["inference-worker", "sluice.v1.usage"]
    assert body[2].split()[:2] == ["cost-tracker", PROCESS_SPAN_NAME.split()[0]]
    span_col = lines[1].index("SPAN")
    # The cost-tracker's span is the child of the worker's publish span, not an orphan.
    assert [len(b[span_col:]) - len(b[span_col:].lstrip()) for b in body] == [0, 2, 4]
    assert "orphan" not in out
    assert f"sluice.request_id={event.request_id}" in body[2]
    assert "gen_ai.request.model=sim-fast" in body[1]
    assert "do not show me" not in out

    assert tracecli.main(["--json", trace_id, "--state-dir", str(state)]) == 0
    spans = json.loads(capsys.readouterr().out)
    by_name = {s["name"]: s for s in spans}
    assert (
        by_name[PROCESS_SPAN_NAME]["parent_span_id"]
        == by_name["sluice.v1.usage publish"]["span_id"]
    )
    assert by_name[PROCESS_SPAN_NAME]["kind"] == "CONSUMER"
