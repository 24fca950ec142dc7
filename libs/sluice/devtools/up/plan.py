"""What ``sluice up`` starts, on which ports and with which environment.

Everything here is decided from the options and the environment before any process
starts, so that a configuration problem (a port taken or configured twice, a value that
is not a number) is reported, naming the variable to change, while nothing runs yet.
"""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass
from pathlib import Path

from sluice.topology import (
    DEFAULT_PORTS,
    SERVICE_PACKAGES,
    Collections,
    ServiceName,
    default_listen_host,
)

# Start order; stopping runs in reverse. The gateway comes last so that it finds the
# services it asks for readiness already up.
SERVICE_ORDER: tuple[ServiceName, ...] = (
    ServiceName.LIMITER,
    ServiceName.CACHE,
    ServiceName.COST_TRACKER,
    ServiceName.INFERENCE_WORKER,
    ServiceName.GATEWAY,
)

SERVICE_MODULES: dict[ServiceName, str] = {
    name: f"services.{package}" for name, package in SERVICE_PACKAGES.items()
}

# Env var prefix of each service's own settings class.
SERVICE_ENV_PREFIX: dict[ServiceName, str] = {
    ServiceName.GATEWAY: "SLUICE_GATEWAY_",
    ServiceName.LIMITER: "SLUICE_LIMITER_",
    ServiceName.CACHE: "SLUICE_CACHE_",
    ServiceName.INFERENCE_WORKER: "SLUICE_WORKER_",
    ServiceName.COST_TRACKER: "SLUICE_COST_",
}

DEFAULT_LLAMA_PORT = 8081
DEFAULT_SIMULATOR_PORT = 8090
DEFAULT_SHUTDOWN_GRACE_SECONDS = 20.0
LOCAL_MODEL = "qwen2.5-coder-0.5b"
SIMULATED_MODEL = "sim-fast"


class LaunchError(RuntimeError):
    """A start-up problem the user can fix; printed without a traceback."""


@dataclass(frozen=True)
class PortUse:
    port: int
    host: str
    what: str
    env_var: str


@dataclass(frozen=True)
class ServicePlan:
    """How one service is started: module, ports and the env vars that carry them.

    ``listen_host`` is where its gRPC and metrics servers listen (``SLUICE_LISTEN_HOST``),
    ``http_host`` where the gateway's HTTP does (``SLUICE_GATEWAY_HOST``).
    """

    name: ServiceName
    module: str
    grpc_port: int
    metrics_port: int
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    listen_host: str = "127.0.0.1"

    @property
    def prefix(self) -> str:
        return SERVICE_ENV_PREFIX[self.name]

    def env(self) -> dict[str, str]:
        env = {f"{self.prefix}GRPC_PORT": str(self.grpc_port)}
        if self.http_port is not None:
            env[f"{self.prefix}PORT"] = str(self.http_port)
        else:
            env[f"{self.prefix}METRICS_PORT"] = str(self.metrics_port)
        return env

    def ports(self) -> list[PortUse]:
        uses = [
            PortUse(
                self.grpc_port, self.listen_host, f"{self.name} gRPC", f"{self.prefix}GRPC_PORT"
            )
        ]
        if self.http_port is not None:
            uses.append(
                PortUse(self.http_port, self.http_host, f"{self.name} HTTP", f"{self.prefix}PORT")
            )
        else:
            uses.append(
                PortUse(
                    self.metrics_port,
                    self.listen_host,
                    f"{self.name} metrics",
                    f"{self.prefix}METRICS_PORT",
                )
            )
        return uses


def env_int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not a port number") from None


# The strings pydantic reads as a bool (lax mode), as the services' settings read them;
# the supervisor, which runs as long as the product, does not load pydantic for them.
TRUE_STRINGS = frozenset({"1", "on", "t", "true", "y", "yes"})
FALSE_STRINGS = frozenset({"0", "off", "f", "false", "n", "no"})


