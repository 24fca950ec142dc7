"""Gateway settings (``SLUICE_GATEWAY_*``) with the shared ones under ``common``."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import AliasChoices, BaseModel, Field, model_validator
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


# Asymmetric algorithms only: a JWKS holds public keys, and an HMAC "key" made of one
# would let anyone who read the JWKS sign tokens.
DEFAULT_JWT_ALGORITHMS = [
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
]


class JwtIssuer(BaseModel):
    """One identity provider whose JWTs the gateway accepts as ``Authorization: Bearer``."""

    # Short name: the key id of its callers is ``jwt-<name>`` (limits, usage, audit).
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    # The exact ``iss`` of its tokens.
    issuer: str
    # The ``aud`` the tokens must carry (one of them).
    audience: list[str] = Field(min_length=1)
    # Where its signing keys are: a JWKS document by URL, or a file.
    jwks_url: str | None = None
    jwks_file: Path | None = None
    algorithms: list[str] = Field(default_factory=lambda: list(DEFAULT_JWT_ALGORITHMS))
    # Claim names (a dotted name reaches into an object: "org.team").
    team_claim: str = "team"
    scopes_claim: str = "scope"
    user_claim: str = "sub"
    # Scopes every token of this issuer has, beside the ones it carries.
    default_scopes: list[str] = Field(default_factory=list)
    model_allow: list[str] = Field(default_factory=list)
    leeway_seconds: float = 30.0

    @model_validator(mode="after")
    def _one_jwks(self) -> JwtIssuer:
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError(f"issuer {self.name}: set exactly one of jwks_url and jwks_file")
        bad = [a for a in self.algorithms if a not in DEFAULT_JWT_ALGORITHMS]
        if bad:
            raise ValueError(f"issuer {self.name}: algorithms {bad} are not accepted")
        return self


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

    # The operators' key for /v1/admin (and the sluice CLI); only its SHA-256 is stored.
    # Unset in local: generated once into <state>/admin-key; elsewhere required.
    admin_api_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SLUICE_ADMIN_API_KEY", "SLUICE_GATEWAY_ADMIN_API_KEY"),
        repr=False,
    )
    # Tiers of teams (defaults of limits, budgets, priority classes); under config_dir.
    tiers_file: str = "tiers.yaml"
    # JWT issuers accepted beside API keys, as JSON (a list of JwtIssuer objects).
    jwt_issuers: list[JwtIssuer] = Field(default_factory=list)
    # How long a JWKS fetched by URL is used before it is fetched again (a token with an
    # unknown key id fetches it at once, at most every jwks_min_refresh_seconds).
    jwks_cache_seconds: float = 300.0
    jwks_min_refresh_seconds: float = 10.0
    jwks_timeout_seconds: float = 5.0

    max_body_bytes: int = 10 * 1024 * 1024
    # Output tokens reserved when the request names no max_tokens.
    default_max_output_tokens: int = 1024
    # Bound on the whole request; the worker gets the same absolute deadline.
    request_timeout_seconds: float = 300.0
    limiter_timeout_seconds: float = 1.0
    # How long a request waits for its limiter partition to have an owner again (a
    # replica handing it over, or a killed one's lease lapsing) before a 503.
    limiter_wait_seconds: float = Field(default=5.0, ge=0)
    # Tiers with limiter_failure: fail_open, while the limiter does not answer: this
    # gateway admits this share of each requests-per-minute limit (the key's own
    # default when it sets none: fail_open_requests_per_minute).
    fail_open_share: float = Field(default=0.1, gt=0, le=1)
    fail_open_requests_per_minute: int = Field(default=600, gt=0)
    # Admission leases (services/gateway/domain/leases.py): how many requests of a key one
    # lease asks room for; 0 asks the limiter on every request.
    admission_lease_requests: int = Field(default=32, ge=0)
    # A cache lookup's budget (run beside admission); past it the request goes on with
    # x-sluice-cache: bypass. After cache_skip_after lookups in a row ran out of it, the
    # gateway asks the cache nothing for cache_skip_seconds (0: never stops asking).
    cache_timeout_seconds: float = Field(default=0.25, gt=0)
    cache_skip_after: int = Field(default=3, ge=0)
    cache_skip_seconds: float = Field(default=5.0, ge=0)
    # GET /v1/usage waits this long for a cost-tracker's answer (a report over a long
    # range reads many ledger rows).
    usage_timeout_seconds: float = Field(default=10.0, gt=0)
    publish_timeout_seconds: float = 2.0
    cache_mode: CacheMode = CacheMode.DETERMINISTIC
    # Applies to requests the exact cache already takes (cache_mode, Cache-Control).
    semantic_cache: SemanticCacheMode = SemanticCacheMode.OPT_IN
    cache_ttl_seconds: int = 3600
    # Answers whose confidence (mean token probability, domain/verdict.py) is below this
    # are marked sluice.requires_human_review; unset: only when the caller sets one.
    # Setting it asks every provider for logprobs.
    review_threshold: float | None = Field(default=None, ge=0, le=1)
    # One repair call for a non-streamed answer that breaks its response_format JSON
    # schema (x-sluice-schema-repair or the body's sluice.schema_repair override it).
    schema_repair: bool = True
    # Identical concurrent requests (same exact-cache key, team, dialect and delivery)
    # share one upstream call across replicas (domain/coalesce.py).
    coalesce: bool = True
    # A follower whose leader shows no event for this long, and has not opened its
    # stream, runs on its own (the leader's gateway died after claiming).
    coalesce_open_wait_seconds: float = Field(default=2.0, gt=0)
    # Input guard rules (domain/guard.py); unset: config/guard.yaml when it exists.
    guard_file: Path | None = None
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
    # Request records of the audit trail gather this long, then leave as one message per
    # team (0: one message per record).
    audit_batch_seconds: float = Field(default=0.05, ge=0)
    # "granian" (embedded, Rust HTTP stack) or "uvicorn".
    http_server: str = "granian"
    # The answer routes served by the edge itself rather than through Litestar's layers
    # (the same code, a tenth less CPU per request); off sends them through Litestar.
    direct_routes: bool = True

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

    @property
    def tiers_path(self) -> Path:
        return self.common.config_dir / self.tiers_file
