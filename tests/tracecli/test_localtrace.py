"""The lean local tracer: the OpenTelemetry API behaviour the services rely on, and the
span records ``sluice trace`` reads."""

from __future__ import annotations

import json

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from sluice import telemetry
from sluice.localtrace import LocalTracerProvider
from sluice.telemetry import JsonLinesSpanProcessor


@pytest.fixture
def recorded():
    provider = LocalTracerProvider(Resource.create({"service.name": "svc"}))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def test_children_share_the_trace_and_name_their_parent(recorded):
    tracer, exporter = recorded
    with tracer.start_as_current_span("outer", kind=SpanKind.SERVER) as outer:
        assert trace.get_current_span() is outer
        with tracer.start_as_current_span("inner", attributes={"n": 1}) as inner:
            inner.set_attribute("m", 2)
            inner.set_attributes({"k": "v"})
    assert trace.get_current_span() is not outer
    inner_done, outer_done = exporter.get_finished_spans()
    assert (inner_done.name, outer_done.name) == ("inner", "outer")
    assert outer_done.parent is None and outer_done.kind is SpanKind.SERVER
    assert inner_done.parent.span_id == outer_done.context.span_id
    assert inner_done.context.trace_id == outer_done.context.trace_id
    assert inner_done.context.span_id != outer_done.context.span_id
    assert dict(inner_done.attributes) == {"n": 1, "m": 2, "k": "v"}
    assert outer_done.start_time <= inner_done.start_time <= inner_done.end_time
    assert inner_done.end_time <= outer_done.end_time


def test_a_remote_parent_continues_its_trace(recorded):
    tracer, exporter = recorded
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    ctx = telemetry.extract({"traceparent": f"00-{trace_id}-{parent_id}-01"})
    with tracer.start_as_current_span("consume", context=ctx, kind=SpanKind.CONSUMER) as span:
        carrier: dict[str, str] = {}
        telemetry.inject(carrier)
    (done,) = exporter.get_finished_spans()
    assert f"{done.context.trace_id:032x}" == trace_id
    assert f"{done.parent.span_id:016x}" == parent_id
    span_id = f"{span.get_span_context().span_id:016x}"
    assert carrier["traceparent"] == f"00-{trace_id}-{span_id}-01"


def test_an_unsampled_parent_is_carried_on_but_not_recorded(recorded):
    tracer, exporter = recorded
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    ctx = telemetry.extract({"traceparent": f"00-{trace_id}-b7ad6b7169203331-00"})
    with tracer.start_as_current_span("quiet", context=ctx) as span:
        assert not span.is_recording()
        assert f"{span.get_span_context().trace_id:032x}" == trace_id
        with tracer.start_as_current_span("child") as child:
            assert not child.is_recording()
    assert exporter.get_finished_spans() == ()


def test_an_escaping_exception_marks_the_span_and_records_no_traceback(recorded):
    tracer, exporter = recorded
    with pytest.raises(ValueError), tracer.start_as_current_span("fails"):
        raise ValueError("bad value")
    (done,) = exporter.get_finished_spans()
    assert done.status.status_code is StatusCode.ERROR
    (event,) = done.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "ValueError"
    assert "exception.stacktrace" not in event.attributes


def test_status_follows_the_api_rules_and_an_ended_span_is_frozen(recorded):
    tracer, exporter = recorded
    span = tracer.start_span("s")
    span.set_status(Status(StatusCode.ERROR, "upstream"))
    span.set_status(StatusCode.UNSET)  # never replaces a status that was set
    span.end()
    span.set_attribute("late", True)
    span.set_status(StatusCode.OK)
    span.end()  # a second end is ignored
    (done,) = exporter.get_finished_spans()
    assert done.status.status_code is StatusCode.ERROR
    assert done.status.description == "upstream"
    assert "late" not in done.attributes
    assert not span.is_recording()


def test_written_record_is_what_sluice_trace_reads(tmp_path):
    path = tmp_path / "svc.jsonl"
    provider = LocalTracerProvider(Resource.create({"service.name": "svc"}))
    provider.add_span_processor(JsonLinesSpanProcessor(path))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("root") as root:
        link = trace.Link(root.get_span_context())
        span = tracer.start_span("linked", kind=SpanKind.PRODUCER, links=[link])
        span.set_status(Status(StatusCode.ERROR, "nope"))
        span.end()
    provider.shutdown()
    linked, root_rec = (json.loads(line) for line in path.read_text().splitlines())
    assert root_rec["service"] == "svc" and root_rec["parent_span_id"] == ""
    assert linked["parent_span_id"] == root_rec["span_id"]
    assert linked["trace_id"] == root_rec["trace_id"]
    assert linked["kind"] == "PRODUCER" and linked["status"] == "ERROR"
    assert linked["links"] == [{"trace_id": root_rec["trace_id"], "span_id": root_rec["span_id"]}]
    assert root_rec["end_ns"] >= linked["end_ns"] >= linked["start_ns"] > 0
