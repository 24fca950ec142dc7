"""Pricing usage into ledger entries, and the shapes of usage queries.

Money is exact: prices are ``Decimal`` (``sluice.pricing``), and every amount the ledger
stores is an integer number of **nano-dollars** (1 USD = 10**9 nano-USD), rounded half
to even once per event and per component (input, output). The total of an event is
the sum of its two stored components, so sums over the ledger are exact integer sums;
an int64 holds 9.2 billion USD. Floats appear only at the edge, in the proto ``double``
fields of ``CostEvent``/``UsageSummary``, converted from the exact integers.

A usage event's entry keeps the trace it travelled in (``price_delivered``), and the
ledger is read through the ``UsageReader`` protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Protocol

from opentelemetry import trace
from sluice import telemetry
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.pricing import PriceTable

NANOS_PER_USD = 1_000_000_000
_NANOS_PER_USD_DEC = Decimal(NANOS_PER_USD)


def usd_to_nanos(usd: Decimal) -> int:
    """Exact USD to integer nano-dollars, rounded half to even."""
    return int((usd * _NANOS_PER_USD_DEC).to_integral_value(rounding=ROUND_HALF_EVEN))


def nanos_to_usd(nanos: int) -> Decimal:
    """Integer nano-dollars to an exact ``Decimal`` USD amount."""
    return Decimal(nanos).scaleb(-9)


def nanos_to_float(nanos: int) -> float:
    """For proto ``double`` fields and metrics only; never for arithmetic."""
    return nanos / NANOS_PER_USD


@dataclass(frozen=True)
class LedgerEntry:
    """One priced request: a row of the ledger, keyed by ``request_id``."""

    request_id: str
    key_id: str
    team_id: str
    model: str
    provider: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    input_cost_nanos: int
    output_cost_nanos: int
    price_version: str
    # False when the model has no price: recorded at zero cost so that it can be found
    # (and re-priced by a rebuild) once the price table knows it.
    priced: bool
    cache_hit: bool
    outcome: str
    occurred_unix_nanos: int
    trace_id: str
    # Sequence of the usage message in SLUICE_USAGE (0 when unknown): provenance.
    stream_seq: int = 0

    @property
    def total_cost_nanos(self) -> int:
        return self.input_cost_nanos + self.output_cost_nanos

    @property
    def total_cost_usd(self) -> Decimal:
        return nanos_to_usd(self.total_cost_nanos)

    def usage(self) -> chat_pb2.Usage:
        return chat_pb2.Usage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cached_input_tokens=self.cached_input_tokens,
            reasoning_tokens=self.reasoning_tokens,
        )

    def to_cost_event(self) -> cost_pb2.CostEvent:
        return cost_pb2.CostEvent(
            request_id=self.request_id,
            key_id=self.key_id,
            team_id=self.team_id,
            model=self.model,
            provider=self.provider,
            usage=self.usage(),
            input_cost_usd=nanos_to_float(self.input_cost_nanos),
            output_cost_usd=nanos_to_float(self.output_cost_nanos),
            total_cost_usd=nanos_to_float(self.total_cost_nanos),
            price_version=self.price_version,
            occurred_unix_nanos=self.occurred_unix_nanos,
            cache_hit=self.cache_hit,
            outcome=self.outcome,
        )


class InvalidUsageEvent(ValueError):
    """A usage event that cannot be recorded (no request id to make it idempotent)."""


class InvalidQuery(ValueError):
    """A usage query that cannot be answered as asked."""


class LedgerUnavailable(RuntimeError):
    """The ledger can no longer be used (it was closed: the service is stopping)."""


class Pricer:
    """Prices usage events with one price table and remembers which models it lacks."""

    def __init__(self, table: PriceTable) -> None:
        self.table = table
        self._unpriced_models: set[str] = set()

    def price(self, event: cost_pb2.UsageEvent, *, stream_seq: int = 0) -> LedgerEntry:
        """The ledger entry of ``event``.

        The model is the one served (a fallback chain may serve another than requested;
        the requested one stands in when none was served). A cache hit costs nothing: no
        provider was called. A failed or interrupted request is billed for the tokens it
        actually consumed, which the worker reports in ``usage``. A model without a price
        costs zero and the entry says so (``priced=False``).
        """
        if not event.request_id:
            raise InvalidUsageEvent("usage event without request_id")
        model = event.model_served or event.model_requested
        usage = event.usage
        if event.cache_hit:
            input_nanos = output_nanos = 0
            priced = True
        elif self.table.price_for(model) is None:
            input_nanos = output_nanos = 0
            priced = False
        else:
            cost = self.table.price(model, usage)
            input_nanos = usd_to_nanos(cost.input_usd)
            output_nanos = usd_to_nanos(cost.output_usd)
            priced = True
        return LedgerEntry(
            request_id=event.request_id,
            key_id=event.key_id,
            team_id=event.team_id,
            model=model,
            provider=event.provider,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            input_cost_nanos=input_nanos,
            output_cost_nanos=output_nanos,
            price_version=self.table.version,
            priced=priced,
            cache_hit=event.cache_hit,
            outcome=event.outcome,
            occurred_unix_nanos=event.occurred_unix_nanos,
            trace_id=event.trace_id,
            stream_seq=stream_seq,
        )

    def price_delivered(
        self, event: cost_pb2.UsageEvent, *, headers: Mapping[str, str] | None, stream_seq: int
    ) -> LedgerEntry:
        """The entry of a usage event as it arrived from the stream, as the live
        consumer and a rebuild both make it.

        An event without a trace id keeps the trace it travelled in (the ``traceparent``
        header), so its row still leads to a trace; taken from the message, not from a
        new span, a rebuild reproduces it."""
        entry = self.price(event, stream_seq=stream_seq)
        if not entry.trace_id:
            ctx = trace.get_current_span(telemetry.extract(headers)).get_span_context()
            if ctx.is_valid:
                entry = replace(entry, trace_id=f"{ctx.trace_id:032x}")
        return entry

    def first_time_unpriced(self, model: str) -> bool:
        """True the first time ``model`` is reported unpriced (warn once per model)."""
        if model in self._unpriced_models:
            return False
        self._unpriced_models.add(model)
        return True


@dataclass(frozen=True)
class UsageFilter:
    """Empty strings and zero times match everything; ``since`` is inclusive, ``until``
    exclusive, both on the event's ``occurred_unix_nanos``."""

    key_id: str = ""
    team_id: str = ""
    model: str = ""
    since_unix_nanos: int = 0
    until_unix_nanos: int = 0

    @classmethod
    def from_query(cls, query: cost_pb2.UsageQuery) -> UsageFilter:
        if query.since_unix_nanos < 0 or query.until_unix_nanos < 0:
            raise InvalidQuery("times must not be negative")
        if query.until_unix_nanos and query.since_unix_nanos >= query.until_unix_nanos:
            raise InvalidQuery("since_unix_nanos must be before until_unix_nanos")
        return cls(
            key_id=query.key_id,
            team_id=query.team_id,
            model=query.model,
            since_unix_nanos=query.since_unix_nanos,
            until_unix_nanos=query.until_unix_nanos,
        )


