"""Pricing usage into ledger entries, and the shapes of usage queries.

Money is exact: prices are ``Decimal`` (``sluice.pricing``), and every amount the ledger
stores is an integer number of **nano-dollars** (1 USD = 10**9 nano-USD), rounded half
to even once per event and per component (input, output). The total of an event is
the sum of its two stored components, so sums over the ledger are exact integer sums;
an int64 holds 9.2 billion USD. Floats appear only at the edge, in the proto ``double``
fields of ``CostEvent``/``UsageSummary``, converted from the exact integers.

A cache hit costs nothing and records what it **saved**: what its answer cost when it
was made (``UsageEvent.cache_saved_usd_nanos``, from the cached ``Final``), or, for an
answer cached before that was carried, its usage at today's prices.

A usage event's entry keeps the trace it travelled in (``price_delivered``), and the
ledger is read through the ``UsageReader`` protocol: a ``ReportSpec`` (filters, the
dimensions to group by, a row limit) in, a ``UsageReport`` out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import StrEnum
from typing import Protocol

from opentelemetry import trace
from sluice import telemetry
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.pricing import NANOS_PER_USD, PriceTable, nanos_to_usd, usd_to_nanos

__all__ = ["NANOS_PER_USD", "nanos_to_usd", "usd_to_nanos"]


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
    end_user: str = ""
    # Sorted and unique.
    tags: tuple[str, ...] = ()
    # Of a cache hit: what its answer cost when it was made.
    saved_cost_nanos: int = 0

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
            total_cost_usd_nanos=self.total_cost_nanos,
            saved_usd_nanos=self.saved_cost_nanos,
            end_user=self.end_user,
            tags=self.tags,
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
        input_nanos = output_nanos = saved_nanos = 0
        known = self.table.price_for(model) is not None
        if event.cache_hit:
            priced = True
            if event.HasField("cache_saved_usd_nanos"):
                saved_nanos = max(0, event.cache_saved_usd_nanos)
            elif known:
                # Cached before the answer's cost travelled with it: today's price.
                saved_nanos = self.table.price(model, usage).total_nanos
        elif not known:
            priced = False
        else:
            cost = self.table.price(model, usage)
            input_nanos = cost.input_nanos
            output_nanos = cost.output_nanos
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
            end_user=event.end_user,
            tags=tuple(sorted(set(event.tags))),
            saved_cost_nanos=saved_nanos,
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


class Dimension(StrEnum):
    """What usage can be grouped by (``cost_pb2.UsageDimension``); days and hours UTC."""

    KEY = "key"
    TEAM = "team"
    END_USER = "end_user"
    MODEL = "model"
    PROVIDER = "provider"
    TAG = "tag"
    DAY = "day"
    HOUR = "hour"


TIME_DIMENSIONS = frozenset({Dimension.DAY, Dimension.HOUR})
NANOS_PER_HOUR = 3600 * 1_000_000_000
NANOS_PER_DAY = 24 * NANOS_PER_HOUR

_DIMENSION_OF_PROTO = {
    cost_pb2.USAGE_DIMENSION_KEY: Dimension.KEY,
    cost_pb2.USAGE_DIMENSION_TEAM: Dimension.TEAM,
    cost_pb2.USAGE_DIMENSION_END_USER: Dimension.END_USER,
    cost_pb2.USAGE_DIMENSION_MODEL: Dimension.MODEL,
    cost_pb2.USAGE_DIMENSION_PROVIDER: Dimension.PROVIDER,
    cost_pb2.USAGE_DIMENSION_TAG: Dimension.TAG,
    cost_pb2.USAGE_DIMENSION_DAY: Dimension.DAY,
    cost_pb2.USAGE_DIMENSION_HOUR: Dimension.HOUR,
}
PROTO_OF_DIMENSION = {d: p for p, d in _DIMENSION_OF_PROTO.items()}

# The grouping of a query that names none: what QueryUsage always returned.
DEFAULT_GROUP_BY: tuple[Dimension, ...] = (Dimension.KEY, Dimension.MODEL)
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000


@dataclass(frozen=True)
class UsageFilter:
    """Empty strings and zero times match everything; ``since`` is inclusive, ``until``
    exclusive, both on the event's ``occurred_unix_nanos``; ``tag`` keeps the requests
    carrying that tag."""

    key_id: str = ""
    team_id: str = ""
    model: str = ""
    since_unix_nanos: int = 0
    until_unix_nanos: int = 0
    provider: str = ""
    end_user: str = ""
    tag: str = ""


@dataclass(frozen=True)
class ReportSpec:
    """One usage query: which requests, grouped by what (in that order), how many rows."""

    filter: UsageFilter = field(default_factory=UsageFilter)
    group_by: tuple[Dimension, ...] = DEFAULT_GROUP_BY
    limit: int = DEFAULT_LIMIT

    @classmethod
    def of(
        cls,
        f: UsageFilter,
        group_by: tuple[Dimension, ...] | list[Dimension] = DEFAULT_GROUP_BY,
        limit: int = 0,
    ) -> ReportSpec:
        """A checked spec; raises ``InvalidQuery`` with what to change."""
        if f.since_unix_nanos < 0 or f.until_unix_nanos < 0:
            raise InvalidQuery("times must not be negative")
        if f.until_unix_nanos and f.since_unix_nanos >= f.until_unix_nanos:
            raise InvalidQuery("since must be before until")
        dims = tuple(group_by)
        if len(set(dims)) != len(dims):
            raise InvalidQuery("group_by names a dimension twice")
        if Dimension.DAY in dims and Dimension.HOUR in dims:
            raise InvalidQuery("group_by takes day or hour, not both")
        if limit < 0 or limit > MAX_LIMIT:
            raise InvalidQuery(f"limit must be between 1 and {MAX_LIMIT}")
        return cls(f, dims, limit or DEFAULT_LIMIT)

    @classmethod
    def from_query(cls, query: cost_pb2.UsageQuery) -> ReportSpec:
        dims: list[Dimension] = []
        for value in query.group_by:
            dim = _DIMENSION_OF_PROTO.get(value)
            if dim is None:
                raise InvalidQuery(f"group_by has an unknown dimension ({value})")
            dims.append(dim)
        return cls.of(
            UsageFilter(
                key_id=query.key_id,
                team_id=query.team_id,
                model=query.model,
                since_unix_nanos=query.since_unix_nanos,
                until_unix_nanos=query.until_unix_nanos,
                provider=query.provider,
                end_user=query.end_user,
                tag=query.tag,
            ),
            tuple(dims) or DEFAULT_GROUP_BY,
            query.limit,
        )


@dataclass(frozen=True)
class UsageAmounts:
    """What a set of requests used, cost and saved (exact nano-USD)."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nanos: int = 0
    saved_nanos: int = 0
    cache_hits: int = 0

    def usage(self) -> chat_pb2.Usage:
        return chat_pb2.Usage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cached_input_tokens=self.cached_input_tokens,
            reasoning_tokens=self.reasoning_tokens,
        )


