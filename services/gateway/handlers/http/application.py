"""The Litestar application: the controllers over the gateway's domain, the MCP
endpoint at ``/mcp``, one exception handler for every error, and the OpenAPI document at
``/docs``."""

from __future__ import annotations

import copy
from typing import Any

from litestar import Litestar, Request
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, ScalarRenderPlugin
from sluice import __version__

from services.gateway.domain.versions import VERSIONS
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
from services.gateway.handlers.http.mcp.mount import McpHandler, mcp_mount
from services.gateway.handlers.http.openapi import (
    load_examples,
    with_api_version,
    with_examples,
)
from services.gateway.handlers.http.problems import exception_handler

# The public API's routes (``/mcp`` is mounted beside them when the endpoint runs).
ROUTE_HANDLERS = (
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
)


class _JsonWithExamples(JsonRenderPlugin):
    """``/docs/openapi.json`` (and so the Scalar page) with the captured examples."""

    def __init__(self) -> None:
        super().__init__()
        self._merged: dict[str, Any] | None = None

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        if self._merged is None:
            document = with_examples(copy.deepcopy(openapi_schema), load_examples())
            self._merged = with_api_version(document)
        return super().render(request, self._merged)


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="Sluice gateway",
        version=__version__,
        description="OpenAI-compatible chat completions and the Anthropic Messages "
        "API with limits, caching, cost and one trace per request. Errors are RFC 9457 "
        "problem+json (Anthropic error bodies on /v1/messages). Agents: the same "
        "operations as MCP tools at /mcp (Streamable HTTP, protocol revisions "
        "2025-11-25 and 2026-07-28). People: the web console at /console. "
        f"API version {VERSIONS.current.name}: send 'Sluice-Version: YYYY-MM-DD' to pin one "
        "(default: your key's); every answer names its version in the same header.",
        path="/docs",
        use_handler_docstrings=True,
        render_plugins=[ScalarRenderPlugin(path="/"), _JsonWithExamples()],
    )


def openapi_document(*, examples: bool = False) -> dict[str, Any]:
    """The OpenAPI document the gateway serves at ``/docs/openapi.json``, built from the
    route declarations alone (no service needed); with ``examples``, as served (the
    captured examples merged in)."""
    app = Litestar(route_handlers=list(ROUTE_HANDLERS), openapi_config=openapi_config())
    document = app.openapi_schema.to_schema()
    if examples:
        document = with_examples(document, load_examples())
    return with_api_version(document)


def create_app(deps: ApiDeps, mcp: McpHandler | None = None) -> Litestar:
    """The app over ``deps``; with ``mcp`` (started by the caller), ``/mcp`` too."""
    return Litestar(
        route_handlers=[*([mcp_mount(mcp)] if mcp is not None else []), *ROUTE_HANDLERS],
        exception_handlers={Exception: exception_handler(deps.instruments)},
        request_max_body_size=deps.settings.max_body_bytes,
        state=State({"deps": deps}),
        openapi_config=openapi_config(),
        logging_config=None,
        debug=False,
    )
