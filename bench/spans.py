"""Cost of one span on the event loop's thread: the OpenTelemetry SDK's tracer against
the lean local tracer the services use when spans stay local, both ending into the same
JSON-lines processor. Rounds alternate, and medians are quoted, since the machine is
shared."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import AttributeValue
from sluice.localtrace import LocalTracerProvider
from sluice.telemetry import JsonLinesSpanProcessor

from bench.report import table

# What a publish span carries on the request path.
ATTRIBUTES: dict[str, AttributeValue] = {
    "messaging.system": "nats",
    "messaging.destination.name": "sluice.v1.infer.interactive",
    "messaging.operation.type": "publish",
    "messaging.message.id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
    "messaging.message.body.size": 412,
}


def microseconds_per_span(tracer: trace.Tracer, spans: int) -> float:
    started = time.perf_counter()
    for _ in range(spans):
        with tracer.start_as_current_span("publish", kind=SpanKind.PRODUCER, attributes=ATTRIBUTES):
            pass
    return (time.perf_counter() - started) / spans * 1e6


def spans_table(rounds: int = 5, spans: int = 20_000) -> str:
    resource = Resource.create({"service.name": "bench"})
    with tempfile.TemporaryDirectory(prefix="sluice-bench-spans-") as tmp:
        sdk = TracerProvider(resource=resource)
        sdk.add_span_processor(JsonLinesSpanProcessor(Path(tmp) / "sdk.jsonl"))
        local = LocalTracerProvider(resource)
        local.add_span_processor(JsonLinesSpanProcessor(Path(tmp) / "local.jsonl"))
        tracers = {"sdk": sdk.get_tracer("bench"), "local": local.get_tracer("bench")}
        samples: dict[str, list[float]] = {name: [] for name in tracers}
        for _ in range(rounds):
            for name, tracer in tracers.items():
                samples[name].append(microseconds_per_span(tracer, spans))
        sdk.shutdown()
        local.shutdown()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return (
        table(
            ["tracer", "µs per span (median)", "min", "max", "spans per round"],
            [
                [name, medians[name], min(samples[name]), max(samples[name]), spans]
                for name in tracers
            ],
        )
        + f"\nlocal / sdk: {medians['local'] / medians['sdk']:.2f}"
    )
