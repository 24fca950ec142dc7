import sqlite3
import threading
from dataclasses import replace

import pytest
from sluice.pricing import PriceTable

from services.cost_tracker.adapters.ledger import Ledger, LedgerClosedError
from services.cost_tracker.domain.usage import LedgerEntry, Pricer, UsageFilter
from tests.cost_tracker.harness import usage_event, write_prices


@pytest.fixture
def pricer(tmp_path) -> Pricer:
    return Pricer(PriceTable.load(write_prices(tmp_path)))


@pytest.fixture
async def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite3")
    await led.open()
    yield led
    await led.close()


def entry(pricer: Pricer, key: str, **kw) -> LedgerEntry:
    return pricer.price(usage_event(key, **kw))


async def test_redelivered_entry_is_recorded_once(ledger: Ledger, pricer: Pricer):
    first = entry(pricer, "k1")
    assert await ledger.record([first]) == [True]
    # The same request redelivered (even priced differently later) changes nothing.
    again = replace(first, output_cost_nanos=999)
    assert await ledger.record([again]) == [False]
    rows = await ledger.entries(UsageFilter(key_id="k1"))
    assert rows == [first]


async def test_duplicates_within_one_batch(ledger: Ledger, pricer: Pricer):
    a, b = entry(pricer, "k"), entry(pricer, "k")
    assert await ledger.record([a, b, a]) == [True, True, False]
    assert len(await ledger.entries(UsageFilter(key_id="k"))) == 2


async def test_failed_batch_rolls_back_entirely(ledger: Ledger, pricer: Pricer):
    good = entry(pricer, "k")
    bad = replace(entry(pricer, "k"), key_id=None)  # type: ignore[arg-type]  # NOT NULL
    with pytest.raises(sqlite3.IntegrityError):
        await ledger.record([good, bad])
    assert await ledger.entries(UsageFilter(key_id="k")) == []
    # The writer is usable after the rollback.
    assert await ledger.record([good]) == [True]


async def test_totals_group_by_key_and_model_with_filters(ledger: Ledger, pricer: Pricer):
    t0 = 1_700_000_000_000_000_000
    await ledger.record(
        [
            entry(pricer, "a", occurred_unix_nanos=t0, input_tokens=100, output_tokens=10),
            entry(pricer, "a", occurred_unix_nanos=t0 + 10, input_tokens=200, output_tokens=20),
            entry(pricer, "a", model="big-model", occurred_unix_nanos=t0 + 20, team_id="team-b"),
            entry(pricer, "b", occurred_unix_nanos=t0 + 30, cache_hit=True),
        ]
    )
    rows = await ledger.totals(UsageFilter())
    assert [(r.key_id, r.model, r.requests) for r in rows] == [
        ("a", "big-model", 1),
        ("a", "sim-fast", 2),
        ("b", "sim-fast", 1),
    ]
    sim_a = rows[1]
    assert (sim_a.input_tokens, sim_a.output_tokens) == (300, 30)
    assert sim_a.total_cost_nanos == 300 * 100 + 30 * 400
    assert rows[2].total_cost_nanos == 0  # cache hit

    by_team = await ledger.totals(UsageFilter(team_id="team-b"))
    assert [(r.key_id, r.model) for r in by_team] == [("a", "big-model")]
    by_model = await ledger.totals(UsageFilter(model="sim-fast", key_id="a"))
    assert [r.requests for r in by_model] == [2]
    # since inclusive, until exclusive
    window = await ledger.totals(UsageFilter(since_unix_nanos=t0 + 10, until_unix_nanos=t0 + 30))
    assert [(r.key_id, r.model, r.requests) for r in window] == [
        ("a", "big-model", 1),
        ("a", "sim-fast", 1),
    ]


async def test_sqlite_runs_off_the_event_loop(tmp_path, pricer: Pricer):
    seen: list[str] = []
    led = Ledger(tmp_path / "l.sqlite3")
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


async def test_ledger_is_wal_and_survives_reopen(tmp_path, pricer: Pricer):
    path = tmp_path / "l.sqlite3"
    led = Ledger(path)
    await led.open()
    e = entry(pricer, "k")
    await led.record([e])
    await led.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened = Ledger(path)
    await reopened.open()
    assert await reopened.entries(UsageFilter()) == [e]
    await reopened.close()


async def test_closed_ledger_refuses_work(tmp_path, pricer: Pricer):
    led = Ledger(tmp_path / "l.sqlite3")
    await led.open()
    await led.close()
    with pytest.raises(LedgerClosedError):
        await led.record([entry(pricer, "k")])
    with pytest.raises(LedgerClosedError):
        await led.totals(UsageFilter())
