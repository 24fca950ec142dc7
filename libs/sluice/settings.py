"""Settings shared by every service. Each service adds its own class with its own prefix
(``SLUICE_<SERVICE>_``) and embeds these under ``common``."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from sluice.topology import default_listen_host


class ConfigFileError(ValueError):
    """A configuration file that cannot be used, and where: the service stops at start with
    this one message (``run_service``) rather than serve with settings nobody meant."""


class CommonSettings(BaseSettings):
    """What every process needs: where NATS is, where local state lives, who it is."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    # Event-loop turns the NATS client lets pass before it writes what was published
    # (``sluice.bus.CoalescingClient``): 0 writes at the first turn, as nats-py does.
    nats_flush_yields: int = Field(default=0, ge=0, le=8)
    # Local state: JetStream store of the embedded NATS, spans, SQLite ledger, Qdrant.
    state_dir: Path = Path(".sluice")
    # "local" allows generated dev secrets; anything else fails fast without real ones.
    environment: str = "local"
    # Address of the gRPC and metrics servers (the gateway's HTTP has SLUICE_GATEWAY_HOST).
    listen_host: str = Field(
        default_factory=lambda fields: default_listen_host(fields["environment"]), min_length=1
    )
    log_level: str = "INFO"
    instance_id: str = Field(default_factory=lambda: f"{os.getpid()}-{uuid.uuid4().hex[:6]}")
    # Seconds a service waits for in-flight work after SIGTERM before handing it back.
    shutdown_grace_seconds: float = 20.0
    # Config files (providers, prices). Relative paths resolve from the working directory.
    config_dir: Path = Path("config")
    # Bearer token every gRPC caller must send (sluice.grpc_edge). Unset (or empty) in a
    # local environment: generated once into <state_dir>/service-token and shared by
    # every process there; unset elsewhere: the service refuses to start.
    service_token: SecretStr | None = Field(default=None, repr=False)

    @property
    def is_local(self) -> bool:
        return self.environment == "local"
