"""Settings of the limiter, read from ``SLUICE_LIMITER_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sluice.settings import CommonSettings
from sluice.topology import DEFAULT_PORTS, Consumers, ServiceName

from services.limiter.domain.windows import LimiterConfig

_PORTS = DEFAULT_PORTS[ServiceName.LIMITER]


class LimiterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_LIMITER_", extra="ignore")

    grpc_port: int = _PORTS.grpc
    # None: no Prometheus endpoint (in-process tests, where the port is process-wide).
    metrics_port: int | None = _PORTS.metrics
    # Quotas for keys whose record sets none (ReserveRequest fields left at 0).
    default_tokens_per_minute: int = Field(default=100_000, gt=0)
    default_requests_per_minute: int = Field(default=600, gt=0)
    window_seconds: int = Field(default=60, gt=0)
    # Granularity of the sliding window; spend is held at most this much past the window.
    sub_bucket_ms: int = Field(default=1_000, gt=0)
    # A reservation with no usage after this long is forgotten at its reserved amount.
    reservation_ttl_seconds: float = Field(default=600.0, gt=0)
    # Admission leases: how long a gateway may admit a key's requests from one, and
    # the share of what the key has left that one lease may take (1/divisor).
    lease_ttl_ms: int = Field(default=2_000, gt=0)
    lease_divisor: int = Field(default=8, ge=1)
    # Spend recorded since the last snapshot is what a crash (not a SIGTERM) forgets.
    snapshot_interval_seconds: float = Field(default=5.0, gt=0)
    # KV key of this instance's snapshot in the limiter snapshots bucket.
    snapshot_key: str = "default"
    # The durable consumer on SLUICE_USAGE; another name reconciles independently.
    consumer_durable: str = Consumers.LIMITER_USAGE.durable
    reconcile_batch: int = Field(default=256, ge=1, le=10_000)
    # How long a fetch from an idle durable waits for usage events before it asks again
    # (a stop does not wait for it: the consumer's stop ends the pending fetch).
    fetch_timeout_seconds: float = Field(default=1.0, gt=0)
    # After a batch smaller than reconcile_batch, wait this long before the next fetch,
    # so usage is reconciled in batches rather than one fetch per event. A reservation
    # (or lease share) is settled up to this much later; until then it holds what it
    # reserved, so quotas only err on the safe side. 0 fetches again at once. A quarter of
    # a second makes a batch of 25 events at 100 requests/s instead of 5: the consumer's
    # cost is mostly per batch (half the limiter's CPU per request, measured A/B with
    # `python -m bench --only overhead --against`).
    reconcile_window_seconds: float = Field(default=0.25, ge=0, le=5)

    # Batch-class work (priority batch) is admitted only within this share of each
    # limit and budget of every level, so interactive work keeps the rest.
    batch_share: float = Field(default=0.5, gt=0, le=1)
    # The price table reservations are priced with (default: prices.yaml in the config
    # directory, the one the worker and the cost-tracker use).
    prices_path: Path | None = None

    common: CommonSettings = Field(default_factory=CommonSettings)

    @property
    def prices_file(self) -> Path:
        return self.prices_path or self.common.config_dir / "prices.yaml"

    @model_validator(mode="after")
    def _window_divides(self) -> LimiterSettings:
        self.limiter_config()  # raises ValueError on an inconsistent window
        return self

    def limiter_config(self) -> LimiterConfig:
        return LimiterConfig(
            default_tokens_per_minute=self.default_tokens_per_minute,
            default_requests_per_minute=self.default_requests_per_minute,
            window_ms=self.window_seconds * 1000,
            sub_bucket_ms=self.sub_bucket_ms,
            reservation_ttl_ms=int(self.reservation_ttl_seconds * 1000),
            lease_ttl_ms=self.lease_ttl_ms,
            lease_divisor=self.lease_divisor,
        )
