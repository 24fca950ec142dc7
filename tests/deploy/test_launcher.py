"""``sluice up``: port planning and checks, ordered shutdown, and the real thing (NATS,
the simulator and the five services) started, used and stopped with Ctrl-C."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from sluice.devtools.embedded import free_port
from sluice.devtools.up.plan import (
    SERVICE_ENV_PREFIX,
    LaunchError,
    PortUse,
    check_ports,
    plan_services,
)
from sluice.devtools.up.supervisor import Child, spawn, stop_children
from sluice.topology import ALL_SERVICES, DEFAULT_PORTS, Collections, ServiceName

REPO = Path(__file__).resolve().parents[2]


# --- units -------------------------------------------------------------------------------


def test_plan_uses_topology_defaults_and_env_overrides() -> None:
    plans = {p.name: p for p in plan_services({})}
    assert set(plans) == set(ALL_SERVICES)
    for name, plan in plans.items():
        assert plan.grpc_port == DEFAULT_PORTS[name].grpc
        assert plan.metrics_port == DEFAULT_PORTS[name].metrics
    assert plans[ServiceName.GATEWAY].http_port == 8080

    plans = {p.name: p for p in plan_services({"SLUICE_WORKER_GRPC_PORT": "6000"})}
    assert plans[ServiceName.INFERENCE_WORKER].env() == {
        "SLUICE_WORKER_GRPC_PORT": "6000",
        "SLUICE_WORKER_METRICS_PORT": str(DEFAULT_PORTS[ServiceName.INFERENCE_WORKER].metrics),
    }
    assert plans[ServiceName.GATEWAY].env() == {
        "SLUICE_GATEWAY_GRPC_PORT": "50051",
        "SLUICE_GATEWAY_PORT": "8080",
    }
    with pytest.raises(LaunchError, match="SLUICE_GATEWAY_PORT"):
        plan_services({"SLUICE_GATEWAY_PORT": "http"})


def test_services_start_last_gateway_last() -> None:
    names = [p.name for p in plan_services({})]
    assert names[-1] is ServiceName.GATEWAY


def test_a_taken_port_names_the_variable_to_change() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(LaunchError) as info:
            check_ports([PortUse(port, "127.0.0.1", "gateway HTTP", "SLUICE_GATEWAY_PORT")])
    message = str(info.value)
    assert f"port {port} (gateway HTTP) is already in use" in message
    assert "SLUICE_GATEWAY_PORT=" in message


def test_a_port_configured_twice_is_refused() -> None:
    port = free_port()
    with pytest.raises(LaunchError, match="configured for both"):
        check_ports(
            [
                PortUse(port, "127.0.0.1", "limiter gRPC", "SLUICE_LIMITER_GRPC_PORT"),
                PortUse(port, "127.0.0.1", "cache gRPC", "SLUICE_CACHE_GRPC_PORT"),
            ]
        )


def test_log_tail_shows_this_run_only(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    log.write_text("old run\n")
    child = spawn(
        "svc",
        [sys.executable, "-c", "print('new run'); raise SystemExit(3)"],
        env=dict(os.environ),
        log_path=log,
    )
    assert child.process.wait(10) == 3
    assert child.log_tail() == "new run"


def test_stop_children_stops_services_before_infrastructure(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    env = dict(os.environ)
    order: list[str] = []
    infra = spawn("nats", sleeper, env=env, log_path=tmp_path / "nats.log")
    services = [
        spawn(name, sleeper, env=env, log_path=tmp_path / f"{name}.log", is_service=True)
        for name in ("limiter", "gateway")
    ]

    def stop_infra(timeout: float) -> None:
        order.append("nats")
        assert not any(s.alive() for s in services), "services must be gone before NATS"
        infra.process.terminate()
        infra.process.wait(timeout)

    infra.stopper = stop_infra
    stop_children([infra, *services], grace=10)
    assert order == ["nats"]
    assert not infra.alive() and not any(s.alive() for s in services)


def test_stop_children_kills_a_service_that_ignores_sigterm(tmp_path: Path) -> None:
    stubborn = spawn(
        "stubborn",
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        env=dict(os.environ),
        log_path=tmp_path / "stubborn.log",
        is_service=True,
    )
    deadline = time.monotonic() + 10
    while "ready" not in stubborn.log_tail() and time.monotonic() < deadline:
        time.sleep(0.05)
    start = time.monotonic()
    stop_children([stubborn], grace=0.5)
    assert stubborn.process.returncode == -signal.SIGKILL
    assert time.monotonic() - start < 5


def test_child_stop_terminates(tmp_path: Path) -> None:
    child: Child = spawn(
        "sleeper",
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env=dict(os.environ),
        log_path=tmp_path / "s.log",
    )
    child.stop(5)
    assert not child.alive()


# --- the real thing ----------------------------------------------------------------------


def isolated_env(state_dir: Path) -> dict[str, str]:
    """No SLUICE_* from the caller; every port free, so the test never meets a running
    stack or another test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env["SLUICE_STATE_DIR"] = str(state_dir)
    env["SLUICE_SHUTDOWN_GRACE_SECONDS"] = "5"
    env["SLUICE_SIM_PORT"] = str(free_port())
    for name in ALL_SERVICES:
        prefix = SERVICE_ENV_PREFIX[name]
        env[f"{prefix}GRPC_PORT"] = str(free_port())
        if name is ServiceName.GATEWAY:
            env[f"{prefix}PORT"] = str(free_port())
        else:
            env[f"{prefix}METRICS_PORT"] = str(free_port())
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Up:
    """``sluice up`` as a child process whose output is read line by line."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sluice.devtools.cli", "up", *args],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.output.append(line)
            if text in line:
                return
        raise AssertionError(f"{text!r} not printed; output:\n{''.join(self.output)}")

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        while (line := self.lines.get(timeout=5)) is not None:
            self.output.append(line)
        return code

    @property
    def text(self) -> str:
        return "".join(self.output)


def processes_using(state_dir: Path) -> list[int]:
    """Processes whose environment names this state dir (Linux /proc)."""
    marker = f"SLUICE_STATE_DIR={state_dir}".encode()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def wait_gone(state_dir: Path, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    left = processes_using(state_dir)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = processes_using(state_dir)
    return left


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "state"
    yield path
    for pid in processes_using(path):
        os.kill(pid, signal.SIGKILL)


needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="Linux only")


@pytest.mark.integration
@pytest.mark.slow
@needs_proc
def test_up_serves_and_ctrl_c_stops_everything(state_dir: Path) -> None:
    env = isolated_env(state_dir)
    up = Up(env, "--no-model", "--simulator")
    try:
        up.wait_for("Ctrl-C stops everything.", timeout=150)
    finally:
        if up.process.poll() is not None:
            up.finish(5)
    text = up.text
    gateway = f"http://127.0.0.1:{env['SLUICE_GATEWAY_PORT']}"
    assert f"URL        {gateway}" in text
    key = (state_dir / "dev-key").read_text().strip()
    assert key in text, "the generated dev key is printed"
    assert f'OpenAI(base_url="{gateway}/v1"' in text
    assert f'Anthropic(base_url="{gateway}"' in text, "the Anthropic SDK's base has no /v1"
    assert "sluice trace --last" in text
    qdrant = state_dir / Collections.LOCAL_DIRNAME
    assert f"semantic vectors in Qdrant local mode ({qdrant}" in text
    assert qdrant.is_dir(), "the cache keeps its semantic index under the state dir"
    with urllib.request.urlopen(f"{gateway}/healthz", timeout=5) as resp:
        assert resp.status == 200
    for name in ("gateway", "limiter", "cache", "inference-worker", "cost-tracker"):
        assert (state_dir / "logs" / f"{name}.log").is_file()
    children = processes_using(state_dir)
    assert len(children) >= 7  # nats, simulator, five services

    up.process.send_signal(signal.SIGINT)
    assert up.finish(timeout=90) == 0, up.text
    assert "stopping: gateway" in up.text
    assert wait_gone(state_dir) == []


@pytest.mark.integration
@pytest.mark.slow
@needs_proc
def test_up_reports_a_dead_service_and_stops_the_rest(state_dir: Path) -> None:
    env = isolated_env(state_dir)
    env["SLUICE_LIMITER_WINDOW_SECONDS"] = "-1"  # the limiter's settings refuse this
    up = Up(env, "--no-model")
    assert up.finish(timeout=120) == 1, up.text
    assert "error: limiter exited unexpectedly" in up.text
    assert "window_seconds" in up.text, "the end of the limiter's log is shown"
    assert wait_gone(state_dir) == []


@needs_proc
def test_up_refuses_a_taken_gateway_port(state_dir: Path) -> None:
    env = isolated_env(state_dir)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", int(env["SLUICE_GATEWAY_PORT"])))
        sock.listen()
        up = Up(env, "--no-model")
        assert up.finish(timeout=60) == 1
    assert "is already in use" in up.text
    assert "SLUICE_GATEWAY_PORT=" in up.text
    assert processes_using(state_dir) == []
