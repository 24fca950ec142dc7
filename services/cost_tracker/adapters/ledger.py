"""The SQLite ledger (the embedded default): a materialized view of SLUICE_USAGE, one
row per request id. ``adapters.postgres`` is the same ledger on PostgreSQL, for
several cost-trackers; ``adapters.schema`` is the schema of both, as migrations.

Exactly-once comes from the primary key: an insert that does nothing on a conflicting
``request_id`` makes a redelivered (or republished) usage event a no-op, and the caller
learns which rows were new. A new row's tags and its share of the key's hourly spend
are written in the same transaction. Amounts are integer nano-dollars (see
``domain.usage``).

SQLite calls block, so none runs on the event loop: all writes go through one dedicated
thread that owns the write connection (one writer is all SQLite allows anyway, and a
batch is one transaction), and reads through another thread with its own connection,
which WAL mode lets run beside the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sluice.cost.v1.cost_pb2 import SpendAlert

from services.cost_tracker.adapters.schema import pending
from services.cost_tracker.adapters.sql import (
    COLUMN_LIST,
    COLUMNS,
    HOUR_NANOS,
    INSERT_ALERT,
    alert_row,
    entry_of,
    report_of,
    report_sql,
    row_of,
    spend_sql,
    where,
)
from services.cost_tracker.domain.usage import (
    LedgerEntry,
    LedgerUnavailable,
    ReportSpec,
    UsageFilter,
    UsageReport,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

_INSERT = (
    f"INSERT INTO ledger ({COLUMN_LIST}) VALUES ({', '.join('?' * len(COLUMNS))}) "
    # ON CONFLICT on the key rather than INSERT OR IGNORE: OR IGNORE would also swallow a
    # NOT NULL violation and report a broken row as a harmless duplicate.
    "ON CONFLICT (request_id) DO NOTHING"
)
_INSERT_TAG = "INSERT INTO ledger_tags (tag, request_id) VALUES (?, ?) ON CONFLICT DO NOTHING"
_ADD_HOURLY = (
    "INSERT INTO spend_hourly (key_id, hour_start_unix, team_id, cost_nanos, requests) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key_id, hour_start_unix) DO UPDATE SET "
    "cost_nanos = cost_nanos + excluded.cost_nanos, requests = requests + excluded.requests"
)


class LedgerClosedError(LedgerUnavailable):
    """The ledger was closed (the service is stopping)."""


def hourly_sums(
    entries: Sequence[LedgerEntry],
) -> list[tuple[str, int, str, int, int]]:
    """Spend and requests per (key, UTC hour) of new entries, ordered by key and hour
    (the PostgreSQL ledger takes its row locks in this order too)."""
    sums: dict[tuple[str, int], list[Any]] = {}
    for e in entries:
        hour = (e.occurred_unix_nanos // HOUR_NANOS) * 3600
        slot = sums.setdefault((e.key_id, hour), [e.team_id, 0, 0])
        slot[1] += e.total_cost_nanos
        slot[2] += 1
    return [(k, h, v[0], v[1], v[2]) for (k, h), v in sorted(sums.items())]


class SqliteLedger:
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
        return await self._on(self._writer, self._record_sync, list(entries))

    def _record_sync(self, entries: list[LedgerEntry]) -> list[bool]:
        conn = self._conn()
        inserted: list[bool] = []
        new: list[LedgerEntry] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for e in entries:
                is_new = conn.execute(_INSERT, row_of(e)).rowcount == 1
                inserted.append(is_new)
                if is_new:
                    new.append(e)
                    conn.executemany(_INSERT_TAG, [(tag, e.request_id) for tag in e.tags])
            conn.executemany(_ADD_HOURLY, hourly_sums(new))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return inserted

    # --- reads ------------------------------------------------------------------------

    async def report(self, spec: ReportSpec) -> UsageReport:
        """Usage grouped as ``spec`` asks (``domain.usage``)."""
        (totals_sql, totals_params), rows_query = report_sql(spec)
        totals = await self._on(self._reader, self._fetch, totals_sql, totals_params)
        rows = await self._on(self._reader, self._fetch, *rows_query) if rows_query else []
        return report_of(spec, tuple(totals[0]), [tuple(r) for r in rows])

    async def entries(self, f: UsageFilter) -> list[LedgerEntry]:
        """The recorded entries matching ``f``, oldest first, with their tags."""
        cond, params = where(f)
        sql = (
            f"SELECT {', '.join('l.' + c for c in COLUMNS)}, "
            "(SELECT group_concat(tag, char(31)) FROM ledger_tags x "
            f"WHERE x.request_id = l.request_id) FROM ledger l{cond} "
            "ORDER BY l.occurred_unix_nanos, l.request_id"
        )
        rows = await self._on(self._reader, self._fetch, sql, params)
        return [
            entry_of(
                tuple(r)[: len(COLUMNS)],
                (r[len(COLUMNS)] or "").split("\x1f") if r[len(COLUMNS)] else (),
            )
            for r in rows
        ]

    # --- spend and alerts (domain.alerts) ----------------------------------------------

    async def spend_by(
        self, column: str, ids: Sequence[str], since_unix: int, until_unix: int
    ) -> dict[tuple[str, int], int]:
        sql, params = spend_sql(column, ids, since_unix, until_unix)
        rows = await self._on(self._reader, self._fetch, sql, params)
        return {(r[0], int(r[1])): int(r[2]) for r in rows}

    async def alerts_known(self, alert_ids: Sequence[str]) -> set[str]:
        if not alert_ids:
            return set()
        marks = ", ".join("?" * len(alert_ids))
        sql = f"SELECT alert_id FROM spend_alerts WHERE alert_id IN ({marks})"
        rows = await self._on(self._reader, self._fetch, sql, list(alert_ids))
        return {r[0] for r in rows}

    async def save_alerts(self, alerts: Sequence[SpendAlert]) -> None:
        if alerts:
            await self._on(self._writer, self._save_alerts_sync, [alert_row(a) for a in alerts])

    def _save_alerts_sync(self, rows: list[tuple[Any, ...]]) -> None:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(INSERT_ALERT, rows)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

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
        # The pending migrations and the version number in one transaction (SQLite's
        # DDL and user_version are transactional), under the write lock: a second
        # process opening the file at the same time waits, then finds it done.
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for migration in pending(version):
                for statement in _statements(migration.sqlite):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {migration.version}")
                log.info(
                    "ledger %s: schema migration %d (%s) applied",
                    self.path,
                    migration.version,
                    migration.name,
                )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _close_conn(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _statements(script: str) -> list[str]:
    """A migration's statements (``executescript`` would commit the open transaction)."""
    return [part.strip() for part in script.split(";") if part.strip()]


