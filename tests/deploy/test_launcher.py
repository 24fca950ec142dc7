"""``sluice up``: port planning and checks, ordered shutdown, and the real thing (NATS,
the simulator and the five services) started, used and stopped with Ctrl-C."""

from __future__ import annotations

import contextlib
import ipaddress
import json
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

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sluice.devtools.embedded import free_port
from sluice.devtools.up.plan import (
    SERVICE_ENV_PREFIX,
    LaunchError,
    PortUse,
    check_ports,
    env_bool,
    plan_services,
)
from sluice.devtools.up.supervisor import Child, spawn, stop_children
from sluice.topology import ALL_SERVICES, DEFAULT_PORTS, Collections, ServiceName

REPO = Path(__file__).resolve().parents[2]


# --- units -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "true",
        "True",
        "TRUE",
        "tRuE",
        "1",
        "yes",
        "y",
        "on",
        "t",
        "false",
        "False",
        "0",
        "no",
        "N",
        "off",
        "f",
        " true",
        "true ",
        "",
        "2",
        "none",
        "1.0",
        "enabled",
    ],
)
def test_the_launcher_reads_a_bool_as_the_services_settings_do(raw: str) -> None:
    """``sluice up`` reads SLUICE_CACHE_SEMANTIC_ENABLED without pydantic; pydantic's
    reading (the cache's settings) is the reference, a refused value keeps the default."""
    from pydantic import TypeAdapter, ValidationError

    try:
        expected = TypeAdapter(bool).validate_python(raw)
    except ValidationError:
        expected = None
    assert env_bool(raw, default=True) is (True if expected is None else expected)
    assert env_bool(raw, default=False) is (False if expected is None else expected)


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


def test_ports_are_checked_where_the_services_will_listen() -> None:
    def hosts(env: dict[str, str]) -> dict[str, str]:
        return {use.what: use.host for plan in plan_services(env) for use in plan.ports()}

    assert set(hosts({}).values()) == {"127.0.0.1"}
    deployed = hosts({"SLUICE_ENVIRONMENT": "production"})
    assert deployed["limiter gRPC"] == deployed["limiter metrics"] == "0.0.0.0"
    assert deployed["gateway gRPC"] == "0.0.0.0"
    assert deployed["gateway HTTP"] == "127.0.0.1", "SLUICE_GATEWAY_HOST alone moves the HTTP"
    chosen = hosts({"SLUICE_LISTEN_HOST": "::1", "SLUICE_GATEWAY_HOST": "0.0.0.0"})
    assert chosen["cache gRPC"] == "::1" and chosen["gateway HTTP"] == "0.0.0.0"


def test_a_taken_ipv6_loopback_port_is_seen() -> None:
    with socket.socket(socket.AF_INET6) as sock:
        try:
            sock.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(LaunchError, match="already in use"):
            check_ports([PortUse(port, "::1", "cache gRPC", "SLUICE_CACHE_GRPC_PORT")])


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
            # A process group of its own, as a shell gives a command: a Ctrl-C reaches
            # the whole group (os.killpg), as it would from a terminal.
            start_new_session=True,
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
    with urllib.request.urlopen(f"{gateway}/healthz", timeout=5) as resp:
        assert resp.status == 200
    # The semantic index opens on the first request that asks for it.
    chat = urllib.request.Request(
        f"{gateway}/v1/chat/completions",
        data=json.dumps(
            {
                "model": "sim-fast",
                "temperature": 0,
                "messages": [{"role": "user", "content": "Where is the semantic index?"}],
            }
        ).encode(),
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "X-Sluice-Semantic-Cache": "on",
        },
    )
    with urllib.request.urlopen(chat, timeout=30) as resp:
        assert resp.status == 200
    deadline = time.monotonic() + 60
    while not qdrant.is_dir():
        assert time.monotonic() < deadline, "the cache keeps its semantic index under the state dir"
        time.sleep(0.2)
    for name in ("gateway", "limiter", "cache", "inference-worker", "cost-tracker"):
        assert (state_dir / "logs" / f"{name}.log").is_file()
    children = processes_using(state_dir)
    assert len(children) >= 7  # nats, simulator, five services

    # As a terminal's Ctrl-C: SIGINT to the foreground process group. The children run in
    # sessions of their own, so only the supervisor gets it, and it stops them in order.
    os.killpg(up.process.pid, signal.SIGINT)
    assert up.finish(timeout=90) == 0, up.text
    assert "stopping: gateway" in up.text
    assert wait_gone(state_dir) == []


