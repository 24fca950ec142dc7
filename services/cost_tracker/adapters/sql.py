"""SQL shared by the two ledger backends: the row of an entry, and the usage report
queries, written once with ``?`` placeholders (SQLite's; the PostgreSQL ledger numbers
them, ``numbered``). Both dialects divide integers as integers, so a UTC day or hour is
``occurred_unix_nanos / n * n`` in each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sluice.cost.v1 import cost_pb2

from services.cost_tracker.domain.usage import (
    NANOS_PER_DAY,
    NANOS_PER_HOUR,
    Dimension,
    LedgerEntry,
    ReportSpec,
    UsageAmounts,
    UsageFilter,
    UsageGroup,
    UsageReport,
)

COLUMNS: tuple[str, ...] = (
    "request_id",
    "key_id",
    "team_id",
    "model",
    "provider",
    "end_user",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "input_cost_nanos",
    "output_cost_nanos",
    "total_cost_nanos",
    "saved_cost_nanos",
    "price_version",
    "priced",
    "cache_hit",
    "outcome",
    "occurred_unix_nanos",
    "trace_id",
    "stream_seq",
)
COLUMN_LIST = ", ".join(COLUMNS)
HOUR_NANOS = NANOS_PER_HOUR


def row_of(e: LedgerEntry) -> tuple[Any, ...]:
    """The ledger row of an entry, in ``COLUMNS`` order."""
    return (
        e.request_id,
        e.key_id,
        e.team_id,
        e.model,
        e.provider,
        e.end_user,
        e.input_tokens,
        e.output_tokens,
        e.cached_input_tokens,
        e.reasoning_tokens,
        e.input_cost_nanos,
        e.output_cost_nanos,
        e.total_cost_nanos,
        e.saved_cost_nanos,
        e.price_version,
        int(e.priced),
        int(e.cache_hit),
        e.outcome,
        e.occurred_unix_nanos,
        e.trace_id,
        e.stream_seq,
    )


def entry_of(row: Sequence[Any], tags: Sequence[str] = ()) -> LedgerEntry:
    """An entry from a row in ``COLUMNS`` order (the total is derived, not read)."""
    values = dict(zip(COLUMNS, row, strict=True))
    return LedgerEntry(
        request_id=values["request_id"],
        key_id=values["key_id"],
        team_id=values["team_id"],
        model=values["model"],
        provider=values["provider"],
        input_tokens=int(values["input_tokens"]),
        output_tokens=int(values["output_tokens"]),
        cached_input_tokens=int(values["cached_input_tokens"]),
        reasoning_tokens=int(values["reasoning_tokens"]),
        input_cost_nanos=int(values["input_cost_nanos"]),
        output_cost_nanos=int(values["output_cost_nanos"]),
        price_version=values["price_version"],
        priced=bool(values["priced"]),
        cache_hit=bool(values["cache_hit"]),
        outcome=values["outcome"],
        occurred_unix_nanos=int(values["occurred_unix_nanos"]),
        trace_id=values["trace_id"],
        stream_seq=int(values["stream_seq"]),
        end_user=values["end_user"],
        tags=tuple(sorted(tags)),
        saved_cost_nanos=int(values["saved_cost_nanos"]),
    )


def unique_by_request(entries: Sequence[LedgerEntry]) -> tuple[list[int], list[bool]]:
    """The indexes of the first entry of each request id, and per entry whether it is
    such a first one (a repeat within a batch is never new)."""
    seen: set[str] = set()
    firsts: list[int] = []
    first: list[bool] = []
    for i, e in enumerate(entries):
        is_first = e.request_id not in seen
        seen.add(e.request_id)
        first.append(is_first)
        if is_first:
            firsts.append(i)
    return firsts, first


def where(f: UsageFilter, alias: str = "l") -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("key_id", f.key_id),
        ("team_id", f.team_id),
        ("model", f.model),
        ("provider", f.provider),
        ("end_user", f.end_user),
    ):
        if value:
            clauses.append(f"{alias}.{column} = ?")
            params.append(value)
    if f.since_unix_nanos:
        clauses.append(f"{alias}.occurred_unix_nanos >= ?")
        params.append(f.since_unix_nanos)
    if f.until_unix_nanos:
        clauses.append(f"{alias}.occurred_unix_nanos < ?")
        params.append(f.until_unix_nanos)
    if f.tag:
        clauses.append(
            f"EXISTS (SELECT 1 FROM ledger_tags x WHERE x.request_id = {alias}.request_id "
            "AND x.tag = ?)"
        )
        params.append(f.tag)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


_GROUP_EXPR = {
    Dimension.KEY: "l.key_id",
    Dimension.TEAM: "l.team_id",
    Dimension.END_USER: "l.end_user",
    Dimension.MODEL: "l.model",
    Dimension.PROVIDER: "l.provider",
    Dimension.TAG: "COALESCE(t.tag, '')",
    Dimension.DAY: f"(l.occurred_unix_nanos / {NANOS_PER_DAY}) * {NANOS_PER_DAY}",
    Dimension.HOUR: f"(l.occurred_unix_nanos / {NANOS_PER_HOUR}) * {NANOS_PER_HOUR}",
}
_AMOUNTS = (
    "COUNT(*), COALESCE(SUM(l.input_tokens), 0), COALESCE(SUM(l.output_tokens), 0), "
    "COALESCE(SUM(l.cached_input_tokens), 0), COALESCE(SUM(l.reasoning_tokens), 0), "
    "COALESCE(SUM(l.total_cost_nanos), 0), COALESCE(SUM(l.saved_cost_nanos), 0), "
    "COALESCE(SUM(l.cache_hit), 0)"
)
_AMOUNT_COUNT = 8


def report_sql(spec: ReportSpec) -> tuple[tuple[str, list[Any]], tuple[str, list[Any]] | None]:
    """The totals query, and the rows query (None without a grouping). The rows query
    asks for one row more than the limit, to tell a truncated answer."""
    cond, params = where(spec.filter)
    totals = (f"SELECT {_AMOUNTS} FROM ledger l{cond}", list(params))
    if not spec.group_by:
        return totals, None
    exprs = [_GROUP_EXPR[d] for d in spec.group_by]
    join = (
        " LEFT JOIN ledger_tags t ON t.request_id = l.request_id"
        if Dimension.TAG in spec.group_by
        else ""
    )
    positions = ", ".join(str(i + 1) for i in range(len(exprs)))
    rows = (
        f"SELECT {', '.join(exprs)}, {_AMOUNTS} FROM ledger l{join}{cond} "
        f"GROUP BY {positions} ORDER BY {positions} LIMIT ?",
        [*params, spec.limit + 1],
    )
    return totals, rows


def amounts_of(values: Sequence[Any]) -> UsageAmounts:
    # PostgreSQL sums bigints as numeric (Decimal): exact, made int here.
    n = [int(v) for v in values]
    return UsageAmounts(*n)


def report_of(
    spec: ReportSpec, totals_row: Sequence[Any], rows: Sequence[Sequence[Any]]
) -> UsageReport:
    dims = spec.group_by
    groups: list[UsageGroup] = []
    for row in rows[: spec.limit]:
        key: dict[Dimension, str | int] = {}
        for i, dim in enumerate(dims):
            value = row[i]
            key[dim] = int(value) if dim in (Dimension.DAY, Dimension.HOUR) else str(value)
        groups.append(UsageGroup(key, amounts_of(row[len(dims) : len(dims) + _AMOUNT_COUNT])))
    return UsageReport(dims, groups, amounts_of(totals_row), truncated=len(rows) > spec.limit)


def numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, ...`` (no literal here holds a ``?``)."""
    parts = sql.split("?")
    out = [parts[0]]
    for i, part in enumerate(parts[1:], start=1):
        out.append(f"${i}{part}")
    return "".join(out)


