"""The SQLite ledger: a materialized view of SLUICE_USAGE, one row per request id.

Exactly-once comes from the primary key: an insert that does nothing on a conflicting
``request_id`` makes a redelivered (or republished) usage event a no-op, and the caller
learns which rows were new. Amounts are integer nano-dollars (see ``domain.usage``).

SQLite calls block, so none runs on the event loop: all writes go through one dedicated
thread that owns the write connection (one writer is all SQLite allows anyway, and a
batch is one transaction), and reads through another thread with its own connection,
which WAL mode lets run beside the writer.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from services.cost_tracker.domain.usage import (
    LedgerEntry,
    LedgerUnavailable,
    UsageFilter,
    UsageTotals,
)

T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    request_id          TEXT PRIMARY KEY,
    key_id              TEXT NOT NULL,
    team_id             TEXT NOT NULL,
    model               TEXT NOT NULL,
    provider            TEXT NOT NULL,
    input_tokens        INTEGER NOT NULL,
    output_tokens       INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    reasoning_tokens    INTEGER NOT NULL,
    input_cost_nanos    INTEGER NOT NULL,
    output_cost_nanos   INTEGER NOT NULL,
    total_cost_nanos    INTEGER NOT NULL,
    price_version       TEXT NOT NULL,
    priced              INTEGER NOT NULL,
    cache_hit           INTEGER NOT NULL,
    outcome             TEXT NOT NULL,
    occurred_unix_nanos INTEGER NOT NULL,
    trace_id            TEXT NOT NULL,
    stream_seq          INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ledger_key_time ON ledger (key_id, occurred_unix_nanos);
CREATE INDEX IF NOT EXISTS ledger_team_time ON ledger (team_id, occurred_unix_nanos);
CREATE INDEX IF NOT EXISTS ledger_time ON ledger (occurred_unix_nanos);
"""

_COLUMNS = (
    "request_id, key_id, team_id, model, provider, input_tokens, output_tokens, "
    "cached_input_tokens, reasoning_tokens, input_cost_nanos, output_cost_nanos, "
    "total_cost_nanos, price_version, priced, cache_hit, outcome, occurred_unix_nanos, "
    "trace_id, stream_seq"
)
# ON CONFLICT on the key rather than INSERT OR IGNORE: OR IGNORE would also swallow a
# NOT NULL violation and report a broken row as a harmless duplicate.
_INSERT = (
    f"INSERT INTO ledger ({_COLUMNS}) VALUES ({', '.join('?' * 19)}) "
    "ON CONFLICT (request_id) DO NOTHING"
)


class LedgerClosedError(LedgerUnavailable):
    """The ledger was closed (the service is stopping)."""


def _row(e: LedgerEntry) -> tuple[Any, ...]:
    return (
        e.request_id,
        e.key_id,
        e.team_id,
        e.model,
        e.provider,
        e.input_tokens,
        e.output_tokens,
        e.cached_input_tokens,
        e.reasoning_tokens,
        e.input_cost_nanos,
        e.output_cost_nanos,
        e.total_cost_nanos,
        e.price_version,
        int(e.priced),
        int(e.cache_hit),
        e.outcome,
        e.occurred_unix_nanos,
        e.trace_id,
        e.stream_seq,
    )


def _entry(row: sqlite3.Row) -> LedgerEntry:
    return LedgerEntry(
        request_id=row["request_id"],
        key_id=row["key_id"],
        team_id=row["team_id"],
        model=row["model"],
        provider=row["provider"],
        input_tokens=row["input_tokens"],
        output_tokens=row["output_tokens"],
        cached_input_tokens=row["cached_input_tokens"],
        reasoning_tokens=row["reasoning_tokens"],
        input_cost_nanos=row["input_cost_nanos"],
        output_cost_nanos=row["output_cost_nanos"],
        price_version=row["price_version"],
        priced=bool(row["priced"]),
        cache_hit=bool(row["cache_hit"]),
        outcome=row["outcome"],
        occurred_unix_nanos=row["occurred_unix_nanos"],
        trace_id=row["trace_id"],
        stream_seq=row["stream_seq"],
    )