@pytest.mark.integration
@pytest.mark.slow
@needs_proc
def test_a_killed_supervisor_leaves_no_process_behind(state_dir: Path) -> None:
    """SIGKILL gives the supervisor no chance to stop anything: every child asked the
    kernel for SIGTERM when its parent dies, and stops by itself."""
    env = isolated_env(state_dir)
    up = Up(env, "--no-model", "--simulator")
    up.wait_for("URL ", timeout=120)
    assert len(processes_using(state_dir)) >= 8  # sluice up, nats, simulator, five services
    up.process.kill()
    up.finish(timeout=10)
    assert wait_gone(state_dir, timeout=30) == []


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


# --- where it listens -------------------------------------------------------------------

LOOPBACK = {"127.0.0.1", "::1"}
TCP_LISTEN = "0A"


def process_tree(root: int) -> set[int]:
    """``root`` and every process below it, from the parent ids in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields follow its last ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _address(hex_address: str) -> str:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in host byte order.

    gRPC binds 127.0.0.1 as an IPv6 socket on ``::ffff:127.0.0.1``: that one is given as
    the IPv4 address it stands for."""
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def listening_sockets() -> dict[int, tuple[str, int]]:
    """Inode -> (address, port) of every listening TCP socket in this network namespace."""
    sockets: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], int(fields[9])
                if state == TCP_LISTEN:
                    address, port = local.split(":")
                    sockets[inode] = (_address(address), int(port, 16))
    return sockets


def listeners_of(root: int) -> list[tuple[str, int, str]]:
    """(address, port, process) of every listening socket held by ``root``'s process tree."""
    listening = listening_sockets()
    found = []
    for pid in process_tree(root):
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        for inode in socket_inodes(pid) & listening.keys():
            address, port = listening[inode]
            found.append((address, port, name.strip()))
    return sorted(set(found))


def grpc_health_status(port: int) -> str:
    """The overall status the standard health service on ``port`` answers."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=30
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@pytest.mark.integration
@pytest.mark.slow
@needs_proc
@pytest.mark.parametrize(
    "with_model",
    [pytest.param(False, id="simulator"), pytest.param(True, id="model", marks=pytest.mark.model)],
)
def test_everything_up_starts_listens_on_loopback_only(state_dir: Path, with_model: bool) -> None:
    env = isolated_env(state_dir)
    env["SLUICE_NATS_MONITOR_PORT"] = str(free_port())
    expected = {int(v) for k, v in env.items() if k.endswith("_PORT")}
    args = ["--simulator"]
    if with_model:
        env["SLUICE_LLAMA_PORT"] = str(free_port())
        expected.add(int(env["SLUICE_LLAMA_PORT"]))
        # Shared with the other model tests (gitignored): the model is assembled once.
        args += ["--models-dir", str(REPO / ".sluice" / "models")]
    else:
        args.append("--no-model")
    up = Up(env, *args)
    try:
        up.wait_for("Ctrl-C stops everything.", timeout=300 if with_model else 150)
        # Every configured port is found among the tree's sockets before judging them, so
        # that a socket this test failed to see cannot pass for a loopback one.
        deadline = time.monotonic() + 10
        listeners = listeners_of(up.process.pid)
        while not expected <= {port for _, port, _ in listeners} and time.monotonic() < deadline:
            time.sleep(0.2)
            listeners = listeners_of(up.process.pid)
        # A gRPC port's server starts with its first caller (sluice.grpc_door), on a
        # loopback port of its own: asked once, each of those is judged too.
        for name, port in env.items():
            if name.endswith("_GRPC_PORT"):
                assert grpc_health_status(int(port)) == "SERVING", name
        listeners = listeners_of(up.process.pid)
    finally:
        up.process.send_signal(signal.SIGINT)
        code = up.finish(timeout=90)
    shown = "\n".join(f"  {address}:{port}  {process}" for address, port, process in listeners)
    missing = expected - {port for _, port, _ in listeners}
    assert not missing, f"ports {sorted(missing)} not found among the listeners:\n{shown}"
    exposed = [item for item in listeners if item[0] not in LOOPBACK]
    assert not exposed, f"listening beyond loopback:\n{shown}"
    assert code == 0, up.text
