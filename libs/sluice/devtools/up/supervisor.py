"""``sluice up``: the whole product on one machine, supervised.

Starts, in order: an embedded NATS server with JetStream (unless ``SLUICE_NATS_URL``
names one), the local model on llama.cpp's ``llama-server`` (unless ``--no-model`` or
``SLUICE_LLAMA_URL``), optionally the simulated provider (``--simulator``), and the five
services as child processes. The cache keeps its entries in JetStream KV, so there is no
Qdrant or other store process to start. Once every service answers ready on its NATS health
subject it prints where to point a client, then watches the children: if one dies, it
says which and shows the end of its log, stops the rest and exits non-zero. Ctrl-C or
SIGTERM stops everything in reverse order: SIGTERM to the services, wait for their
graceful shutdown, then the simulator, the model server and NATS.

On POSIX the supervisor runs in a session of its own, forked from the command the user
started: a Ctrl-C in the terminal then reaches only that command, which forwards it as
one orderly stop, instead of reaching NATS and every service at the same moment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TextIO

from pydantic import TypeAdapter, ValidationError

from sluice.devtools.embedded import EmbeddedNats, wait_for_port
from sluice.topology import DEFAULT_PORTS, SERVICE_PACKAGES, Collections, ServiceName, Subjects

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
DEFAULT_STATE_DIR = ".sluice"
DEFAULT_CONFIG_DIR = "config"
LOCAL_MODEL = "qwen2.5-coder-0.5b"
SIMULATED_MODEL = "sim-fast"
LOG_ROTATE_BYTES = 10 * 1024 * 1024
# Seconds beyond the services' own shutdown grace before they are killed.
STOP_MARGIN_SECONDS = 10.0
PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """A start-up problem the user can fix; printed without a traceback."""


class StopRequested(Exception):
    """SIGINT or SIGTERM arrived: stop everything that was started."""


class ChildExited(Exception):
    def __init__(self, child: Child) -> None:
        super().__init__(f"{child.name} exited with code {child.process.returncode}")
        self.child = child


# --- children ---------------------------------------------------------------------------


@dataclass
class Child:
    """One process the launcher started, with its log and how to stop it."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path | None
    log_offset: int = 0
    is_service: bool = False
    stopper: Callable[[float], None] | None = None

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, max_lines: int = 40) -> str:
        """The last lines this run wrote to the child's log."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as fh:
            fh.seek(self.log_offset)
            data = fh.read()
        lines = data.decode("utf-8", errors="replace").splitlines()
        return "\n".join(lines[-max_lines:])

    def stop(self, timeout: float) -> None:
        if self.stopper is not None:
            self.stopper(timeout)
            return
        if not self.alive():
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def prepare_log(path: Path) -> int:
    """Rotate a large log once, and return the offset where this run's output starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > LOG_ROTATE_BYTES:
        path.replace(path.with_name(path.name + ".1"))
    return path.stat().st_size if path.exists() else 0


