"""A lean OpenTelemetry tracer for spans kept locally (no OTLP endpoint).

Every service opens a handful of spans per request, and with the SDK each costs about
50 µs of the event loop's time: a sampler, an id generator, attribute validation under a
lock, a span-processor fan-out and a read-only copy at the end. On two cores shared by
five services that is a measurable share of the gateway's overhead. These spans
implement the same OpenTelemetry API (so ``trace.get_tracer``, ``use_span``,
propagation and exemplars work unchanged) and keep only what ``sluice trace`` reads:
ids, parent, name, kind, service, times, status, attributes, events and links. When an
OTLP endpoint is set, the SDK is used instead, since its exporters need its spans.

A finished span goes to each processor's ``on_end`` with the attributes a
``ReadableSpan`` has (``context``, ``parent``, ``attributes``, ``status``...), so the
JSON-lines processor and the SDK's in-memory exporter both accept it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.util.types import Attributes, AttributeValue
from typing_extensions import override

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
_random = random.Random()


def _value(value: Any) -> Any:
    # As the SDK keeps them: sequences frozen as tuples (a caller's list may change).
    return tuple(value) if isinstance(value, list) else value


def _attributes(attributes: Attributes) -> dict[str, AttributeValue]:
    if not attributes:
        return {}
    return {key: _value(value) for key, value in attributes.items() if value is not None}


class SpanSink(Protocol):
    """What receives finished spans: the SDK's ``SpanProcessor`` shape, ``on_end`` only."""

    def on_end(self, span: Any) -> None: ...

    def force_flush(self, timeout_millis: int = 30000) -> bool: ...

    def shutdown(self) -> None: ...


class Event:
    """A span event, shaped like the SDK's (``name``, ``attributes``, ``timestamp``)."""

    __slots__ = ("attributes", "name", "timestamp")

    def __init__(self, name: str, attributes: Attributes, timestamp: int) -> None:
        self.name = name
        self.attributes = attributes
        self.timestamp = timestamp


class LocalSpan(Span):
    __slots__ = (
        "_ended",
        "_provider",
        "attributes",
        "context",
        "end_time",
        "events",
        "kind",
        "links",
        "name",
        "parent",
        "start_time",
        "status",
    )

    def __init__(
        self,
        provider: LocalTracerProvider,
        name: str,
        context: SpanContext,
        *,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, AttributeValue],
        links: Sequence[Link],
        start_time: int,
    ) -> None:
        self._provider = provider
        self._ended = False
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.links = links
        self.events: list[Event] = []
        self.start_time = start_time
        self.end_time: int | None = None
        self.status = _UNSET

    @property
    def resource(self) -> Resource:
        return self._provider.resource

    def get_span_context(self) -> SpanContext:
        return self.context

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if not self._ended:
            self.attributes.update(_attributes(attributes))

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if not self._ended and value is not None:
            self.attributes[key] = _value(value)

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if not self._ended:
            self.events.append(Event(name, attributes, timestamp or time.time_ns()))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if not self._ended and context.is_valid:
            self.links = [*self.links, Link(context, attributes)]

    def update_name(self, name: str) -> None:
        if not self._ended:
            self.name = name

    def is_recording(self) -> bool:
        return not self._ended

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._ended:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        # As the SDK: OK is final, and UNSET never replaces a status that was set.
        if self.status.status_code is StatusCode.OK or status.status_code is StatusCode.UNSET:
            return
        self.status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        # Type and message only: a traceback would carry file paths and local values.
        merged: dict[str, AttributeValue] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.escaped": escaped,
        }
        if attributes:
            merged.update(attributes)
        self.add_event("exception", merged, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self.end_time = end_time or time.time_ns()
        for sink in self._provider.sinks:
            sink.on_end(self)

    def __repr__(self) -> str:
        return f"LocalSpan(name={self.name!r}, span_id={self.context.span_id:016x})"


class LocalTracer(trace.Tracer):
    __slots__ = ("_provider",)

    def __init__(self, provider: LocalTracerProvider) -> None:
        self._provider = provider

    @override
    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        parent = trace.get_current_span(context).get_span_context()
        span_id = _random.getrandbits(64)
        if parent.is_valid:
            if not parent.trace_flags.sampled:
                # The caller chose not to record this trace: carry it on, record nothing.
                return NonRecordingSpan(
                    SpanContext(parent.trace_id, span_id, False, parent.trace_flags)
                )
            trace_id, parent_context = parent.trace_id, parent
        else:
            trace_id, parent_context = _random.getrandbits(128), None
        return LocalSpan(
            self._provider,
            name,
            SpanContext(trace_id, span_id, False, _SAMPLED),
            parent=parent_context,
            kind=kind,
            attributes=_attributes(attributes),
            links=[link for link in links if link.context.is_valid] if links else (),
            start_time=start_time or time.time_ns(),
        )

    @override
    def start_as_current_span(  # type: ignore[override]  # the API's manager is private
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> _CurrentSpan:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        return _CurrentSpan(span, end_on_exit, record_exception, set_status_on_exception)


class _CurrentSpan:
    """``trace.use_span`` as a plain context manager: the same attach, exception record,
    status and end, without the two generator-based managers the API nests (a span on
    every request's path pays for them several times)."""

    __slots__ = ("_end", "_record", "_set_status", "_span", "_token")

    def __init__(self, span: Span, end: bool, record: bool, set_status: bool) -> None:
        self._span = span
        self._end = end
        self._record = record
        self._set_status = set_status
        self._token: object = None

    def __enter__(self) -> Span:
        self._token = context_api.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        context_api.detach(self._token)  # type: ignore[arg-type]
        # As ``use_span``: only Exceptions are errors (not GeneratorExit, cancellation).
        if isinstance(exc, Exception) and span.is_recording():
            if self._record:
                span.record_exception(exc)
            if self._set_status:
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        if self._end:
            span.end()


class LocalTracerProvider(trace.TracerProvider):
    """One per process; ``sinks`` receive every finished span, in order, on the thread
    that ended it (keep them cheap: the JSON-lines processor only serialises)."""

    def __init__(self, resource: Resource) -> None:
        self.resource = resource
        self.sinks: tuple[SpanSink, ...] = ()
        self._tracer = LocalTracer(self)
        self._lock = threading.Lock()

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> trace.Tracer:
        # Spans do not record their instrumentation scope, so one tracer serves all.
        return self._tracer

    def add_span_processor(self, sink: SpanSink) -> None:
        with self._lock:
            self.sinks = (*self.sinks, sink)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(sink.force_flush(timeout_millis) for sink in self.sinks)

    def shutdown(self) -> None:
        sinks, self.sinks = self.sinks, ()
        for sink in sinks:
            sink.shutdown()
