"""Gateway settings (``SLUICE_GATEWAY_*``) with the shared ones under ``common``."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sluice.settings import CommonSettings


class CacheMode(StrEnum):
    # Cache only requests whose answer is reproducible: temperature 0 or a seed.
    DETERMINISTIC = "deterministic"
    ALWAYS = "always"
    OFF = "off"


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int = 50051
    # Accepted so launchers can pass one metrics port per service; the gateway serves
    # /metrics on its HTTP port.
    metrics_port: int | None = None

    # The local dev key in clear; only its SHA-256 is stored.
    dev_api_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SLUICE_DEV_API_KEY", "SLUICE_GATEWAY_DEV_API_KEY"),
        repr=False,
    )

    max_body_bytes: int = 10 * 1024 * 1024
    # Output tokens reserved when the request names no max_tokens.
    default_max_output_tokens: int = 1024
    # Bound on the whole request; the worker gets the same absolute deadline.
    request_timeout_seconds: float = 300.0
    limiter_timeout_seconds: float = 1.0
    cache_timeout_seconds: float = 0.25
    publish_timeout_seconds: float = 2.0
    cache_mode: CacheMode = CacheMode.DETERMINISTIC
    cache_ttl_seconds: int = 3600
    key_cache_seconds: float = 30.0
    readiness_cache_seconds: float = 1.0
    sse_heartbeat_seconds: float = 15.0
    # "granian" (embedded, Rust HTTP stack) or "uvicorn".
    http_server: str = "granian"

    common: CommonSettings = Field(default_factory=CommonSettings)

    @property
    def providers_path(self) -> Path:
        return self.common.config_dir / "providers.yaml"
