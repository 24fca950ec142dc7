"""Settings of the limiter, read from ``SLUICE_LIMITER_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sluice.settings import CommonSettings
from sluice.topology import DEFAULT_PORTS, ServiceName

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
    # Each partition's snapshot is written this often by its owner; a takeover replays
    # the journal and usage since the last one (more to read the longer the interval).
    snapshot_interval_seconds: float = Field(default=2.0, gt=0)
    # A partition with no change since its snapshot is written again only after this
    # long (to move its usage mark: a takeover reads the usage stream from there).
    snapshot_max_age_seconds: float = Field(default=10.0, ge=0)
    # Partition leases (KV bucket sluice_limiter_owners, whose TTL is the lease time):
    # renewed every renew_seconds; a replica that could not renew for lease_seconds
    # stops serving its partitions, and a dead replica's partitions are free after it.
    lease_seconds: float = Field(default=2.0, gt=0)
    renew_seconds: float = Field(default=0.5, gt=0)
    # The usage feed fetches up to reconcile_batch events at a time and, after a smaller
    # batch, waits reconcile_window_seconds before the next fetch: events are handled
    # many per wake-up (the limiter's CPU is mostly per wake-up), and a reservation is
    # settled up to that much later, holding what it reserved until then.
    reconcile_batch: int = Field(default=256, ge=1, le=10_000)
    reconcile_window_seconds: float = Field(default=0.25, ge=0, le=5)
    fetch_timeout_seconds: float = Field(default=1.0, gt=0)
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
        if self.renew_seconds * 2 > self.lease_seconds:
            raise ValueError("renew_seconds must be at most half of lease_seconds")
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
