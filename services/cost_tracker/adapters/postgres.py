"""The ledger on PostgreSQL (``SLUICE_COST_DATABASE_URL``), for several cost-trackers
writing one ledger: the same tables and queries as the SQLite one (``adapters.schema``,
``adapters.sql``), over an asyncpg pool.

**Exactly once across replicas.** The ledger's primary key is the request id. A batch
is one statement: the rows ``INSERT ... ON CONFLICT (request_id) DO NOTHING
RETURNING request_id``, and, from what that returned (the rows new to the ledger),
their tags and their addition to ``spend_hourly``. So a usage event that two replicas
hold at once (a redelivery after one's ack wait ran out) is inserted by one; the
other's insert waits for that transaction on the unique index and then does nothing,
and a row counts in the hourly spend only when it was new. Nothing is checked in
memory.

**Locks in one order.** Two batches that share request ids or (key, hour) slots take
their row locks in request-id order and in (key, hour) order, so they queue behind each
other instead of deadlocking; if PostgreSQL still reports a deadlock or a lost
connection, the statement rolled back as a whole, and the consumer naks the batch
(``Transient``) for a redelivery.

**Migrations** run at open, in one transaction under a transaction-level advisory lock
(``pg_advisory_xact_lock``), so replicas starting together apply them once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from sluice.cost.v1 import cost_pb2

from services.cost_tracker.adapters.schema import DERIVED_TABLES, pending
from services.cost_tracker.adapters.sql import (
    COLUMN_LIST,
    COLUMNS,
    INSERT_ALERT,
    alert_row,
    entry_of,
    numbered,
    report_of,
    report_sql,
    row_of,
    spend_sql,
    unique_by_request,
    where,
)
from services.cost_tracker.domain.usage import (
    LedgerEntry,
    LedgerUnavailable,
    ReportSpec,
    UsageFilter,
    UsageReport,
)

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key of the schema migrations ("sluice" in ASCII).
MIGRATION_LOCK = 0x736C75696365

_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS ledger_schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""

_TYPES = {
    "priced": "smallint",
    "cache_hit": "smallint",
    "model": "text",
    "provider": "text",
    "end_user": "text",
    "price_version": "text",
    "outcome": "text",
    "trace_id": "text",
    "request_id": "text",
    "key_id": "text",
    "team_id": "text",
}
_ARRAYS = ", ".join(f"${i + 1}::{_TYPES.get(c, 'bigint')}[]" for i, c in enumerate(COLUMNS))
_TAGS_AT = len(COLUMNS) + 1
_RECORD = f"""
WITH input AS (
    SELECT * FROM unnest({_ARRAYS}) AS u({COLUMN_LIST})
), new AS (
    INSERT INTO ledger ({COLUMN_LIST})
    SELECT {COLUMN_LIST} FROM input ORDER BY request_id
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id, key_id, team_id, occurred_unix_nanos, total_cost_nanos
), tagged AS (
    INSERT INTO ledger_tags (tag, request_id)
    SELECT t.tag, t.request_id
    FROM unnest(${_TAGS_AT}::text[], ${_TAGS_AT + 1}::text[]) AS t(request_id, tag)
    WHERE t.request_id IN (SELECT request_id FROM new)
    ORDER BY t.tag, t.request_id
    ON CONFLICT DO NOTHING
), hourly AS (
    INSERT INTO spend_hourly (key_id, hour_start_unix, team_id, cost_nanos, requests)
    SELECT key_id, (occurred_unix_nanos / 3600000000000) * 3600, MAX(team_id),
           SUM(total_cost_nanos), COUNT(*)
    FROM new GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (key_id, hour_start_unix) DO UPDATE SET
        cost_nanos = spend_hourly.cost_nanos + EXCLUDED.cost_nanos,
        requests = spend_hourly.requests + EXCLUDED.requests
)
SELECT request_id FROM new
"""


class PostgresUnavailable(LedgerUnavailable):
    """The PostgreSQL ledger is closed or its pool cannot serve (the service is stopping)."""


def redacted(url: str) -> str:
    """The database URL without credentials or query, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or "(socket)"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


async def _record_on(conn: Any, entries: Sequence[LedgerEntry]) -> list[bool]:
    if not entries:
        return []
    firsts, first = unique_by_request(entries)
    unique = sorted((entries[i] for i in firsts), key=lambda e: e.request_id)
    columns = [list(c) for c in zip(*(row_of(e) for e in unique), strict=True)]
    tag_requests = [e.request_id for e in unique for _ in e.tags]
    tags = [t for e in unique for t in e.tags]
    rows = await conn.fetch(_RECORD, *columns, tag_requests, tags)
    new = {r[0] for r in rows}
    return [first[i] and e.request_id in new for i, e in enumerate(entries)]


