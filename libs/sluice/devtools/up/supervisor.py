"""The processes of ``sluice up``: start them, wait until the services answer ready,
watch them, and stop them in order, the services first with their graceful drain.

The supervisor is the process the user started. Every child runs in a session of its
own, so a Ctrl-C in the terminal reaches the supervisor alone, which turns it into one
orderly stop instead of NATS and every service stopping at the same moment. Each child
also asks the kernel for SIGTERM when the supervisor dies, so a supervisor killed
outright leaves no orphans.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from sluice.devtools.children import owned_child_options
from sluice.devtools.embedded import EmbeddedNats, wait_for_port
from sluice.devtools.up.console import Console
from sluice.devtools.up.plan import LaunchError, UpPlan
from sluice.devtools.up.ready import READY_TIMED_OUT

LOG_ROTATE_BYTES = 10 * 1024 * 1024
# Seconds beyond the services' own shutdown grace before they are killed.
STOP_MARGIN_SECONDS = 10.0


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


def spawn(
    name: str,
    argv: list[str],
    *,
    env: dict[str, str],
    log_path: Path,
    cwd: Path | None = None,
    is_service: bool = False,
) -> Child:
    """Start ``argv`` in its own session (terminal signals go to the supervisor only)."""
    offset = prepare_log(log_path)
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            **owned_child_options(),
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


# --- the supervisor ----------------------------------------------------------------------


@dataclass
class Supervisor:
    """Runs a plan: starts each process, waits for readiness, watches, stops in order.

    The plan is made once the state dir is locked, so a second ``sluice up`` on the same
    state dir is refused before its port checks would blame the first one's ports.
    """

    args: argparse.Namespace
    console: Console = field(default_factory=Console)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    children: list[Child] = field(default_factory=list)
    plan: UpPlan = field(init=False)
    nats_url: str = ""
    llama_url: str | None = None
    simulator_url: str | None = None
    _stopping: bool = False
    _hurry: bool = False
    _defer: int = 0
    _stop_pending: str | None = None
    _lock_file: IO[str] | None = None

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
            self._lock_state_dir(Path(self.args.state_dir))
            self.plan = UpPlan.from_options(self.args, self.env)
            self.plan.check_ports()
            self._start_nats()
            self._start_model()
            self._start_simulator()
            self.console.cache_stores(
                semantic=self.plan.semantic_cache_enabled,
                qdrant_server=self.plan.uses_qdrant_server,
                qdrant_local=self.plan.qdrant_local_dir,
            )
            self._start_services()
            self._wait_ready()
            self._print_banner()
            self._watch()
        except StopRequested as stop:
            self.console.stop_requested(str(stop))
            code = 0
        except ChildExited as exc:
            child = exc.child
            self.console.child_exited(child.name, child.process.returncode)
            self._show_tail(child)
            code = 1
        except (LaunchError, TimeoutError) as exc:
            self.console.error(exc)
            code = 1
        finally:
            self._stopping = True
            self._stop_all()
            if self._lock_file is not None:
                self._lock_file.close()
        return code

    def _show_tail(self, child: Child) -> None:
        self.console.log_tail(child.log_path, child.log_tail())

    def _lock_state_dir(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        lock = (state_dir / "up.lock").open("a+", encoding="utf-8")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            lock.close()
            raise LaunchError(
                f"another 'sluice up' (pid {owner}) is running with state dir {state_dir}; "
                "stop it, or use another SLUICE_STATE_DIR"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock_file = lock

    def _start_nats(self) -> None:
        plan = self.plan
        if plan.external_nats_url:
            self.nats_url = plan.external_nats_url
            self.console.nats_external(plan.external_nats_url)
            return
        log_path = plan.logs_dir / "nats.log"
        offset = prepare_log(log_path)
        with self._signals_deferred():
            try:
                nats = EmbeddedNats.start(
                    plan.state_dir / "nats",
                    port=plan.nats_port,
                    log_file=log_path,
                    monitor_port=plan.nats_monitor_port,
                )
            except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
                raise LaunchError(f"the embedded NATS server did not start: {exc}") from exc
            self.children.append(Child("nats", nats.process, log_path, offset, stopper=nats.stop))
        self.nats_url = nats.url
        self.console.nats_started(nats.url, plan.state_dir / "nats", plan.nats_monitor_port)

    def _start_model(self) -> None:
        plan = self.plan
        if plan.external_llama_url:
            self.llama_url = plan.external_llama_url
            self.console.model_external(plan.external_llama_url)
            return
        if plan.llama_port is None:
            self.console.model_not_started()
            return
        from sluice.devtools import localmodel

        port = plan.llama_port
        model_file = plan.models_dir / localmodel.MODEL_FILENAME
        partial = plan.models_dir / f".{localmodel.MODEL_FILENAME}.{os.getpid()}.tmp"
        size = localmodel.MODEL_SIZE
        self.console.model_preparing(model_file, size)
        try:
            with self.console.ticker(
                lambda s: self.console.model_assembly_status(model_file, partial, size, s)
            ):
                model_path = localmodel.ensure_model(plan.models_dir)
        except (localmodel.ModelAssemblyError, OSError) as exc:
            raise LaunchError(f"the local model is not available: {exc}") from exc
        self.console.model_verified(model_path)

        log_path = plan.logs_dir / "llama-server.log"
        offset = prepare_log(log_path)
        with self._signals_deferred():
            try:
                proc = localmodel.start_llama_server(model_path, port, log_file=log_path)
            except (FileNotFoundError, OSError) as exc:
                raise LaunchError(f"llama-server did not start: {exc}") from exc
            child = Child("llama-server", proc, log_path, offset)
            self.children.append(child)
        try:
            with self.console.ticker(lambda s: self.console.model_loading_status(port, s)):
                localmodel.wait_llama_ready(port, self.args.model_timeout, proc)
        except RuntimeError:
            raise ChildExited(child) from None
        except TimeoutError as exc:
            self._show_tail(child)
            raise LaunchError(str(exc)) from exc
        self.llama_url = f"http://127.0.0.1:{port}/v1"
        self.console.model_ready(self.llama_url, log_path)

    def _start_simulator(self) -> None:
        port = self.plan.simulator_port
        if port is None:
            return
        log_path = self.plan.logs_dir / "simulator.log"
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
        self.console.simulator_ready(self.simulator_url, log_path)

    def _start_services(self) -> None:
        for service in self.plan.services:
            env = self.plan.service_env(
                service,
                nats_url=self.nats_url,
                llama_url=self.llama_url,
                simulator_url=self.simulator_url,
            )
            with self._signals_deferred():
                child = spawn(
                    str(service.name),
                    [sys.executable, "-m", service.module],
                    env=env,
                    log_path=self.plan.logs_dir / f"{service.name}.log",
                    is_service=True,
                )
                self.children.append(child)
        self.console.services_started(
            (str(service.name) for service in self.plan.services), self.plan.logs_dir
        )

    def _check_children(self) -> None:
        for child in self.children:
            if not child.alive():
                raise ChildExited(child)

    def _wait_ready(self) -> None:
        # A short-lived process asks (up/ready.py): the NATS client and its event loop
        # load there and go when it ends, not in this process, which lives as long as
        # the product.
        argv = [
            sys.executable,
            "-m",
            "sluice.devtools.up.ready",
            self.nats_url,
            str(self.args.ready_timeout),
            *(str(service.name) for service in self.plan.services),
        ]
        # The stop request is held while a round runs, then raised between rounds.
        with self._signals_deferred(), tempfile.TemporaryFile() as errors:
            probe = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errors,
                **owned_child_options(),
            )
            try:
                code = self._follow_readiness(probe)
            finally:
                if probe.poll() is None:
                    probe.kill()
                probe.wait()
            if code != 0:
                errors.seek(0)
                reason = errors.read().decode(errors="replace").strip()
                if code == READY_TIMED_OUT:
                    raise TimeoutError(reason)
                self._check_children()
                raise LaunchError(f"cannot ask the services for readiness: {reason}")
        self.console.services_ready()

    def _follow_readiness(self, probe: subprocess.Popen[bytes]) -> int:
        """Each round's pending services, as the probe prints them; its exit status."""
        assert probe.stdout is not None
        for line in probe.stdout:
            round_ = json.loads(line)
            self._raise_pending_stop_now()
            self._check_children()
            if round_["pending"]:
                self.console.services_waiting(round_["pending"], float(round_["elapsed"]))
        return probe.wait()

    def _raise_pending_stop_now(self) -> None:
        if self._stop_pending is not None and not self._stopping:
            self._stopping = True
            raise StopRequested(self._stop_pending)

    def _print_banner(self) -> None:
        key, key_source = self.plan.dev_key()
        self.console.banner(
            url=self.plan.gateway_url,
            key=key,
            key_source=key_source,
            model=self.plan.client_model,
            metrics=[
                (str(s.name), s.metrics_port) for s in self.plan.services if s.http_port is None
            ],
            nats_url=self.nats_url,
            logs_dir=self.plan.logs_dir,
        )

    def _watch(self) -> None:
        while True:
            self._check_children()
            time.sleep(0.5)

    def _stop_all(self) -> None:
        if not self.children:
            return
        grace = self.plan.shutdown_grace_seconds + STOP_MARGIN_SECONDS
        self.console.stopping([c.name for c in reversed(self.children) if c.alive()])
        stop_children(self.children, grace, hurry=lambda: self._hurry)
        self.children.clear()
        self.console.stopped()