def _where(f: UsageFilter) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (("key_id", f.key_id), ("team_id", f.team_id), ("model", f.model)):
        if value:
            clauses.append(f"{column} = ?")
            params.append(value)
    if f.since_unix_nanos:
        clauses.append("occurred_unix_nanos >= ?")
        params.append(f.since_unix_nanos)
    if f.until_unix_nanos:
        clauses.append("occurred_unix_nanos < ?")
        params.append(f.until_unix_nanos)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


class Ledger:
    """Async facade over one SQLite file.

    ``bulk=True`` is for building a fresh file that is thrown away on failure (the
    rebuild): no journal and no fsync per transaction, because a crash just restarts
    the rebuild. The live ledger uses WAL with ``synchronous=FULL``, since messages are
    acked once their transaction commits.
    """

    def __init__(self, path: Path, *, bulk: bool = False) -> None:
        self.path = path
        self._bulk = bulk
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ledger-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="ledger-reader")
        # Each executor's single thread owns its connection; sqlite3 connections must
        # stay on the thread that made them.
        self._local = threading.local()
        self._closed = False

    # --- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self._on(self._writer, self._init_schema)
        # The reader connects only after the schema and journal mode exist.
        await self._on(self._reader, self._conn)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        for executor in (self._reader, self._writer):
            await loop.run_in_executor(executor, self._close_conn)
            executor.shutdown(wait=True)

    # --- writes -----------------------------------------------------------------------

    async def record(self, entries: Sequence[LedgerEntry]) -> list[bool]:
        """Insert ``entries`` in one transaction; per entry, whether it was new.

        An entry whose request id is already recorded (or repeated earlier in the same
        batch) is ignored and reported False. Raises on any SQLite error, having rolled
        the whole batch back, so that the caller can leave its messages unacked.
        """
        if not entries:
            return []
        rows = [_row(e) for e in entries]
        return await self._on(self._writer, self._record_sync, rows)

    def _record_sync(self, rows: list[tuple[Any, ...]]) -> list[bool]:
        conn = self._conn()
        inserted: list[bool] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for row in rows:
                inserted.append(conn.execute(_INSERT, row).rowcount == 1)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return inserted

    # --- reads ------------------------------------------------------------------------

    async def totals(self, f: UsageFilter) -> list[UsageTotals]:
        """Usage and cost grouped by key and model, ordered by key then model."""
        where, params = _where(f)
        sql = (
            "SELECT key_id, model, COUNT(*) AS requests, SUM(input_tokens), "
            "SUM(output_tokens), SUM(cached_input_tokens), SUM(reasoning_tokens), "
            f"SUM(total_cost_nanos) FROM ledger{where} GROUP BY key_id, model "
            "ORDER BY key_id, model"
        )
        rows = await self._on(self._reader, self._fetch, sql, params)
        return [UsageTotals(*tuple(r)) for r in rows]

    async def entries(self, f: UsageFilter) -> list[LedgerEntry]:
        """The recorded entries matching ``f``, oldest first."""
        where, params = _where(f)
        sql = f"SELECT {_COLUMNS} FROM ledger{where} ORDER BY occurred_unix_nanos, request_id"
        rows = await self._on(self._reader, self._fetch, sql, params)
        return [_entry(r) for r in rows]

    def _fetch(self, sql: str, params: list[Any]) -> list[sqlite3.Row]:
        return self._conn().execute(sql, params).fetchall()

    # --- plumbing ---------------------------------------------------------------------

    async def _on(self, executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise LedgerClosedError(str(self.path))
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE above).
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 5000")
            self._local.conn = conn
        return conn

    def _init_schema(self) -> None:
        conn = self._conn()
        if self._bulk:
            conn.execute("PRAGMA journal_mode = OFF")
            conn.execute("PRAGMA synchronous = OFF")
        else:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(
                f"{self.path} has ledger schema {version}, expected {SCHEMA_VERSION}; "
                "rebuild it with `python -m services.cost_tracker --rebuild`"
            )
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _close_conn(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
