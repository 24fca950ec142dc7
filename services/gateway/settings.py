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


class SemanticCacheMode(StrEnum):
    """Whether a cacheable request also looks for an answer to a paraphrase of its last
    user message (about 15 ms of the cache's CPU, so never unless asked)."""

    OFF = "off"
    # Only requests with ``X-Sluice-Semantic-Cache: on``.
    OPT_IN = "opt_in"
    # Every cacheable request, unless ``X-Sluice-Semantic-Cache: off``.
    ON = "on"


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
    # Admission leases (services/gateway/domain/leases.py): how many requests of a key one
    # lease asks room for; 0 asks the limiter on every request.
    admission_lease_requests: int = Field(default=32, ge=0)
    cache_timeout_seconds: float = 0.25
    # GET /v1/usage waits this long for a cost-tracker's answer (a report over a long
    # range reads many ledger rows).
    usage_timeout_seconds: float = Field(default=10.0, gt=0)
    publish_timeout_seconds: float = 2.0
    cache_mode: CacheMode = CacheMode.DETERMINISTIC
    # Applies to requests the exact cache already takes (cache_mode, Cache-Control).
    semantic_cache: SemanticCacheMode = SemanticCacheMode.OPT_IN
    cache_ttl_seconds: int = 3600
    key_cache_seconds: float = 30.0
    readiness_cache_seconds: float = 1.0
    # An idle stream gets a ": keep-alive" comment this often (proxies close idle ones).
    sse_heartbeat_seconds: float = 15.0
    # Every stream opens with "retry: <ms>", the reconnect delay clients should use.
    sse_retry_ms: int = 2000
    # Token batching at the relay (off by default: each delta is relayed at once). With
    # max_deltas > 1, consecutive text deltas of one choice already waiting are merged
    # into one SSE event (id = the last merged sequence); with max_ms > 0 the relay also
    # waits up to that long for more, whichever limit comes first.
    sse_batch_max_deltas: int = 1
    sse_batch_max_ms: float = 0.0
    # Bound on reading a stream's history from JetStream when a client resumes.
    resume_read_timeout_seconds: float = 5.0
    # "granian" (embedded, Rust HTTP stack) or "uvicorn".
    http_server: str = "granian"

    # Jobs: how long a job record is kept after submission (the sluice_jobs bucket TTL
    # follows it), and how long Prefer: wait may hold a request.
    job_retention_seconds: float = 24 * 3600.0
    # Deadline of a job's work (the worker gives up after it, queue time included).
    job_timeout_seconds: float = 6 * 3600.0
    max_prefer_wait_seconds: float = 60.0
    # Idempotency-Key: how long a key is remembered; an in-flight record older than
    # request_timeout_seconds plus this slack, with no outcome, is taken over.
    idempotency_ttl_seconds: float = 24 * 3600.0
    idempotency_stale_slack_seconds: float = 30.0
    # Webhooks: seconds before each attempt (Standard Webhooks' example schedule, about
    # 27 h in all), per-attempt timeout, and hosts or networks (CIDR) exempt from the
    # SSRF refusal of loopback, private, link-local and metadata addresses.
    webhook_retry_schedule: list[float] = Field(
        default_factory=lambda: [0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]
    )
    webhook_timeout_seconds: float = 10.0
    webhook_allow_hosts: list[str] = Field(default_factory=list)

    common: CommonSettings = Field(default_factory=CommonSettings)

    @property
    def providers_path(self) -> Path:
        return self.common.config_dir / "providers.yaml"