def env_bool(raw: str, *, default: bool) -> bool:
    """``raw`` as a service's settings read a bool, or ``default`` where they refuse it."""
    value = raw.lower()
    if value in TRUE_STRINGS:
        return True
    if value in FALSE_STRINGS:
        return False
    return default


def listen_host(env: dict[str, str]) -> str:
    """Where the services' gRPC and metrics servers will listen, read from ``env`` as
    ``sluice.settings.CommonSettings`` reads it from theirs."""
    return env.get("SLUICE_LISTEN_HOST") or default_listen_host(
        env.get("SLUICE_ENVIRONMENT", "local")
    )


def plan_services(env: dict[str, str]) -> list[ServicePlan]:
    """Ports from the environment (``SLUICE_<SERVICE>_GRPC_PORT`` ...), else the defaults
    of ``sluice.topology.DEFAULT_PORTS``."""
    plans: list[ServicePlan] = []
    services_host = listen_host(env)
    for name in SERVICE_ORDER:
        defaults = DEFAULT_PORTS[name]
        prefix = SERVICE_ENV_PREFIX[name]
        grpc_port = env_int(env, f"{prefix}GRPC_PORT", defaults.grpc)
        if defaults.http is not None:
            http_port = env_int(env, f"{prefix}PORT", defaults.http)
            host = env.get(f"{prefix}HOST") or "127.0.0.1"
            plans.append(
                ServicePlan(
                    name,
                    SERVICE_MODULES[name],
                    grpc_port,
                    http_port,
                    http_port,
                    http_host=host,
                    listen_host=services_host,
                )
            )
        else:
            metrics_port = env_int(env, f"{prefix}METRICS_PORT", defaults.metrics)
            plans.append(
                ServicePlan(
                    name,
                    SERVICE_MODULES[name],
                    grpc_port,
                    metrics_port,
                    listen_host=services_host,
                )
            )
    return plans


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def check_ports(uses: list[PortUse]) -> None:
    """Fail before starting anything when a port is taken, naming the variable to change."""
    seen: dict[int, PortUse] = {}
    problems: list[str] = []
    for use in uses:
        if use.port in seen:
            other = seen[use.port]
            problems.append(
                f"port {use.port} is configured for both {other.what} ({other.env_var}) "
                f"and {use.what} ({use.env_var})"
            )
            continue
        seen[use.port] = use
        if port_in_use(use.host, use.port):
            problems.append(
                f"port {use.port} ({use.what}) is already in use: stop what listens there, "
                f"or choose another port with {use.env_var}, e.g. "
                f"{use.env_var}={_suggest_port(use.port)} make run"
            )
    if problems:
        raise LaunchError("\n".join(problems))


def _suggest_port(port: int) -> int:
    for candidate in range(port + 1, port + 100):
        if not port_in_use("127.0.0.1", candidate):
            return candidate
    return port + 1


