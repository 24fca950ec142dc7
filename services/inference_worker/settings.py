"""Settings of the inference worker (``SLUICE_WORKER_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sluice.settings import CommonSettings
from sluice.topology import DEFAULT_PORTS, Consumers, PriorityClass, ServiceName

_PORTS = DEFAULT_PORTS[ServiceName.INFERENCE_WORKER]


class RetrySettings(BaseSettings):
    """Retries of one provider before its fallbacks are tried (``SLUICE_WORKER_RETRY_*``)."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_WORKER_RETRY_", extra="ignore")

    # Calls per model, the first included.
    attempts: int = 3
    base_delay_ms: int = 100
    max_delay_ms: int = 2000
    # A provider's Retry-After is honoured up to this; longer waits go to the fallback.
    retry_after_cap_ms: int = 5000


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_WORKER_", extra="ignore")

    grpc_port: int = _PORTS.grpc
    metrics_port: int = _PORTS.metrics
    # Work items processed at once by this process, across priority classes.
    concurrency: int = 64
    # How long one pull request waits at the server for a message.
    long_poll_seconds: float = 5.0
    # With free slots to spare, the most messages one pull may bring (see scheduling.py).
    # 1 by default: larger batches take bursts faster, but under overload they let in
    # more work than the gateways can relay (see the streams bench).
    pull_batch: int = Field(default=1, ge=1, le=256)
    # Near saturation, with every queue empty, free slots rotate between classes with
    # polls this short.
    short_poll_seconds: float = 0.1
    # Minimum share of the slots a class with a backlog gets while higher classes keep
    # the worker busy (0.1: one slot in ten; 0: strict priority, which can starve it).
    # Batch against system and interactive; interactive against system. See scheduling.py.
    batch_share: float = Field(default=0.1, ge=0.0, le=0.5)
    interactive_share: float = Field(default=0.1, ge=0.0, le=0.5)
    # Free slots batch work may not take (unless its share is due), kept for interactive
    # and system arrivals; None: concurrency // 16 (0 below 16 slots). See scheduling.py.
    reserved_slots: int | None = Field(default=None, ge=0)
    # Progress acks keep the JetStream claim on long generations (well below ack_wait,
    # which is short so that a dead worker's request moves on quickly).
    in_progress_interval_seconds: float = 3.0
    # Deliveries after which a work item is reported failed instead of retried again.
    max_deliveries: int = Consumers.WORKER[PriorityClass.INTERACTIVE].max_deliver
    # How often the queue depth gauge refreshes from JetStream.
    pending_poll_seconds: float = 5.0
    usage_publish_timeout_seconds: float = 5.0
    usage_publish_attempts: int = 5
    # Breakers, one per deployment (domain/circuit.py): open after this many failures in
    # a row, or when at least circuit_min_calls of the last circuit_window calls were
    # seen and circuit_failure_rate of them failed (errors, or slower than the route's
    # bounds); closed again by circuit_probes successful probe(s) after the cooldown.
    circuit_failure_threshold: int = Field(default=5, ge=1)
    circuit_window: int = Field(default=20, ge=1)
    circuit_min_calls: int = Field(default=10, ge=1)
    circuit_failure_rate: float = Field(default=0.5, gt=0.0, le=1.0)
    circuit_cooldown_seconds: float = Field(default=15.0, gt=0.0)
    circuit_probes: int = Field(default=1, ge=1)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    common: CommonSettings = Field(default_factory=CommonSettings)