@contextlib.asynccontextmanager
async def sqlite_rebuilding(path: Path) -> AsyncIterator[SqliteLedger]:
    """A fresh ledger file beside ``path`` to replay into; on success it takes the
    spend alerts already raised from the old file and replaces it atomically (a
    rename), on failure it is removed and the old file stays as it was."""
    tmp = path.with_name(f"{path.name}.rebuild-{os.getpid()}")
    _remove_sqlite_files(tmp)
    ledger = SqliteLedger(tmp, bulk=True)
    await ledger.open()
    try:
        yield ledger
        await ledger.close()
        _carry_alerts(path, tmp)
        # A WAL left by the old ledger would be replayed into the new file: remove it.
        _remove_sqlite_files(path, main=False)
        os.replace(tmp, path)
    except BaseException:
        await ledger.close()
        _remove_sqlite_files(tmp)
        raise


def _carry_alerts(old: Path, new: Path) -> None:
    """Spend alerts are not derived from the stream: the rebuilt file keeps the old
    file's, so that none is raised a second time."""
    if not old.exists():
        return
    conn = sqlite3.connect(new, isolation_level=None)
    try:
        conn.execute("ATTACH DATABASE ? AS old", (str(old),))
        has_alerts = conn.execute(
            "SELECT 1 FROM old.sqlite_master WHERE type = 'table' AND name = 'spend_alerts'"
        ).fetchone()
        if has_alerts:
            conn.execute("INSERT OR IGNORE INTO spend_alerts SELECT * FROM old.spend_alerts")
        conn.execute("DETACH DATABASE old")
    finally:
        conn.close()


def _remove_sqlite_files(path: Path, *, main: bool = True) -> None:
    suffixes = ("", "-wal", "-shm", "-journal") if main else ("-wal", "-shm", "-journal")
    for suffix in suffixes:
        Path(f"{path}{suffix}").unlink(missing_ok=True)
