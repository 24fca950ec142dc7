"""The ledger's schema, as numbered migrations applied in order at start, for both
backends (SQLite and PostgreSQL).

Each ``Migration`` holds the same change in each dialect. A database records the last
version applied (SQLite: ``PRAGMA user_version``; PostgreSQL: the table
``ledger_schema_migrations``), and opening a ledger applies the missing ones in one
transaction, so a failed migration leaves the database as it was; on PostgreSQL under
an advisory lock, so replicas starting together apply them once. A database newer
than this code (a later version recorded) is refused rather than written with a
schema this code does not know.

The tables:

- ``ledger``: one row per request id, the primary key that makes every usage event
  count once, whichever replica and however often it is delivered. Money in integer
  nano-USD; ``priced`` and ``cache_hit`` are 0/1 integers in both dialects, so that
  the report queries are the same text.
- ``ledger_tags``: one row per (tag, request), written with the request's row.
- ``spend_hourly``: spend per key and UTC hour, added to in the transaction that
  inserts the rows (only new rows count), so that budget and spike checks read a few
  rows instead of summing the ledger.
- ``spend_alerts``: every spend alert raised, by its id: the record that makes an
  alert once per threshold and period across replicas and restarts. A rebuild leaves
  it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sqlite: str
    postgres: str


_V1_SQLITE = """
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

_V1_POSTGRES = """
CREATE TABLE ledger (
    request_id          TEXT PRIMARY KEY,
    key_id              TEXT NOT NULL,
    team_id             TEXT NOT NULL,
    model               TEXT NOT NULL,
    provider            TEXT NOT NULL,
    input_tokens        BIGINT NOT NULL,
    output_tokens       BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    reasoning_tokens    BIGINT NOT NULL,
    input_cost_nanos    BIGINT NOT NULL,
    output_cost_nanos   BIGINT NOT NULL,
    total_cost_nanos    BIGINT NOT NULL,
    price_version       TEXT NOT NULL,
    priced              SMALLINT NOT NULL CHECK (priced IN (0, 1)),
    cache_hit           SMALLINT NOT NULL CHECK (cache_hit IN (0, 1)),
    outcome             TEXT NOT NULL,
    occurred_unix_nanos BIGINT NOT NULL,
    trace_id            TEXT NOT NULL,
    stream_seq          BIGINT NOT NULL
);
CREATE INDEX ledger_key_time ON ledger (key_id, occurred_unix_nanos);
CREATE INDEX ledger_team_time ON ledger (team_id, occurred_unix_nanos);
CREATE INDEX ledger_time ON ledger (occurred_unix_nanos);
"""

# Hours of spend start at a whole UTC hour: occurred_unix_nanos / 3.6e12 is integer
# division in both dialects (the times are positive).
_V2_SQLITE = """
ALTER TABLE ledger ADD COLUMN end_user TEXT NOT NULL DEFAULT '';
ALTER TABLE ledger ADD COLUMN saved_cost_nanos INTEGER NOT NULL DEFAULT 0;
CREATE TABLE ledger_tags (
    tag        TEXT NOT NULL,
    request_id TEXT NOT NULL,
    PRIMARY KEY (tag, request_id)
) WITHOUT ROWID;
CREATE INDEX ledger_tags_request ON ledger_tags (request_id);
CREATE TABLE spend_hourly (
    key_id          TEXT NOT NULL,
    hour_start_unix INTEGER NOT NULL,
    team_id         TEXT NOT NULL,
    cost_nanos      INTEGER NOT NULL,
    requests        INTEGER NOT NULL,
    PRIMARY KEY (key_id, hour_start_unix)
) WITHOUT ROWID;
CREATE INDEX spend_hourly_team ON spend_hourly (team_id, hour_start_unix);
INSERT INTO spend_hourly (key_id, hour_start_unix, team_id, cost_nanos, requests)
    SELECT key_id, (occurred_unix_nanos / 3600000000000) * 3600, MAX(team_id),
           SUM(total_cost_nanos), COUNT(*)
    FROM ledger GROUP BY key_id, occurred_unix_nanos / 3600000000000;
CREATE TABLE spend_alerts (
    alert_id           TEXT PRIMARY KEY,
    kind               TEXT NOT NULL,
    scope              TEXT NOT NULL,
    key_id             TEXT NOT NULL,
    team_id            TEXT NOT NULL,
    period             TEXT NOT NULL,
    period_start_unix  INTEGER NOT NULL,
    threshold_percent  INTEGER NOT NULL,
    spend_nanos        INTEGER NOT NULL,
    budget_nanos       INTEGER NOT NULL,
    created_unix_nanos INTEGER NOT NULL
) WITHOUT ROWID;
"""

_V2_POSTGRES = """
ALTER TABLE ledger ADD COLUMN end_user TEXT NOT NULL DEFAULT '';
ALTER TABLE ledger ADD COLUMN saved_cost_nanos BIGINT NOT NULL DEFAULT 0;
CREATE TABLE ledger_tags (
    tag        TEXT NOT NULL,
    request_id TEXT NOT NULL,
    PRIMARY KEY (tag, request_id)
);
CREATE INDEX ledger_tags_request ON ledger_tags (request_id);
CREATE TABLE spend_hourly (
    key_id          TEXT NOT NULL,
    hour_start_unix BIGINT NOT NULL,
    team_id         TEXT NOT NULL,
    cost_nanos      BIGINT NOT NULL,
    requests        BIGINT NOT NULL,
    PRIMARY KEY (key_id, hour_start_unix)
);
CREATE INDEX spend_hourly_team ON spend_hourly (team_id, hour_start_unix);
INSERT INTO spend_hourly (key_id, hour_start_unix, team_id, cost_nanos, requests)
    SELECT key_id, (occurred_unix_nanos / 3600000000000) * 3600, MAX(team_id),
           SUM(total_cost_nanos), COUNT(*)
    FROM ledger GROUP BY key_id, occurred_unix_nanos / 3600000000000;
CREATE TABLE spend_alerts (
    alert_id           TEXT PRIMARY KEY,
    kind               TEXT NOT NULL,
    scope              TEXT NOT NULL,
    key_id             TEXT NOT NULL,
    team_id            TEXT NOT NULL,
    period             TEXT NOT NULL,
    period_start_unix  BIGINT NOT NULL,
    threshold_percent  INTEGER NOT NULL,
    spend_nanos        BIGINT NOT NULL,
    budget_nanos       BIGINT NOT NULL,
    created_unix_nanos BIGINT NOT NULL
);
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "ledger", _V1_SQLITE, _V1_POSTGRES),
    Migration(
        2, "end users, tags, cache savings, hourly spend, spend alerts", _V2_SQLITE, _V2_POSTGRES
    ),
)
LATEST_VERSION = MIGRATIONS[-1].version

# The tables a rebuild makes again from the usage stream (spend_alerts stays).
DERIVED_TABLES = ("ledger", "ledger_tags", "spend_hourly")


class SchemaTooNew(RuntimeError):
    """The database records a schema version this code does not know."""


def pending(current: int) -> list[Migration]:
    """The migrations a database at version ``current`` still needs, in order."""
    if current > LATEST_VERSION:
        raise SchemaTooNew(
            f"the ledger database has schema version {current}, newer than this "
            f"cost-tracker's {LATEST_VERSION}: run a cost-tracker of that version or later"
        )
    return [m for m in MIGRATIONS if m.version > current]
