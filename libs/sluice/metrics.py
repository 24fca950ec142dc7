"""Metric instruments shared by the services, named once.

Names follow OpenTelemetry (GenAI semantic conventions where they exist); the Prometheus
reader turns dots into underscores and appends units (``gen_ai_client_token_usage``...).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from opentelemetry import metrics

LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


class LiveCount:
    """An up-down count kept in plain integers and read by an observable instrument
    when metrics are collected. Same ``add`` as an ``UpDownCounter``, but an integer
    increment instead of the SDK's measurement pipeline on every request."""

    def __init__(self, meter: metrics.Meter, name: str, unit: str, description: str) -> None:
        self._values: Counter[tuple[tuple[str, str], ...]] = Counter()
        meter.create_observable_up_down_counter(
            name, callbacks=[self._observe], unit=unit, description=description
        )

    def add(self, amount: int, attributes: Mapping[str, str] | None = None) -> None:
        self._values[tuple(sorted(attributes.items())) if attributes else ()] += amount

    def _observe(self, _options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return [metrics.Observation(v, dict(k)) for k, v in list(self._values.items())]


class LiveTally(LiveCount):
    """A monotonic count kept the same way, read as a counter (``sluice.requests``:
    the SDK's ``Counter.add`` cost the gateway about 20 µs of every request)."""

    def __init__(self, meter: metrics.Meter, name: str, unit: str, description: str) -> None:
        self._values = Counter()
        meter.create_observable_counter(
            name, callbacks=[self._observe], unit=unit, description=description
        )


@dataclass(frozen=True)
class Instruments:
    requests: LiveTally
    errors: LiveTally
    request_duration: metrics.Histogram
    queue_wait: metrics.Histogram
    time_to_first_token: metrics.Histogram
    operation_duration: metrics.Histogram
    token_usage: metrics.Histogram
    in_flight: LiveCount
    open_streams: LiveCount
    cost_usd: metrics.Counter
    stream_backfilled: metrics.Counter


@lru_cache(maxsize=1)
def instruments() -> Instruments:
    """The instruments of this process (call after ``setup_telemetry``)."""
    meter = metrics.get_meter("sluice")
    return Instruments(
        requests=LiveTally(
            meter, "sluice.requests", unit="{request}", description="Requests by route and status"
        ),
        errors=LiveTally(
            meter, "sluice.errors", unit="{error}", description="Errors by stable code and service"
        ),
        request_duration=meter.create_histogram(
            "sluice.request.duration",
            unit="s",
            description="Total request latency at the gateway",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        ),
        queue_wait=meter.create_histogram(
            "sluice.queue.wait",
            unit="s",
            description="Time a work item waited in the queue before a worker took it",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        ),
        time_to_first_token=meter.create_histogram(
            "gen_ai.server.time_to_first_token",
            unit="s",
            description="Time to the first output token",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        ),
        operation_duration=meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="Duration of a provider call",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        ),
        token_usage=meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Tokens per request by gen_ai.token.type",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        ),
        in_flight=LiveCount(
            meter, "sluice.in_flight", unit="{request}", description="Requests being processed"
        ),
        open_streams=LiveCount(
            meter, "sluice.streams.open", unit="{stream}", description="Open SSE streams"
        ),
        cost_usd=meter.create_counter(
            "sluice.cost", unit="USD", description="Priced cost by model and key"
        ),
        stream_backfilled=meter.create_counter(
            "sluice.stream.backfilled",
            unit="{event}",
            description="Stream events the live relay missed and read back from the store",
        ),
    )


Reading = tuple[float, Mapping[str, str]]


class _Gauges:
    """Observable gauges read from callbacks, one instrument per name for the process
    (several services, or several workers in a test, may register readers)."""

    def __init__(self) -> None:
        self._readers: dict[str, list[Callable[[], Iterable[Reading]]]] = {}

    def add(
        self, name: str, unit: str, description: str, reader: Callable[[], Iterable[Reading]]
    ) -> None:
        readers = self._readers.get(name)
        if readers is None:
            readers = self._readers[name] = []

            def observe(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
                return [
                    metrics.Observation(value, dict(attrs))
                    for read in list(readers)
                    for value, attrs in read()
                ]

            metrics.get_meter("sluice").create_observable_gauge(
                name, callbacks=[observe], unit=unit, description=description
            )
        readers.append(reader)


GAUGES = _Gauges()
