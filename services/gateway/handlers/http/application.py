"""The Litestar application: the controllers over the gateway's domain, the MCP
endpoint at ``/mcp``, one exception handler for every error, and the OpenAPI document at
``/docs``."""

from __future__ import annotations

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, ScalarRenderPlugin
from sluice import __version__

from services.gateway.handlers.http.console.pages import ConsoleController
from services.gateway.handlers.http.controllers.admin import (
    AdminAuditController,
    AdminKeysController,
    AdminTeamsController,
)
from services.gateway.handlers.http.controllers.chat import ChatController
from services.gateway.handlers.http.controllers.console_api import ConsoleApiController
from services.gateway.handlers.http.controllers.docs import DocsController
from services.gateway.handlers.http.controllers.jobs import JobsController, WebhooksController
from services.gateway.handlers.http.controllers.messages import MessagesController
from services.gateway.handlers.http.controllers.models import ModelsController
from services.gateway.handlers.http.controllers.ops import OpsController
from services.gateway.handlers.http.controllers.streams import StreamsController
from services.gateway.handlers.http.controllers.usage import UsageController
from services.gateway.handlers.http.deps import ApiDeps
from services.gateway.handlers.http.mcp.endpoint import McpEndpoint, mcp_mount
from services.gateway.handlers.http.problems import exception_handler


def create_app(deps: ApiDeps, mcp: McpEndpoint | None = None) -> Litestar:
    """The app over ``deps``; with ``mcp`` (started by the caller), ``/mcp`` too."""
    return Litestar(
        route_handlers=[
            *([mcp_mount(mcp)] if mcp is not None else []),
            ChatController,
            MessagesController,
            StreamsController,
            JobsController,
            WebhooksController,
            ModelsController,
            UsageController,
            OpsController,
            DocsController,
            AdminTeamsController,
            AdminKeysController,
            AdminAuditController,
            ConsoleApiController,
            ConsoleController,
        ],
        exception_handlers={Exception: exception_handler(deps.instruments)},
        request_max_body_size=deps.settings.max_body_bytes,
        state=State({"deps": deps}),
        openapi_config=OpenAPIConfig(
            title="Sluice gateway",
            version=__version__,
            description="OpenAI-compatible chat completions and the Anthropic Messages "
            "API with limits, caching, cost and one trace per request. Errors are RFC 9457 "
            "problem+json (Anthropic error bodies on /v1/messages). Agents: the same "
            "operations as MCP tools at /mcp (Streamable HTTP, protocol revisions "
            "2025-11-25 and 2026-07-28). People: the web console at /console.",
            path="/docs",
            use_handler_docstrings=True,
            render_plugins=[ScalarRenderPlugin(path="/"), JsonRenderPlugin()],
        ),
        logging_config=None,
        debug=False,
    )