# A group's value for each dimension: text, or the start (unix nanos) of a day or hour.
GroupKey = dict[Dimension, str | int]


@dataclass(frozen=True)
class UsageGroup:
    key: GroupKey
    amounts: UsageAmounts


@dataclass(frozen=True)
class UsageReport:
    group_by: tuple[Dimension, ...]
    rows: list[UsageGroup]
    # Every matching request once, whatever its tags.
    totals: UsageAmounts
    truncated: bool = False


class UsageReader(Protocol):
    """The ledger as queries read it."""

    async def report(self, spec: ReportSpec) -> UsageReport:
        """Usage grouped as ``spec`` asks, rows ordered by the group values; raises
        ``LedgerUnavailable`` once the ledger is closed."""


def summarize(report: UsageReport) -> cost_pb2.UsageSummary:
    """The ``UsageSummary`` of a report: exact nano-USD beside the derived doubles."""
    t = report.totals
    summary = cost_pb2.UsageSummary(
        requests=t.requests,
        total_cost_usd=nanos_to_float(t.cost_nanos),
        cost_usd_nanos=t.cost_nanos,
        saved_usd_nanos=t.saved_nanos,
        cache_hits=t.cache_hits,
        usage=t.usage(),
        truncated=report.truncated,
        group_by=[PROTO_OF_DIMENSION[d] for d in report.group_by],
    )
    for group in report.rows:
        a = group.amounts
        row = cost_pb2.UsageRow(
            requests=a.requests,
            usage=a.usage(),
            total_cost_usd=nanos_to_float(a.cost_nanos),
            cost_usd_nanos=a.cost_nanos,
            saved_usd_nanos=a.saved_nanos,
            cache_hits=a.cache_hits,
        )
        for dim, value in group.key.items():
            if dim in TIME_DIMENSIONS:
                row.period_start_unix_nanos = int(value)
            else:
                setattr(row, _ROW_FIELD[dim], str(value))
        summary.rows.append(row)
    return summary


_ROW_FIELD = {
    Dimension.KEY: "key_id",
    Dimension.TEAM: "team_id",
    Dimension.END_USER: "end_user",
    Dimension.MODEL: "model",
    Dimension.PROVIDER: "provider",
    Dimension.TAG: "tag",
}