def spend_sql(
    column: str, ids: Sequence[str], since_unix: int, until_unix: int
) -> tuple[str, list[Any]]:
    """Spend per (key or team, hour) of ``spend_hourly`` in ``[since, until)``."""
    if column not in ("key_id", "team_id"):
        raise ValueError(column)
    marks = ", ".join("?" * len(ids))
    sql = (
        f"SELECT {column}, hour_start_unix, SUM(cost_nanos) FROM spend_hourly "
        f"WHERE {column} IN ({marks}) AND hour_start_unix >= ? AND hour_start_unix < ? "
        "GROUP BY 1, 2"
    )
    return sql, [*ids, since_unix, until_unix]


INSERT_ALERT = (
    "INSERT INTO spend_alerts (alert_id, kind, scope, key_id, team_id, period, "
    "period_start_unix, threshold_percent, spend_nanos, budget_nanos, created_unix_nanos) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (alert_id) DO NOTHING"
)


def alert_row(a: cost_pb2.SpendAlert) -> tuple[Any, ...]:
    return (
        a.alert_id,
        a.kind,
        a.scope,
        a.key_id,
        a.team_id,
        a.period,
        a.period_start_unix,
        a.threshold_percent,
        a.spend_usd_nanos,
        a.budget_usd_nanos or a.baseline_usd_nanos,
        a.at_unix_nanos,
    )