def _set_parent_death_signal() -> None:
    """Linux: receive SIGTERM when the parent dies, so a killed launcher leaves no orphans."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def spawn(
    name: str,
    argv: list[str],
    *,
    env: dict[str, str],
    log_path: Path,
    cwd: Path | None = None,
    is_service: bool = False,
) -> Child:
    """Start ``argv`` in its own session (terminal signals go to the launcher only)."""
    offset = prepare_log(log_path)
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_set_parent_death_signal if sys.platform == "linux" else None,  # noqa: PLW1509
        )
    return Child(name, proc, log_path, offset, is_service=is_service)


def stop_children(
    children: list[Child], grace: float, *, hurry: Callable[[], bool] = lambda: False
) -> None:
    """Stop in reverse start order: all services at once (SIGTERM, then wait up to
    ``grace``), then the other children one by one."""
    services = [c for c in reversed(children) if c.is_service and c.alive()]
    for child in services:
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in services:
        while child.alive() and time.monotonic() < deadline and not hurry():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(0.2)
        if child.alive():
            child.process.kill()
            child.process.wait()
    for child in reversed(children):
        if not child.is_service:
            child.stop(2.0 if hurry() else 10.0)


# --- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class PortUse:
    port: int
    host: str
    what: str
    env_var: str


@dataclass(frozen=True)
class ServicePlan:
    """How one service is started: module, ports and the env vars that carry them."""

    name: ServiceName
    module: str
    grpc_port: int
    metrics_port: int
    http_port: int | None = None
    http_host: str = "127.0.0.1"

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
        uses = [PortUse(self.grpc_port, "0.0.0.0", f"{self.name} gRPC", f"{self.prefix}GRPC_PORT")]
        if self.http_port is not None:
            uses.append(
                PortUse(self.http_port, self.http_host, f"{self.name} HTTP", f"{self.prefix}PORT")
            )
        else:
            uses.append(
                PortUse(
                    self.metrics_port,
                    "0.0.0.0",
                    f"{self.name} metrics",
                    f"{self.prefix}METRICS_PORT",
                )
            )
        return uses


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not a port number") from None


def plan_services(env: dict[str, str]) -> list[ServicePlan]:
    """Ports from the environment (``SLUICE_<SERVICE>_GRPC_PORT`` ...), else the defaults
    of ``sluice.topology.DEFAULT_PORTS``."""
    plans: list[ServicePlan] = []
    for name in SERVICE_ORDER:
        defaults = DEFAULT_PORTS[name]
        prefix = SERVICE_ENV_PREFIX[name]
        grpc_port = _env_int(env, f"{prefix}GRPC_PORT", defaults.grpc)
        if defaults.http is not None:
            http_port = _env_int(env, f"{prefix}PORT", defaults.http)
            host = env.get(f"{prefix}HOST") or "127.0.0.1"
            plans.append(
                ServicePlan(name, SERVICE_MODULES[name], grpc_port, http_port, http_port, host)
            )
        else:
            metrics_port = _env_int(env, f"{prefix}METRICS_PORT", defaults.metrics)
            plans.append(ServicePlan(name, SERVICE_MODULES[name], grpc_port, metrics_port))
    return plans


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
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


# --- output ------------------------------------------------------------------------------


class Console:
    """Progress lines; on a terminal the current step rewrites one line in place."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._lock = threading.Lock()
        self._pending = False
        self._last_plain = 0.0

    def say(self, text: str) -> None:
        with self._lock:
            if self._pending:
                self.stream.write("\r\033[K" if self.tty else "")
                self._pending = False
            self.stream.write(text + "\n")
            self.stream.flush()

    def status(self, text: str, *, plain_every: float = 10.0) -> None:
        """A transient status line (in place on a terminal, every ``plain_every`` s otherwise)."""
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[K" + text)
                self._pending = True
            elif time.monotonic() - self._last_plain >= plain_every:
                self.stream.write(text + "\n")
                self._last_plain = time.monotonic()
            self.stream.flush()


@contextlib.contextmanager
def ticker(
    console: Console, status: Callable[[float], str], interval: float = 0.5
) -> Iterator[None]:
    """Show ``status(elapsed_seconds)`` every ``interval`` seconds while the block runs."""
    stop = threading.Event()
    start = time.monotonic()

    def loop() -> None:
        while not stop.wait(interval):
            console.status(status(time.monotonic() - start))

    thread = threading.Thread(target=loop, name="sluice-up-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MiB"


# --- readiness ---------------------------------------------------------------------------


async def wait_services_ready(
    nats_url: str,
    names: list[ServiceName],
    limit_seconds: float,
    *,
    on_tick: Callable[[set[ServiceName], float], None] | None = None,
) -> None:
    """Ask every service on ``Subjects.health(<service>)`` until all answer ready.

    ``on_tick(pending, elapsed)`` runs between rounds; it may raise to abort the wait
    (a child died, a stop was requested).
    """
    from sluice.bus import Bus
    from sluice.common.v1 import chat_pb2

    bus = await Bus.connect(nats_url, "sluice-up")
    try:
        start = time.monotonic()
        pending = set(names)

        async def probe(name: ServiceName) -> None:
            with contextlib.suppress(Exception):
                status = await bus.request(
                    Subjects.health(name),
                    chat_pb2.ServiceStatus(),
                    chat_pb2.ServiceStatus,
                    timeout=0.5,
                )
                if status.ready:
                    pending.discard(name)

        while pending:
            await asyncio.gather(*(probe(n) for n in sorted(pending)))
            elapsed = time.monotonic() - start
            if on_tick is not None:
                on_tick(pending, elapsed)
            if not pending:
                break
            if elapsed > limit_seconds:
                raise TimeoutError(
                    f"not ready after {limit_seconds:.0f}s: {', '.join(sorted(pending))}"
                )
            await asyncio.sleep(0.2)
    finally:
        await bus.close()


# --- the launcher ------------------------------------------------------------------------


@dataclass
class Launcher:
    args: argparse.Namespace
    console: Console = field(default_factory=Console)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    children: list[Child] = field(default_factory=list)
    nats_url: str = ""
    llama_url: str | None = None
    simulator_url: str | None = None
    plans: list[ServicePlan] = field(default_factory=list)
    _stopping: bool = False
    _hurry: bool = False
    _defer: int = 0
    _stop_pending: str | None = None
    _lock_file: IO[str] | None = None

    @property
    def state_dir(self) -> Path:
        return Path(self.args.state_dir)

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    # --- signals ---------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._stopping:
            # A second Ctrl-C: do not wait for graceful shutdowns any longer.
            self._hurry = True
            return
        name = signal.Signals(signum).name
        if self._defer:
            self._stop_pending = name
            return
        self._stopping = True
        raise StopRequested(name)

    @contextlib.contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        """Hold a stop request until the block ends (never abandon a half-started child)."""
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
        self._raise_pending_stop()

    def _raise_pending_stop(self) -> None:
        if self._stop_pending is not None and not self._defer and not self._stopping:
            self._stopping = True
            raise StopRequested(self._stop_pending)

    # --- steps -----------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        code = 1
        try:
            self._lock_state_dir()
            self._preflight()
            self._start_nats()
            self._start_model()
            self._start_simulator()
            self.console.say(self._cache_stores())
            self._start_services()
            self._wait_ready()
            self._print_banner()
            self._supervise()
        except StopRequested as stop:
            self.console.say(f"\n{stop} received: stopping (Ctrl-C again to hurry)")
            code = 0
        except ChildExited as exc:
            child = exc.child
            self.console.say(
                f"\nerror: {child.name} exited unexpectedly (code {child.process.returncode})"
            )
            self._show_tail(child)
            code = 1
        except (LaunchError, TimeoutError) as exc:
            self.console.say(f"\nerror: {exc}")
            code = 1
        finally:
            self._stopping = True
            self._stop_all()
            if self._lock_file is not None:
                self._lock_file.close()
        return code

    def _show_tail(self, child: Child) -> None:
        tail = child.log_tail()
        if child.log_path is not None:
            self.console.say(f"--- last lines of {child.log_path}")
        self.console.say(tail or "(the log is empty)")
        self.console.say("---")

    def _cache_stores(self) -> str:
        exact = "cache: exact answers in JetStream KV"
        enabled = os.environ.get("SLUICE_CACHE_SEMANTIC_ENABLED", "true")
        # Read as the cache's settings read it; a value they reject stops the cache anyway.
        with contextlib.suppress(ValidationError):
            if not TypeAdapter(bool).validate_python(enabled):
                return f"{exact}; semantic cache off"
        if os.environ.get("QDRANT_URL"):
            # The URL may carry credentials: say only that a server is used.
            return f"{exact}; semantic vectors on the Qdrant server in QDRANT_URL"
        local = self.state_dir / Collections.LOCAL_DIRNAME
        return f"{exact}; semantic vectors in Qdrant local mode ({local}, inside the cache)"

    def _lock_state_dir(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock = (self.state_dir / "up.lock").open("a+", encoding="utf-8")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            lock.close()
            raise LaunchError(
                f"another 'sluice up' (pid {owner}) is running with state dir {self.state_dir}; "
                "stop it, or use another SLUICE_STATE_DIR"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock_file = lock

    def _preflight(self) -> None:
        self.plans = plan_services(self.env)
        uses = [use for plan in self.plans for use in plan.ports()]
        if not self.env.get("SLUICE_NATS_URL"):
            for variable, what in (
                ("SLUICE_NATS_PORT", "NATS"),
                ("SLUICE_NATS_MONITOR_PORT", "NATS monitoring"),
            ):
                if self.env.get(variable):
                    uses.append(
                        PortUse(_env_int(self.env, variable, 0), "127.0.0.1", what, variable)
                    )
        if self._wants_model():
            uses.append(
                PortUse(self._llama_port(), "127.0.0.1", "llama-server", "SLUICE_LLAMA_PORT")
            )
        if self.args.simulator:
            uses.append(
                PortUse(self._simulator_port(), "127.0.0.1", "simulator", "SLUICE_SIM_PORT")
            )
        check_ports(uses)

    def _wants_model(self) -> bool:
        return not self.args.no_model and not self.env.get("SLUICE_LLAMA_URL")

    def _llama_port(self) -> int:
        return _env_int(self.env, "SLUICE_LLAMA_PORT", DEFAULT_LLAMA_PORT)

    def _simulator_port(self) -> int:
        return _env_int(self.env, "SLUICE_SIM_PORT", DEFAULT_SIMULATOR_PORT)

    def _start_nats(self) -> None:
        external = self.env.get("SLUICE_NATS_URL")
        if external:
            self.nats_url = external
            self.console.say(f"nats: using {external} (SLUICE_NATS_URL)")
            return
        port = _env_int(self.env, "SLUICE_NATS_PORT", 0) or None
        monitor_port = _env_int(self.env, "SLUICE_NATS_MONITOR_PORT", 0) or None
        log_path = self.logs_dir / "nats.log"
        offset = prepare_log(log_path)
        with self._signals_deferred():
            try:
                nats = EmbeddedNats.start(
                    self.state_dir / "nats",
                    port=port,
                    log_file=log_path,
                    monitor_port=monitor_port,
                )
            except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
                raise LaunchError(f"the embedded NATS server did not start: {exc}") from exc
            self.children.append(Child("nats", nats.process, log_path, offset, stopper=nats.stop))
        self.nats_url = nats.url
        self.console.say(f"nats: {nats.url} with JetStream, store {self.state_dir / 'nats'}")
        if monitor_port:
            self.console.say(f"nats: monitoring at http://127.0.0.1:{monitor_port}/connz")

    def _start_model(self) -> None:
        external = self.env.get("SLUICE_LLAMA_URL")
        if external:
            self.llama_url = external
            self.console.say(f"model: using {external} (SLUICE_LLAMA_URL)")
            return
        if self.args.no_model:
            self.console.say("model: not started (--no-model)")
            return
        from sluice.devtools import localmodel

        models_dir = Path(self.args.models_dir or self.state_dir / "models")
        tmp = models_dir / f".{localmodel.MODEL_FILENAME}.{os.getpid()}.tmp"
        total = localmodel.MODEL_SIZE

        def assembly_status(elapsed: float) -> str:
            try:
                done = tmp.stat().st_size
            except OSError:
                return f"model: checking {models_dir / localmodel.MODEL_FILENAME} ({elapsed:.0f}s)"
            return (
                f"model: assembling and verifying {_mib(done)} / {_mib(total)} "
                f"({100 * done // total}%, {elapsed:.0f}s)"
            )

        self.console.say(
            f"model: preparing {localmodel.MODEL_FILENAME} in {models_dir} "
            f"(the first run assembles and hashes {_mib(total)})"
        )
        try:
            with ticker(self.console, assembly_status):
                model_path = localmodel.ensure_model(models_dir)
        except (localmodel.ModelAssemblyError, OSError) as exc:
            raise LaunchError(f"the local model is not available: {exc}") from exc
        self.console.say(f"model: {model_path} verified")

        port = self._llama_port()
        log_path = self.logs_dir / "llama-server.log"
        offset = prepare_log(log_path)
        with self._signals_deferred():
            try:
                proc = localmodel.start_llama_server(model_path, port, log_file=log_path)
            except (FileNotFoundError, OSError) as exc:
                raise LaunchError(f"llama-server did not start: {exc}") from exc
            child = Child("llama-server", proc, log_path, offset)
            self.children.append(child)
        try:
            with ticker(
                self.console, lambda s: f"model: llama-server loading on port {port} ({s:.0f}s)"
            ):
                localmodel.wait_llama_ready(port, self.args.model_timeout, proc)
        except RuntimeError:
            raise ChildExited(child) from None
        except TimeoutError as exc:
            self._show_tail(child)
            raise LaunchError(str(exc)) from exc
        self.llama_url = f"http://127.0.0.1:{port}/v1"
        self.console.say(f"model: llama-server ready at {self.llama_url} (log {log_path})")

    def _start_simulator(self) -> None:
        if not self.args.simulator:
            return
        port = self._simulator_port()
        log_path = self.logs_dir / "simulator.log"
        with self._signals_deferred():
            child = spawn(
                "simulator",
                [sys.executable, "-m", "sluice.devtools.cli", "simulator", "--port", str(port)],
                env={**self.env, "PYTHONUNBUFFERED": "1"},
                log_path=log_path,
            )
            self.children.append(child)
        try:
            wait_for_port("127.0.0.1", port, 30, child.process)
        except RuntimeError:
            raise ChildExited(child) from None
        except TimeoutError as exc:
            raise LaunchError(f"the simulator did not listen: {exc}") from exc
        self.simulator_url = f"http://127.0.0.1:{port}/v1"
        self.console.say(f"simulator: {self.simulator_url} (log {log_path})")

    def service_env(self, plan: ServicePlan) -> dict[str, str]:
        env = dict(self.env)
        env.update(
            {
                "SLUICE_NATS_URL": self.nats_url,
                "SLUICE_STATE_DIR": str(self.state_dir.resolve()),
                "SLUICE_CONFIG_DIR": str(Path(self.args.config_dir).resolve()),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.llama_url:
            env["SLUICE_LLAMA_URL"] = self.llama_url
        if self.simulator_url:
            env["SLUICE_SIMULATOR_URL"] = self.simulator_url
        env.update(plan.env())
        return env

    def _start_services(self) -> None:
        for plan in self.plans:
            with self._signals_deferred():
                child = spawn(
                    str(plan.name),
                    [sys.executable, "-m", plan.module],
                    env=self.service_env(plan),
                    log_path=self.logs_dir / f"{plan.name}.log",
                    is_service=True,
                )
                self.children.append(child)
        self.console.say(
            f"services: started {', '.join(str(p.name) for p in self.plans)} "
            f"(logs in {self.logs_dir}/)"
        )

    def _check_children(self) -> None:
        for child in self.children:
            if not child.alive():
                raise ChildExited(child)

    def _wait_ready(self) -> None:
        names = [plan.name for plan in self.plans]
        # The probe connection's own reconnect chatter is not news here.
        logging.getLogger("sluice.bus").setLevel(logging.ERROR)

        def on_tick(pending: set[ServiceName], elapsed: float) -> None:
            self._raise_pending_stop_now()
            self._check_children()
            if pending:
                self.console.status(
                    f"services: waiting for {', '.join(sorted(pending))} ({elapsed:.0f}s)",
                    plain_every=5.0,
                )

        # The stop request is held while the event loop runs, then raised between rounds.
        with self._signals_deferred():
            try:
                asyncio.run(
                    wait_services_ready(
                        self.nats_url, names, self.args.ready_timeout, on_tick=on_tick
                    )
                )
            except (StopRequested, ChildExited, TimeoutError):
                raise
            except Exception as exc:
                self._check_children()
                raise LaunchError(f"cannot ask the services for readiness: {exc!r}") from exc
        self.console.say("services: all five ready")

    def _raise_pending_stop_now(self) -> None:
        if self._stop_pending is not None and not self._stopping:
            self._stopping = True
            raise StopRequested(self._stop_pending)

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

    def _print_banner(self) -> None:
        gateway = next(p for p in self.plans if p.name is ServiceName.GATEWAY)
        host = "127.0.0.1" if gateway.http_host in {"0.0.0.0", "::"} else gateway.http_host
        url = f"http://{host}:{gateway.http_port}"
        key, key_source = self.dev_key()
        shown_key = key or f"(not found: see {key_source})"
        model = LOCAL_MODEL if self.llama_url or not self.simulator_url else SIMULATED_MODEL
        metrics = ", ".join(
            f"{p.name} :{p.metrics_port}" for p in self.plans if p.http_port is None
        )
        lines = [
            "",
            "Sluice is up.",
            "",
            f"  URL        {url}",
            f"  API key    {shown_key}   (from {key_source})",
            f"  Docs       {url}/docs",
            f"  Metrics    {url}/metrics; {metrics} (/metrics on each)",
            f"  NATS       {self.nats_url}",
            f"  Logs       {self.logs_dir}/",
            "",
            "  curl:",
            f"    curl {url}/v1/chat/completions \\",
            f"      -H 'Authorization: Bearer {key or '<key>'}' \\",
            "      -H 'Content-Type: application/json' \\",
            f'      -d \'{{"model": "{model}", "messages": '
            '[{"role": "user", "content": "Write hello world in Python"}]}\'',
            "",
            "  Python (openai SDK):",
            "    from openai import OpenAI",
            f'    client = OpenAI(base_url="{url}/v1", api_key="{key or "<key>"}")',
            f'    client.chat.completions.create(model="{model}", '
            'messages=[{"role": "user", "content": "hi"}])',
            "",
            "  Python (anthropic SDK, POST /v1/messages):",
            "    from anthropic import Anthropic",
            f'    client = Anthropic(base_url="{url}", api_key="{key or "<key>"}")',
            f'    client.messages.create(model="{model}", max_tokens=256, '
            'messages=[{"role": "user", "content": "hi"}])',
            "",
            "  The last request as a trace:  .venv/bin/sluice trace --last",
            "",
            "Ctrl-C stops everything.",
        ]
        self.console.say("\n".join(lines))

    def _supervise(self) -> None:
        while True:
            self._check_children()
            time.sleep(0.5)

    def _stop_all(self) -> None:
        if not self.children:
            return
        grace = float(self.env.get("SLUICE_SHUTDOWN_GRACE_SECONDS") or 20.0) + STOP_MARGIN_SECONDS
        running = [c.name for c in reversed(self.children) if c.alive()]
        if running:
            self.console.say(f"stopping: {', '.join(running)}")
        stop_children(self.children, grace, hurry=lambda: self._hurry)
        self.children.clear()
        self.console.say("stopped")


# --- entry point -------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sluice up",
        description="Start NATS, the local model and the five Sluice services, and supervise "
        "them until Ctrl-C. Ports and addresses come from SLUICE_* environment variables.",
    )
    parser.add_argument(
        "--state-dir",
        default=os.environ.get("SLUICE_STATE_DIR") or DEFAULT_STATE_DIR,
        help="local state: JetStream store, logs, spans, ledger, dev key "
        "(default: $SLUICE_STATE_DIR or .sluice)",
    )
    parser.add_argument(
        "--config-dir",
        default=os.environ.get("SLUICE_CONFIG_DIR") or DEFAULT_CONFIG_DIR,
        help="providers.yaml and prices.yaml (default: $SLUICE_CONFIG_DIR or config)",
    )
    parser.add_argument(
        "--no-model", action="store_true", help="do not start the local model server"
    )
    parser.add_argument(
        "--models-dir",
        default=None,
        help="where the assembled model file lives (default: <state-dir>/models)",
    )
    parser.add_argument(
        "--simulator",
        action="store_true",
        help="also start the simulated provider (port $SLUICE_SIM_PORT or 8090)",
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=120.0, help="seconds to wait for the services"
    )
    parser.add_argument(
        "--model-timeout", type=float, default=300.0, help="seconds to wait for llama-server"
    )
    parser.add_argument(
        "--foreground",
        action="store_true",
        help="supervise from this process instead of a session of its own",
    )
    return parser.parse_args(argv)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def run_in_own_session(body: Callable[[], int]) -> int:
    """Run ``body`` in a forked child that leads a new session, and forward signals to it.

    Terminal signals (Ctrl-C) then reach this process only; it passes them on to the
    supervisor, which stops its children in order.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the supervisor
        code = 1
        try:
            os.setsid()
            if sys.platform == "linux":
                _set_parent_death_signal()
            # The parent may have died before the death signal was set.
            code = body() if os.getppid() == parent else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def forward(signum: int, _frame: FrameType | None) -> None:
        # The supervisor stops in order on the first signal and hurries on the next.
        sig = signum if signum in (signal.SIGINT, signal.SIGTERM) else signal.SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    _, status = os.waitpid(pid, 0)
    return _exit_code(status)


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def body() -> int:
        return Launcher(args).run()

    if args.foreground or os.name != "posix":
        return body()
    return run_in_own_session(body)