@dataclass(frozen=True)
class UpPlan:
    """Everything ``sluice up`` will start, read from its options and the environment.

    ``None`` for a port means that process is not started here: NATS or the model named
    by a URL (``external_*``), no model (``--no-model``), no simulator.
    """

    env: dict[str, str]
    state_dir: Path
    config_dir: Path
    models_dir: Path
    services: list[ServicePlan]
    external_nats_url: str | None
    nats_port: int | None
    nats_monitor_port: int | None
    external_llama_url: str | None
    llama_port: int | None
    simulator_port: int | None

    @classmethod
    def from_options(cls, args: argparse.Namespace, env: dict[str, str]) -> UpPlan:
        state_dir = Path(args.state_dir)
        services = plan_services(env)
        external_nats = env.get("SLUICE_NATS_URL") or None
        nats_port = monitor_port = None
        if external_nats is None:
            # 0 or unset: the embedded server takes a free port; no monitoring.
            nats_port = env_int(env, "SLUICE_NATS_PORT", 0) or None
            monitor_port = env_int(env, "SLUICE_NATS_MONITOR_PORT", 0) or None
        external_llama = env.get("SLUICE_LLAMA_URL") or None
        llama_port = None
        if external_llama is None and not args.no_model:
            llama_port = env_int(env, "SLUICE_LLAMA_PORT", DEFAULT_LLAMA_PORT)
        simulator_port = None
        if args.simulator:
            simulator_port = env_int(env, "SLUICE_SIM_PORT", DEFAULT_SIMULATOR_PORT)
        return cls(
            env=env,
            state_dir=state_dir,
            config_dir=Path(args.config_dir),
            models_dir=Path(args.models_dir or state_dir / "models"),
            services=services,
            external_nats_url=external_nats,
            nats_port=nats_port,
            nats_monitor_port=monitor_port,
            external_llama_url=external_llama,
            llama_port=llama_port,
            simulator_port=simulator_port,
        )

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def gateway(self) -> ServicePlan:
        return next(p for p in self.services if p.name is ServiceName.GATEWAY)

    @property
    def gateway_url(self) -> str:
        """Where a client on this machine reaches the gateway."""
        gateway = self.gateway
        host = "127.0.0.1" if gateway.http_host in {"0.0.0.0", "::"} else gateway.http_host
        return f"http://{host}:{gateway.http_port}"

    @property
    def client_model(self) -> str:
        """The model a client should ask for: the local one unless only the simulator runs."""
        uses_model = self.external_llama_url is not None or self.llama_port is not None
        return LOCAL_MODEL if uses_model or self.simulator_port is None else SIMULATED_MODEL

    @property
    def shutdown_grace_seconds(self) -> float:
        return float(
            self.env.get("SLUICE_SHUTDOWN_GRACE_SECONDS") or DEFAULT_SHUTDOWN_GRACE_SECONDS
        )

    def port_uses(self) -> list[PortUse]:
        uses = [use for plan in self.services for use in plan.ports()]
        for port, what, variable in (
            (self.nats_port, "NATS", "SLUICE_NATS_PORT"),
            (self.nats_monitor_port, "NATS monitoring", "SLUICE_NATS_MONITOR_PORT"),
            (self.llama_port, "llama-server", "SLUICE_LLAMA_PORT"),
            (self.simulator_port, "simulator", "SLUICE_SIM_PORT"),
        ):
            if port is not None:
                uses.append(PortUse(port, "127.0.0.1", what, variable))
        return uses

    def check_ports(self) -> None:
        check_ports(self.port_uses())

    def service_env(
        self,
        service: ServicePlan,
        *,
        nats_url: str,
        llama_url: str | None,
        simulator_url: str | None,
    ) -> dict[str, str]:
        env = dict(self.env)
        env.update(
            {
                "SLUICE_NATS_URL": nats_url,
                "SLUICE_STATE_DIR": str(self.state_dir.resolve()),
                "SLUICE_CONFIG_DIR": str(self.config_dir.resolve()),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if llama_url:
            env["SLUICE_LLAMA_URL"] = llama_url
        if simulator_url:
            env["SLUICE_SIMULATOR_URL"] = simulator_url
        env.update(service.env())
        return env

    def dev_key(self) -> tuple[str | None, str]:
        """The dev API key and where it came from."""
        for var in ("SLUICE_DEV_API_KEY", "SLUICE_GATEWAY_DEV_API_KEY"):
            if self.env.get(var):
                return self.env[var], var
        path = self.state_dir / "dev-key"
        try:
            return path.read_text(encoding="utf-8").strip(), str(path)
        except OSError:
            return None, str(path)

    @property
    def semantic_cache_enabled(self) -> bool:
        enabled = self.env.get("SLUICE_CACHE_SEMANTIC_ENABLED", "true")
        # Read as the cache's settings read it; a value they reject stops the cache anyway.
        return env_bool(enabled, default=True)

    @property
    def uses_qdrant_server(self) -> bool:
        return bool(self.env.get("QDRANT_URL"))

    @property
    def qdrant_local_dir(self) -> Path:
        return self.state_dir / Collections.LOCAL_DIRNAME