class _ConnectionWriter:
    """Records batches on one connection, inside its caller's transaction (a rebuild)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def record(self, entries: Sequence[LedgerEntry]) -> list[bool]:
        return await _record_on(self._conn, entries)


class PostgresLedger:
    """The ledger in a PostgreSQL database, shared by every cost-tracker replica."""

    def __init__(self, url: str, *, pool_size: int = 4, command_timeout: float = 30.0) -> None:
        self._url = url
        self.where = redacted(url)
        self._pool_size = pool_size
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._closed = False

    # --- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._url,
            min_size=1,
            max_size=self._pool_size,
            command_timeout=self._command_timeout,
        )
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(_MIGRATIONS_TABLE)
            current = await conn.fetchval(
                "SELECT COALESCE(MAX(version), 0) FROM ledger_schema_migrations"
            )
            for migration in pending(int(current)):
                await conn.execute(migration.postgres)
                await conn.execute(
                    "INSERT INTO ledger_schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
                log.info(
                    "ledger %s: schema migration %d (%s) applied",
                    self.where,
                    migration.version,
                    migration.name,
                )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _ready(self) -> asyncpg.Pool:
        if self._closed or self._pool is None:
            raise PostgresUnavailable(self.where)
        return self._pool

    # --- writes -----------------------------------------------------------------------

    async def record(self, entries: Sequence[LedgerEntry]) -> list[bool]:
        """Insert ``entries`` in one statement (one transaction); per entry, whether it
        was new. Raises, having changed nothing, when it could not commit."""
        if not entries:
            return []
        async with self._ready().acquire() as conn:
            return await _record_on(conn, entries)

    @contextlib.asynccontextmanager
    async def rebuilding(self) -> AsyncIterator[_ConnectionWriter]:
        """The derived tables emptied and refilled in one transaction: the rebuild's
        rows become visible together when it commits, and a failed rebuild leaves the
        ledger as it was. Writers and readers of those tables wait meanwhile (the lock
        is exclusive); ``spend_alerts`` is not touched."""
        async with self._ready().acquire() as conn, conn.transaction():
            tables = ", ".join(DERIVED_TABLES)
            await conn.execute(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE")
            await conn.execute(f"TRUNCATE {tables}")
            yield _ConnectionWriter(conn)

    # --- spend and alerts (domain.alerts) ----------------------------------------------

    async def spend_by(
        self, column: str, ids: Sequence[str], since_unix: int, until_unix: int
    ) -> dict[tuple[str, int], int]:
        sql, params = spend_sql(column, ids, since_unix, until_unix)
        async with self._ready().acquire() as conn:
            rows = await conn.fetch(numbered(sql), *params)
        return {(r[0], int(r[1])): int(r[2]) for r in rows}

    async def alerts_known(self, alert_ids: Sequence[str]) -> set[str]:
        if not alert_ids:
            return set()
        async with self._ready().acquire() as conn:
            rows = await conn.fetch(
                "SELECT alert_id FROM spend_alerts WHERE alert_id = ANY($1::text[])",
                list(alert_ids),
            )
        return {r[0] for r in rows}

    async def save_alerts(self, alerts: Sequence[cost_pb2.SpendAlert]) -> None:
        if not alerts:
            return
        async with self._ready().acquire() as conn, conn.transaction():
            await conn.executemany(numbered(INSERT_ALERT), [alert_row(a) for a in alerts])

    # --- reads ------------------------------------------------------------------------

    async def report(self, spec: ReportSpec) -> UsageReport:
        (totals_sql, totals_params), rows_query = report_sql(spec)
        async with self._ready().acquire() as conn:
            totals = await conn.fetchrow(numbered(totals_sql), *totals_params)
            rows = await conn.fetch(numbered(rows_query[0]), *rows_query[1]) if rows_query else []
        return report_of(spec, tuple(totals), [tuple(r) for r in rows])

    async def entries(self, f: UsageFilter) -> list[LedgerEntry]:
        """The recorded entries matching ``f``, oldest first, with their tags."""
        cond, params = where(f)
        sql = (
            f"SELECT {', '.join('l.' + c for c in COLUMNS)}, "
            "ARRAY(SELECT tag FROM ledger_tags x WHERE x.request_id = l.request_id) "
            f"FROM ledger l{cond} ORDER BY l.occurred_unix_nanos, l.request_id"
        )
        async with self._ready().acquire() as conn:
            rows = await conn.fetch(numbered(sql), *params)
        return [entry_of(tuple(r)[: len(COLUMNS)], r[len(COLUMNS)]) for r in rows]
