"""Settings of the cost-tracker, read from ``SLUICE_COST_*`` environment variables."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sluice.settings import CommonSettings
from sluice.topology import DEFAULT_PORTS, Consumers, ServiceName

_PORTS = DEFAULT_PORTS[ServiceName.COST_TRACKER]


class CostTrackerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_COST_", extra="ignore")

    grpc_port: int = _PORTS.grpc
    metrics_port: int = _PORTS.metrics
    # Default: <state_dir>/ledger.sqlite3 (see ``ledger_file``); unused with a database.
    ledger_path: Path | None = None
    # postgresql://user:password@host:port/database puts the ledger on PostgreSQL, which
    # several cost-trackers can share; unset, the ledger is the SQLite file above (one
    # cost-tracker). Never logged (it may hold a password).
    database_url: SecretStr | None = None
    # Connections each cost-tracker keeps to PostgreSQL (one batch commit and the
    # usage queries share them).
    database_pool_size: int = Field(default=4, ge=1, le=64)
    # Default: <config_dir>/prices.yaml (see ``prices_file``).
    prices_path: Path | None = None
    # The durable consumer on SLUICE_USAGE. Another name builds an independent ledger
    # (a shadow copy, or an isolated test) from the start of the stream.
    consumer_durable: str = Consumers.COST_USAGE.durable
    # Messages fetched and committed per SQLite transaction.
    batch_size: int = Field(default=256, ge=1, le=10_000)
    # How long a fetch from an idle durable waits for messages before it asks again (a
    # stop does not wait for it: the consumer's stop ends the pending fetch).
    fetch_timeout_seconds: float = Field(default=1.0, gt=0)
    # After a batch smaller than batch_size, wait this long before the next fetch, so
    # that usage arriving meanwhile is priced, committed (one fsync) and acked as one
    # batch: a few cost events a second arrive up to this much later, and the ledger
    # stops competing with the request path for CPU. 0 fetches again at once. A quarter
    # of a second: the consumer's cost is mostly per batch (a third of the cost-tracker's
    # CPU per request, measured A/B with `python -m bench --only overhead --against`).
    batch_window_seconds: float = Field(default=0.25, ge=0, le=5)
    # Cost events buffered per WatchCostEvents caller before the oldest are dropped.
    watch_queue_size: int = Field(default=1024, ge=1)
    # Recreate the ledger by replaying SLUICE_USAGE, then exit (also ``--rebuild``).
    rebuild: bool = False
    # Spend alerts (services/cost_tracker/domain/alerts.py): the shares of a key's or a
    # team's daily and monthly budgets that raise one, in percent.
    alert_thresholds: list[int] = Field(default_factory=lambda: [50, 80, 100])
    # A key's hourly spend above this many times its mean hourly spend of the 24 hours
    # before is a spike (0: no spike alerts), when it is at least spike_min_usd.
    spike_factor: float = Field(default=3.0, ge=0)
    spike_min_usd: Decimal = Field(default=Decimal("0.10"), ge=0)

    common: CommonSettings = Field(default_factory=CommonSettings)

    @field_validator("alert_thresholds")
    @classmethod
    def _percentages(cls, value: list[int]) -> list[int]:
        if any(not 1 <= v <= 1000 for v in value):
            raise ValueError("thresholds are percentages of a budget, 1 to 1000")
        return sorted(set(value))

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None
        if value is not None and not value.get_secret_value().startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError("must be a postgresql:// URL (unset: the SQLite ledger)")
        return value

    @property
    def ledger_file(self) -> Path:
        return self.ledger_path or self.common.state_dir / "ledger.sqlite3"

    @property
    def prices_file(self) -> Path:
        return self.prices_path or self.common.config_dir / "prices.yaml"
