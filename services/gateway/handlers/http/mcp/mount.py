"""The ``/mcp`` route, and the endpoint behind it loaded on its first request.

The MCP SDK (with Starlette, sse-starlette, httpx and cryptography: about 20 MiB
resident) is the largest thing the gateway imports, for a route most deployments call
rarely or never. ``LazyMcpEndpoint`` imports it, off the event loop, when ``/mcp`` is
first asked for, then starts the real endpoint (``endpoint.McpEndpoint``) and hands it
every request; stopped, it answers 503 as the real one does."""

from __future__ import annotations

import asyncio
import importlib
from typing import TYPE_CHECKING, Protocol

from litestar.handlers import ASGIRouteHandler, asgi
from litestar.types import Receive, Scope, Send
from sluice.errors import ErrorCode, SluiceError

from services.gateway.handlers.http.deps import ApiDeps
from services.gateway.handlers.http.routes import MCP_ROUTE

if TYPE_CHECKING:
    from services.gateway.handlers.http.mcp.endpoint import McpEndpoint

ENDPOINT_MODULE = "services.gateway.handlers.http.mcp.endpoint"


class McpHandler(Protocol):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None: ...


class LazyMcpEndpoint:
    """``McpEndpoint``'s lifecycle (``start``, ``stop``, ``handle``), with the SDK loaded
    and the endpoint started on the first request rather than at ``start``."""

    def __init__(self, deps: ApiDeps) -> None:
        self.deps = deps
        self.endpoint: McpEndpoint | None = None
        self._running = False
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._running = True

    async def stop(self) -> None:
        self._running = False
        async with self._lock:
            if self.endpoint is not None:
                await self.endpoint.stop()

    async def _started(self) -> McpEndpoint:
        async with self._lock:
            if not self._running:
                raise SluiceError(ErrorCode.SERVICE_UNAVAILABLE, "The MCP endpoint is not running.")
            if self.endpoint is None:
                module = await asyncio.to_thread(importlib.import_module, ENDPOINT_MODULE)
                endpoint: McpEndpoint = module.McpEndpoint(self.deps)
                await endpoint.start()
                self.endpoint = endpoint
            return self.endpoint

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoint if self._running else None
        if endpoint is None:
            endpoint = await self._started()
        await endpoint.handle(scope, receive, send)


def mcp_mount(endpoint: McpHandler) -> ASGIRouteHandler:
    """The Litestar route that hands ``/mcp`` to the endpoint."""

    @asgi(MCP_ROUTE, is_mount=True, copy_scope=False)
    async def handle_mcp(scope: Scope, receive: Receive, send: Send) -> None:
        await endpoint.handle(scope, receive, send)

    return handle_mcp
