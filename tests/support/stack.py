"""Real processes for tests: an embedded NATS on a free port and service processes.

Tests never rely on a NATS server already running on the machine.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from sluice import grpc_edge
from sluice.bus import Bus
from sluice.common.v1 import chat_pb2
from sluice.devtools.embedded import free_port, wait_for_port
from sluice.devtools.up.plan import SERVICE_ENV_PREFIX, SERVICE_MODULES
from sluice.service_token import read_or_create_token
from sluice.topology import ServiceName, Subjects

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def simulator(log_file: Path) -> Iterator[str]:
    """The simulated provider as its own process on a free port; yields its /v1 URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.devtools.cli", "simulator", "--port", str(port)],
        cwd=REPO,
        stdout=log_file.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", port, 20, proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass
class ServiceProcess:
    name: ServiceName
    process: subprocess.Popen[bytes]
    log_path: Path
    grpc_port: int
    metrics_port: int
    http_port: int | None = None

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 25) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@dataclass
class Stack:
    """Starts service processes against one NATS server and one state directory."""

    nats_url: str
    state_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[ServiceName, ServiceProcess] = field(default_factory=dict)

    def env_for(
        self, name: ServiceName, grpc_port: int, metrics_port: int, http_port: int | None
    ) -> dict[str, str]:
        env = dict(os.environ)
        prefix = SERVICE_ENV_PREFIX[name]
        env.update(
            {
                "SLUICE_NATS_URL": self.nats_url,
                "SLUICE_STATE_DIR": str(self.state_dir),
                "SLUICE_CONFIG_DIR": str(REPO / "config"),
                "SLUICE_SHUTDOWN_GRACE_SECONDS": "10",
                f"{prefix}GRPC_PORT": str(grpc_port),
                f"{prefix}METRICS_PORT": str(metrics_port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        # The services share the token generated in the state directory, which the tests
        # read (``service_token``), unless extra_env sets one.
        env.pop("SLUICE_SERVICE_TOKEN", None)
        if http_port is not None:
            env[f"{prefix}PORT"] = str(http_port)
        env.update(self.extra_env)
        return env

    def start(self, name: ServiceName, env: dict[str, str] | None = None) -> ServiceProcess:
        grpc_port, metrics_port = free_port(), free_port()
        http_port = free_port() if name is ServiceName.GATEWAY else None
        if name is ServiceName.GATEWAY:
            metrics_port = http_port  # type: ignore[assignment]
        full_env = self.env_for(name, grpc_port, metrics_port, http_port)
        full_env.update(env or {})
        log_path = self.state_dir / "logs" / f"{name}-{len(self.processes)}-{time.time_ns()}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", SERVICE_MODULES[name]],
            cwd=REPO,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        sp = ServiceProcess(name, proc, log_path, grpc_port, metrics_port, http_port)
        self.processes[name] = sp
        return sp

    async def wait_ready(self, names: list[ServiceName], timeout: float = 60) -> None:
        bus = await Bus.connect(self.nats_url, "tests-wait-ready")
        try:
            deadline = time.monotonic() + timeout
            pending = set(names)
            while pending and time.monotonic() < deadline:
                for name in list(pending):
                    proc = self.processes.get(name)
                    if proc is not None and proc.process.poll() is not None:
                        raise RuntimeError(f"{name} exited:\n{proc.log()[-4000:]}")
                    try:
                        status = await bus.request(
                            Subjects.health(name),
                            chat_pb2.ServiceStatus(),
                            chat_pb2.ServiceStatus,
                            timeout=0.5,
                        )
                        if status.ready:
                            pending.discard(name)
                    except Exception:
                        pass
                if pending:
                    await asyncio.sleep(0.1)
            if pending:
                logs = "\n".join(
                    f"--- {n}\n{self.processes[n].log()[-3000:]}"
                    for n in pending
                    if n in self.processes
                )
                raise TimeoutError(f"not ready after {timeout}s: {sorted(pending)}\n{logs}")
        finally:
            await bus.close()

    @property
    def service_token(self) -> str:
        """The token the stack's gRPC servers ask for."""
        return self.extra_env.get("SLUICE_SERVICE_TOKEN") or read_or_create_token(self.state_dir)

    def grpc_channel(self, name: ServiceName) -> grpc.aio.Channel:
        """A channel to the service's gRPC server whose calls carry the service token."""
        port = self.processes[name].grpc_port
        return grpc_edge.channel(f"127.0.0.1:{port}", self.service_token)

    def stop_all(self) -> None:
        for proc in list(self.processes.values()):
            proc.stop()
        self.processes.clear()