@dataclass(frozen=True)
class UsageTotals:
    """Usage and cost of one (key, model) pair."""

    key_id: str
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    total_cost_nanos: int


class UsageReader(Protocol):
    """The ledger as queries read it."""

    async def totals(self, f: UsageFilter) -> list[UsageTotals]:
        """Usage and cost grouped by key and model, ordered by key then model; raises
        ``LedgerUnavailable`` once the ledger is closed."""


def summarize(rows: list[UsageTotals]) -> cost_pb2.UsageSummary:
    """The ``UsageSummary`` of grouped totals; the grand total is summed exactly."""
    summary = cost_pb2.UsageSummary(
        requests=sum(r.requests for r in rows),
        total_cost_usd=nanos_to_float(sum(r.total_cost_nanos for r in rows)),
    )
    for r in rows:
        summary.rows.append(
            cost_pb2.UsageRow(
                key_id=r.key_id,
                model=r.model,
                requests=r.requests,
                usage=chat_pb2.Usage(
                    input_tokens=r.input_tokens,
                    output_tokens=r.output_tokens,
                    cached_input_tokens=r.cached_input_tokens,
                    reasoning_tokens=r.reasoning_tokens,
                ),
                total_cost_usd=nanos_to_float(r.total_cost_nanos),
            )
        )
    return summary
