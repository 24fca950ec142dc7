"""The ledger on both backends: SQLite (a file in the test's tmp dir) and PostgreSQL (a
database of the test's own on the server the suite starts, ``tests/support/postgres``).
The tests above the line run on each; below, what only one of them has."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from dataclasses import replace

import asyncpg
import pytest
from sluice.pricing import PriceTable

from services.cost_tracker.adapters.ledger import LedgerClosedError, SqliteLedger
from services.cost_tracker.adapters.postgres import PostgresLedger, PostgresUnavailable, redacted
from services.cost_tracker.adapters.schema import LATEST_VERSION, SchemaTooNew
from services.cost_tracker.domain.usage import (
    NANOS_PER_DAY,
    NANOS_PER_HOUR,
    Dimension,
    LedgerEntry,
    LedgerUnavailable,
    Pricer,
    ReportSpec,
    UsageFilter,
)
from tests.cost_tracker.harness import usage_event, write_prices
from tests.support.postgres import fresh_database

T0 = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z


@pytest.fixture
def pricer(tmp_path) -> Pricer:
    return Pricer(PriceTable.load(write_prices(tmp_path)))


@pytest.fixture(params=["sqlite", "postgres"])
async def ledger(request, tmp_path, postgres):
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "sqlite":
            led: SqliteLedger | PostgresLedger = SqliteLedger(tmp_path / "ledger.sqlite3")
        else:
            led = PostgresLedger(await stack.enter_async_context(fresh_database(postgres.url)))
        await led.open()
        yield led
        await led.close()


def entry(pricer: Pricer, key: str, *, tags=(), end_user="", saved=None, **kw) -> LedgerEntry:
    event = usage_event(key, **kw)
    event.tags.extend(tags)
    event.end_user = end_user
    if saved is not None:
        event.cache_saved_usd_nanos = saved
    return pricer.price(event)


async def test_redelivered_entry_is_recorded_once(ledger, pricer: Pricer):
    first = entry(pricer, "k1", tags=("b", "a"), end_user="u1")
    assert await ledger.record([first]) == [True]
    # The same request redelivered (even priced differently later) changes nothing.
    again = replace(first, output_cost_nanos=999, tags=("c",))
    assert await ledger.record([again]) == [False]
    rows = await ledger.entries(UsageFilter(key_id="k1"))
    assert rows == [first]
    assert rows[0].tags == ("a", "b") and rows[0].end_user == "u1"


async def test_duplicates_within_one_batch(ledger, pricer: Pricer):
    a, b = entry(pricer, "k"), entry(pricer, "k")
    assert await ledger.record([a, b, a]) == [True, True, False]
    assert len(await ledger.entries(UsageFilter(key_id="k"))) == 2
    # A duplicate counts once in the hourly spend too.
    totals = (await ledger.report(ReportSpec.of(UsageFilter(key_id="k"), ()))).totals
    assert totals.requests == 2
    assert totals.cost_nanos == a.total_cost_nanos + b.total_cost_nanos


async def test_report_groups_by_key_and_model_with_filters(ledger, pricer: Pricer):
    await ledger.record(
        [
            entry(pricer, "a", occurred_unix_nanos=T0, input_tokens=100, output_tokens=10),
            entry(pricer, "a", occurred_unix_nanos=T0 + 10, input_tokens=200, output_tokens=20),
            entry(pricer, "a", model="big-model", occurred_unix_nanos=T0 + 20, team_id="team-b"),
            entry(pricer, "b", occurred_unix_nanos=T0 + 30, cache_hit=True),
        ]
    )
    report = await ledger.report(ReportSpec())
    rows = [(g.key[Dimension.KEY], g.key[Dimension.MODEL], g.amounts.requests) for g in report.rows]
    assert rows == [("a", "big-model", 1), ("a", "sim-fast", 2), ("b", "sim-fast", 1)]
    sim_a = report.rows[1].amounts
    assert (sim_a.input_tokens, sim_a.output_tokens) == (300, 30)
    assert sim_a.cost_nanos == 300 * 100 + 30 * 400
    assert report.rows[2].amounts.cost_nanos == 0  # cache hit
    assert report.totals.requests == 4 and not report.truncated

    def spec(**kw):
        return ReportSpec.of(UsageFilter(**kw))

    by_team = await ledger.report(spec(team_id="team-b"))
    assert [(g.key[Dimension.KEY], g.key[Dimension.MODEL]) for g in by_team.rows] == [
        ("a", "big-model")
    ]
    by_model = await ledger.report(spec(model="sim-fast", key_id="a"))
    assert [g.amounts.requests for g in by_model.rows] == [2]
    # since inclusive, until exclusive
    window = await ledger.report(spec(since_unix_nanos=T0 + 10, until_unix_nanos=T0 + 30))
    assert [(g.key[Dimension.MODEL], g.amounts.requests) for g in window.rows] == [
        ("big-model", 1),
        ("sim-fast", 1),
    ]


async def test_report_by_every_dimension_is_exact(ledger, pricer: Pricer):
    day2 = T0 + NANOS_PER_DAY
    entries = [
        entry(pricer, "k1", tags=("web", "beta"), end_user="alice", occurred_unix_nanos=T0),
        entry(pricer, "k1", tags=("web",), end_user="bob", occurred_unix_nanos=T0 + 1),
        entry(pricer, "k2", team_id="team-b", end_user="alice", occurred_unix_nanos=day2),
        entry(
            pricer,
            "k2",
            team_id="team-b",
            model="big-model",
            cache_hit=True,
            saved=1_234_567,
            occurred_unix_nanos=day2 + NANOS_PER_HOUR,
        ),
    ]
    await ledger.record(entries)
    cost = {e.request_id: e.total_cost_nanos for e in entries}
    ids = [e.request_id for e in entries]

    async def grouped(*dims, **kw):
        report = await ledger.report(ReportSpec.of(UsageFilter(**kw), dims))
        return {
            tuple(g.key[d] for d in dims): (g.amounts.requests, g.amounts.cost_nanos)
            for g in report.rows
        }, report

    by_tag, report = await grouped(Dimension.TAG)
    # A request counts under each of its tags; untagged ones under "".
    assert by_tag == {
        ("",): (2, cost[ids[2]] + cost[ids[3]]),
        ("beta",): (1, cost[ids[0]]),
        ("web",): (2, cost[ids[0]] + cost[ids[1]]),
    }
    # The totals count each request once whatever its tags; savings are exact.
    assert report.totals.requests == 4
    assert report.totals.cost_nanos == sum(cost.values())
    assert (report.totals.saved_nanos, report.totals.cache_hits) == (1_234_567, 1)

    by_user, _ = await grouped(Dimension.END_USER)
    assert by_user == {
        ("",): (1, 0),
        ("alice",): (2, cost[ids[0]] + cost[ids[2]]),
        ("bob",): (1, cost[ids[1]]),
    }
    by_team_day, _ = await grouped(Dimension.TEAM, Dimension.DAY)
    first_day = T0 // NANOS_PER_DAY * NANOS_PER_DAY
    assert by_team_day == {
        ("team-a", first_day): (2, cost[ids[0]] + cost[ids[1]]),
        ("team-b", first_day + NANOS_PER_DAY): (2, cost[ids[2]]),
    }
    by_hour, _ = await grouped(Dimension.HOUR, key_id="k2")
    assert sorted(by_hour) == [
        (day2 // NANOS_PER_HOUR * NANOS_PER_HOUR,),
        ((day2 + NANOS_PER_HOUR) // NANOS_PER_HOUR * NANOS_PER_HOUR,),
    ]
    by_provider_model, _ = await grouped(Dimension.PROVIDER, Dimension.MODEL, tag="web")
    assert by_provider_model == {("sim", "sim-fast"): (2, cost[ids[0]] + cost[ids[1]])}
    alice, _ = await grouped(Dimension.KEY, end_user="alice")
    assert set(alice) == {("k1",), ("k2",)}


async def test_report_limit_says_when_it_cut(ledger, pricer: Pricer):
    await ledger.record([entry(pricer, f"k{i}") for i in range(5)])
    report = await ledger.report(ReportSpec.of(UsageFilter(), (Dimension.KEY,), limit=3))
    assert [g.key[Dimension.KEY] for g in report.rows] == ["k0", "k1", "k2"]
    assert report.truncated and report.totals.requests == 5
    whole = await ledger.report(ReportSpec.of(UsageFilter(), (Dimension.KEY,), limit=5))
    assert not whole.truncated and len(whole.rows) == 5


async def test_closed_ledger_refuses_work(ledger, pricer: Pricer):
    await ledger.close()
    with pytest.raises(LedgerUnavailable):
        await ledger.record([entry(pricer, "k")])
    with pytest.raises(LedgerUnavailable):
        await ledger.report(ReportSpec())


# --- SQLite ---------------------------------------------------------------------------


async def test_sqlite_failed_batch_rolls_back_entirely(tmp_path, pricer: Pricer):
    led = SqliteLedger(tmp_path / "ledger.sqlite3")
    await led.open()
    good = entry(pricer, "k")
    bad = replace(entry(pricer, "k"), key_id=None)  # type: ignore[arg-type]  # NOT NULL
    with pytest.raises(sqlite3.IntegrityError):
        await led.record([good, bad])
    assert await led.entries(UsageFilter(key_id="k")) == []
    # The writer is usable after the rollback.
    assert await led.record([good]) == [True]
    await led.close()


async def test_sqlite_runs_off_the_event_loop(tmp_path, pricer: Pricer):
    seen: list[str] = []
    led = SqliteLedger(tmp_path / "l.sqlite3")
    original = led._record_sync

    def spy(rows):
        seen.append(threading.current_thread().name)
        return original(rows)

    led._record_sync = spy  # type: ignore[method-assign]
    await led.open()
    await led.record([entry(pricer, "k")])
    await led.close()
    assert seen and seen[0].startswith("ledger-writer")
    assert seen[0] != threading.current_thread().name


async def test_sqlite_ledger_is_wal_and_survives_reopen(tmp_path, pricer: Pricer):
    path = tmp_path / "l.sqlite3"
    led = SqliteLedger(path)
    await led.open()
    e = entry(pricer, "k")
    await led.record([e])
    await led.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    reopened = SqliteLedger(path)
    await reopened.open()
    assert await reopened.entries(UsageFilter()) == [e]
    await reopened.close()
    with pytest.raises(LedgerClosedError):
        await reopened.entries(UsageFilter())


# The ledger table as the first schema made it (user_version 1), before migration 2.
V1_LEDGER = """
CREATE TABLE ledger (
    request_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, team_id TEXT NOT NULL,
    model TEXT NOT NULL, provider TEXT NOT NULL, input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL, cached_input_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL, input_cost_nanos INTEGER NOT NULL,
    output_cost_nanos INTEGER NOT NULL, total_cost_nanos INTEGER NOT NULL,
    price_version TEXT NOT NULL, priced INTEGER NOT NULL, cache_hit INTEGER NOT NULL,
    outcome TEXT NOT NULL, occurred_unix_nanos INTEGER NOT NULL, trace_id TEXT NOT NULL,
    stream_seq INTEGER NOT NULL
) WITHOUT ROWID;
"""


async def test_sqlite_v1_file_is_migrated_in_place(tmp_path, pricer: Pricer):
    """A ledger written by the first schema keeps its rows; the migration adds the new
    columns and tables and fills the hourly spend from the rows already there."""
    path = tmp_path / "old.sqlite3"
    old = [entry(pricer, "k", occurred_unix_nanos=T0 + i * NANOS_PER_HOUR) for i in range(3)]
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_LEDGER)
        for e in old:
            conn.execute(
                "INSERT INTO ledger VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
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
                    1,
                    0,
                    e.outcome,
                    e.occurred_unix_nanos,
                    e.trace_id,
                    0,
                ),
            )
        conn.execute("PRAGMA user_version = 1")
    led = SqliteLedger(path)
    await led.open()
    assert await led.entries(UsageFilter(key_id="k")) == old
    new = entry(pricer, "k", tags=("x",), occurred_unix_nanos=T0)
    assert await led.record([new]) == [True]
    await led.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
        hourly = conn.execute(
            "SELECT hour_start_unix, cost_nanos, requests FROM spend_hourly ORDER BY 1"
        ).fetchall()
    first_hour = T0 // NANOS_PER_HOUR * 3600
    cost = old[0].total_cost_nanos
    assert hourly == [
        (first_hour, 2 * cost, 2),
        (first_hour + 3600, cost, 1),
        (first_hour + 7200, cost, 1),
    ]


async def test_sqlite_newer_schema_is_refused(tmp_path):
    path = tmp_path / "future.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    led = SqliteLedger(path)
    with pytest.raises(SchemaTooNew):
        await led.open()
    await led.close()


# --- PostgreSQL -----------------------------------------------------------------------


async def test_postgres_replicas_starting_together_migrate_once(database_url):
    ledgers = [PostgresLedger(database_url) for _ in range(3)]
    await asyncio.gather(*(led.open() for led in ledgers))
    for led in ledgers:
        await led.close()
    conn = await asyncpg.connect(database_url)
    try:
        versions = await conn.fetch("SELECT version FROM ledger_schema_migrations ORDER BY 1")
        await conn.execute(
            "INSERT INTO ledger_schema_migrations (version, name) VALUES ($1, 'future')",
            LATEST_VERSION + 1,
        )
    finally:
        await conn.close()
    assert [r[0] for r in versions] == list(range(1, LATEST_VERSION + 1))
    future = PostgresLedger(database_url)
    with pytest.raises(SchemaTooNew):
        await future.open()
    await future.close()


async def test_postgres_two_writers_count_each_request_once(database_url, pricer: Pricer):
    """Two ledgers (two replicas) recording overlapping batches at the same time, in
    opposite orders: every request is one row, the hourly spend sums each row once, and
    neither writer deadlocks or fails."""
    a, b = PostgresLedger(database_url), PostgresLedger(database_url)
    await a.open()
    await b.open()
    try:
        entries = [
            entry(pricer, f"k{i % 3}", input_tokens=100 + i, occurred_unix_nanos=T0 + i)
            for i in range(600)
        ]
        batches_a = [entries[i : i + 50] for i in range(0, 600, 50)]
        batches_b = [list(reversed(entries[i : i + 70])) for i in range(0, 600, 70)]

        async def run(led, batches):
            new = 0
            for batch in batches:
                new += sum(await led.record(batch))
            return new

        new_a, new_b = await asyncio.gather(run(a, batches_a), run(b, batches_b))
        assert new_a + new_b == len(entries)
        rows = await a.entries(UsageFilter())
        assert sorted(r.request_id for r in rows) == sorted(e.request_id for e in entries)
        conn = await asyncpg.connect(database_url)
        try:
            hourly = await conn.fetchval("SELECT SUM(cost_nanos) FROM spend_hourly")
            requests = await conn.fetchval("SELECT SUM(requests) FROM spend_hourly")
        finally:
            await conn.close()
        assert int(hourly) == sum(e.total_cost_nanos for e in entries)
        assert int(requests) == len(entries)
    finally:
        await a.close()
        await b.close()


async def test_postgres_failed_batch_changes_nothing(database_url, pricer: Pricer):
    led = PostgresLedger(database_url)
    await led.open()
    try:
        good = entry(pricer, "k")
        bad = replace(entry(pricer, "k"), key_id=None)  # type: ignore[arg-type]  # NOT NULL
        with pytest.raises(asyncpg.PostgresError):
            await led.record([good, bad])
        assert await led.entries(UsageFilter(key_id="k")) == []
        assert await led.record([good]) == [True]
    finally:
        await led.close()
    with pytest.raises(PostgresUnavailable):
        await led.record([good])


def test_database_urls_are_logged_without_credentials():
    url = "postgresql://ledger:s3cret@db.internal:5433/sluice?sslmode=require"
    assert redacted(url) == "postgresql://db.internal:5433/sluice"
    assert "s3cret" not in redacted(url)
