"""Settings of the cache, read from ``SLUICE_CACHE_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sluice.settings import CommonSettings
from sluice.topology import DEFAULT_PORTS, Buckets, ServiceName

_PORTS = DEFAULT_PORTS[ServiceName.CACHE]


class CacheSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_CACHE_", extra="ignore")

    grpc_port: int = _PORTS.grpc
    # None: no Prometheus endpoint.
    metrics_port: int | None = _PORTS.metrics
    # Freshness of an entry stored without a ttl_seconds of its own. The bucket's TTL
    # (topology) is the upper bound of every entry whatever is asked.
    default_ttl_seconds: int = Field(default=int(Buckets.EXACT_CACHE.ttl_seconds), gt=0)

    common: CommonSettings = Field(default_factory=CommonSettings)
