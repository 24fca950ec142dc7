"""The HTTP server, embedded in the service's own event loop so that handlers share the
process's single NATS connection. Granian (Rust HTTP stack) by default, uvicorn as the
alternative; both stop accepting first and let in-flight responses finish."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Generator
from typing import Any, Protocol

log = logging.getLogger(__name__)


class HttpServer(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def _wait_listening(host: str, port: int, task: asyncio.Task[Any], limit: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    while loop.time() < deadline:
        if task.done():
            task.result()
            raise RuntimeError("HTTP server exited during start")
        try:
            _, writer = await asyncio.open_connection(probe_host, port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise TimeoutError(f"HTTP server not listening on {host}:{port} after {limit}s")


class GranianServer:
    def __init__(self, app: Any, host: str, port: int) -> None:
        from granian.constants import Interfaces
        from granian.server.embed import Server

        self.host, self.port = host, port
        self._server = Server(
            app,
            address=host,
            port=port,
            # No ASGI lifespan: the service owns startup and shutdown.
            interface=Interfaces.ASGINL,
            websockets=False,
            log_access=False,
            backlog=2048,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        await _wait_listening(self.host, self.port, self._task, 10)

    async def stop(self) -> None:
        self._server.signal_handler_interrupt()  # type: ignore[no-untyped-call]
        if self._task is not None:
            await self._task


class UvicornServer:
    def __init__(self, app: Any, host: str, port: int, grace: float) -> None:
        import uvicorn

        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=int(grace),
            backlog=2048,
        )

        class _Server(uvicorn.Server):
            # The service runtime owns SIGTERM/SIGINT; uvicorn must not take them over.
            @contextlib.contextmanager
            def capture_signals(self) -> Generator[None, None, None]:
                yield

        self.host, self.port = host, port
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        await _wait_listening(self.host, self.port, self._task, 10)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task


def create_server(kind: str, app: Any, host: str, port: int, grace: float) -> HttpServer:
    if kind == "uvicorn":
        return UvicornServer(app, host, port, grace)
    if kind == "granian":
        return GranianServer(app, host, port)
    raise ValueError(f"unknown http_server {kind!r}: use granian or uvicorn")
