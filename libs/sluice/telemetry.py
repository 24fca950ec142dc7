"""Tracing and metrics set up once per process.

Spans go to OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, and otherwise to a local
JSON-lines file per service under ``<state_dir>/spans/`` that ``sluice trace`` reads.
With OTLP the SDK's batch thread encodes and sends them. Local spans come from a lean
tracer of the same API (``sluice.localtrace``, 40% of the SDK's cost per span);
each is serialised as it ends (a few microseconds, on the caller's thread) and a
background thread only writes the bytes, so no batch of hundreds of spans holds the
GIL, and with it the event loop, in the middle of a token relay. Metrics are
OpenTelemetry instruments read by a Prometheus reader (``/metrics``) and, with an
endpoint, by OTLP.
W3C trace context travels in HTTP headers, NATS headers and gRPC metadata through the
same propagator.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.propagate import set_global_textmap
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    AlwaysOnExemplarFilter,
    ExemplarFilter,
    MeterProvider,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sluice.localtrace import LocalSpan, LocalTracerProvider

log = logging.getLogger(__name__)

PROPAGATOR = TraceContextTextMapPropagator()
SPANS_DIRNAME = "spans"


def spans_dir(state_dir: Path) -> Path:
    return state_dir / SPANS_DIRNAME


class JsonLinesSpanProcessor(SpanProcessor):
    """Serialises each span as it ends and appends the lines to one file from a
    background thread.

    The SDK's ``BatchSpanProcessor`` serialises a whole batch on its own thread, which
    holds the GIL for milliseconds at a time (up to the interpreter's switch interval)
    while the event loop waits: at a few hundred spans a second that is a pause every
    flush, right in the inter-token gaps. Here the loop pays the serialisation per span,
    evenly, and the writer thread only joins bytes and writes them (the write itself
    releases the GIL).
    """

    def __init__(self, path: Path, *, flush_interval: float = 0.2, max_pending: int = 2048):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._flush_interval = flush_interval
        self._max_pending = max_pending
        self._pending: list[bytes] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="sluice-span-writer", daemon=True)
        self._thread.start()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan | LocalSpan) -> None:
        if self._stopped:
            return
        line = orjson.dumps(span_to_dict(span)) + b"\n"
        with self._lock:
            self._pending.append(line)
            full = len(self._pending) >= self._max_pending
        if full:
            self._wake.set()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self._flush_interval)
            self._wake.clear()
            self._write()

    def _write(self) -> None:
        # One writer at a time (the thread, a flush, shutdown): lines keep their order.
        with self._write_lock:
            with self._lock:
                lines, self._pending = self._pending, []
            if not lines:
                return
            try:
                with self._path.open("ab") as fh:
                    fh.write(b"".join(lines))
            except OSError as exc:
                log.warning("%d spans not written to %s: %s", len(lines), self._path, exc)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._write()
        return True

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)
        self._write()


def span_to_dict(span: ReadableSpan | LocalSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "trace_id": f"{ctx.trace_id:032x}" if ctx else "",
        "span_id": f"{ctx.span_id:016x}" if ctx else "",
        "parent_span_id": f"{parent.span_id:016x}" if parent else "",
        "name": span.name,
        "kind": span.kind.name if span.kind else "INTERNAL",
        "service": str(span.resource.attributes.get("service.name", "")),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        # Attribute values are scalars or tuples of them, which orjson writes as they are.
        "attributes": dict(span.attributes) if span.attributes else {},
        "links": [
            {"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
            for link in span.links
        ]
        if span.links
        else [],
    }


@dataclass
class Telemetry:
    service: str
    tracer_provider: TracerProvider | LocalTracerProvider
    meter_provider: MeterProvider

    @property
    def tracer(self) -> trace.Tracer:
        return self.tracer_provider.get_tracer(f"sluice.{self.service}")

    @property
    def meter(self) -> metrics.Meter:
        return self.meter_provider.get_meter(f"sluice.{self.service}")

    def shutdown(self) -> None:
        try:
            self.tracer_provider.shutdown()
        finally:
            self.meter_provider.shutdown()


_CURRENT: Telemetry | None = None


def setup_telemetry(
    service: str,
    state_dir: Path,
    *,
    prometheus: bool = True,
) -> Telemetry:
    """Install the process-wide tracer and meter providers for ``service``."""
    # One tracer/meter provider per process: OpenTelemetry's own globals are set once.
    global _CURRENT  # noqa: PLW0603
    if _CURRENT is not None:
        return _CURRENT
    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME", service),
            "service.namespace": "sluice",
        }
    )
    otlp_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    tracer_provider: TracerProvider | LocalTracerProvider
    if otlp_endpoint:
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(
            BatchSpanProcessor(
                _otlp_span_exporter(), schedule_delay_millis=500, max_export_batch_size=512
            )
        )
    else:
        tracer_provider = LocalTracerProvider(resource)
        tracer_provider.add_span_processor(
            JsonLinesSpanProcessor(spans_dir(state_dir) / f"{service}.jsonl")
        )
    trace.set_tracer_provider(tracer_provider)

    readers: list[MetricReader] = []
    if prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader())
    if otlp_endpoint:
        readers.append(PeriodicExportingMetricReader(_otlp_metric_exporter()))
    meter_provider = MeterProvider(
        resource=resource, metric_readers=readers, exemplar_filter=_exemplar_filter()
    )
    metrics.set_meter_provider(meter_provider)
    set_global_textmap(PROPAGATOR)
    _CURRENT = Telemetry(service, tracer_provider, meter_provider)
    return _CURRENT


def _exemplar_filter() -> ExemplarFilter:
    """Exemplars only when asked for (``OTEL_METRICS_EXEMPLAR_FILTER``): the Prometheus
    text endpoint does not carry them, and sampling one costs every measurement."""
    chosen = os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER", "always_off").strip().lower()
    if chosen == "trace_based":
        return TraceBasedExemplarFilter()
    if chosen == "always_on":
        return AlwaysOnExemplarFilter()
    return AlwaysOffExemplarFilter()


def _otlp_protocol() -> str:
    return os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    )


def _otlp_span_exporter() -> SpanExporter:
    if _otlp_protocol().startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcSpanExporter,
    )

    return GrpcSpanExporter()


def _otlp_metric_exporter() -> Any:
    if _otlp_protocol().startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
        OTLPMetricExporter as GrpcMetricExporter,
    )

    return GrpcMetricExporter()


def current() -> Telemetry:
    if _CURRENT is None:
        raise RuntimeError("setup_telemetry() has not run in this process")
    return _CURRENT


def inject(carrier: MutableMapping[str, str], span: Span | None = None) -> MutableMapping[str, str]:
    """Write ``traceparent``/``tracestate`` for the current (or given) span."""
    ctx = trace.set_span_in_context(span) if span is not None else None
    PROPAGATOR.inject(carrier, context=ctx)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context:
    return PROPAGATOR.extract(carrier or {})


def trace_id_hex(span: Span | None = None) -> str:
    ctx = (span or trace.get_current_span()).get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


def traceparent(span: Span | None = None) -> str:
    carrier: dict[str, str] = {}
    inject(carrier, span)
    return carrier.get("traceparent", "")


def messaging_attributes(subject: str, operation: str) -> dict[str, str]:
    return {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.type": operation,
    }


__all__ = [
    "Span",
    "SpanKind",
    "Telemetry",
    "current",
    "extract",
    "inject",
    "messaging_attributes",
    "setup_telemetry",
    "spans_dir",
    "trace_id_hex",
    "traceparent",
]
