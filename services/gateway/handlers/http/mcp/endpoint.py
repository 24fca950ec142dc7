"""``/mcp``: the gateway's tools for agents over MCP's Streamable HTTP transport (the
official ``mcp`` SDK), mounted in the Litestar app behind the same edge as every route.

The caller is authenticated here, before the SDK sees the request: no key or a wrong
one is the gateway's 401 problem+json, like any route's. The SDK then serves both
protocol revisions: 2025-11-25 (``initialize`` handshake) and 2026-07-28 (per-request
envelope, ``server/discover``). It runs stateless: no session lives in a replica, so
any replica serves any request and a restart loses nothing. The gateway loads this
module on the first ``/mcp`` request (``mount.LazyMcpEndpoint``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import mcp_types as types
import orjson
from litestar import Request
from litestar.exceptions import MethodNotAllowedException
from litestar.types import Receive, Scope, Send
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from opentelemetry import trace
from sluice import __version__
from sluice.errors import ErrorCode, SluiceError

from services.gateway.domain.exchange import RequestContext
from services.gateway.domain.problems import render_problem
from services.gateway.domain.tenancy.policy import Caller
from services.gateway.handlers.http.deps import ApiDeps
from services.gateway.handlers.http.mcp.tools import BY_NAME, TOOLS, ToolCall, run_tool
from services.gateway.handlers.http.middleware import request_context
from services.gateway.handlers.http.requests import authenticate_caller, read_body

log = logging.getLogger(__name__)

SERVICE = "gateway"
# Who the caller is and the edge's span, for the tool handlers (the SDK hands them the
# HTTP request, whose scope this is).
_CALLER = "sluice.mcp.caller"
_EDGE_SPAN = "sluice.mcp.span"

INSTRUCTIONS = (
    "Sluice is an AI gateway. Call list_models for the model names, chat to ask one, "
    "estimate_cost to price a request first, submit_job and get_job for long work, and "
    "my_usage for what your team has spent. A failed call's text is a problem object "
    "with a stable 'code', a 'detail' that says how to fix it and the 'trace_id' to quote."
)

_TOOL_LIST = [
    types.Tool(
        name=tool.name,
        title=tool.title,
        description=tool.description,
        input_schema=tool.args.model_json_schema(),
        output_schema=tool.result.model_json_schema(),
        annotations=types.ToolAnnotations(
            title=tool.title,
            read_only_hint=tool.read_only,
            destructive_hint=tool.name == "cancel_job",
            idempotent_hint=tool.read_only,
        ),
    )
    for tool in TOOLS
]
_INPUT_SCHEMAS = {tool.name: tool.input_schema for tool in _TOOL_LIST}


def _scope_of(ctx: ServerRequestContext[Any, Any]) -> Mapping[str, Any]:
    request = ctx.request
    scope = getattr(request, "scope", None)
    if not isinstance(scope, Mapping) or not isinstance(scope.get(_CALLER), Caller):
        # Only reachable if the SDK ran a handler without the HTTP request behind it.
        raise SluiceError(ErrorCode.UNAUTHORIZED, "No API key was sent.")
    return scope


def _in_call_trace(scope: Mapping[str, Any]) -> RequestContext:
    """The request's context, in the trace the tool's work joins: the SDK's span of the
    call (the handler's current span) is a child of the edge's, unless the client named a
    trace of its own in the call's ``_meta`` (``traceparent``, as the SDK's client sends
    when it traces): the work then joins that trace, the call's span links back to the
    edge's, and the ids the caller gets back (``sluice.trace_id``, a problem's
    ``trace_id``) name the trace the work is in."""
    rctx = request_context(scope)
    span = trace.get_current_span()
    current = span.get_span_context()
    if not current.is_valid or f"{current.trace_id:032x}" == rctx.trace_id:
        return rctx
    span.add_link(scope[_EDGE_SPAN], {"sluice.link": "http_request"})
    return RequestContext(
        rctx.request_id, f"{current.trace_id:032x}", rctx.path, rctx.notes, rctx.version
    )


class McpEndpoint:
    """The MCP server over the gateway's domain, and the ASGI app ``/mcp`` mounts."""

    def __init__(self, deps: ApiDeps) -> None:
        self.deps = deps
        self.server: Server[Any] = Server(
            "sluice",
            version=__version__,
            title="Sluice gateway",
            instructions=INSTRUCTIONS,
            get_tool_input_schema=_INPUT_SCHEMAS.get,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )
        self.manager = StreamableHTTPSessionManager(
            self.server,
            # One JSON answer per POST: nothing to resume, nothing held between requests.
            json_response=True,
            stateless=True,
            max_request_body_size=deps.settings.max_body_bytes,
        )
        # Stateless, the SDK ends a transport per request and logs each end at INFO.
        logging.getLogger("mcp.server.streamable_http").setLevel(logging.WARNING)
        self._running = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Runs the SDK's request manager (its task group) until ``stop``."""

        async def serve() -> None:
            async with self.manager.run():
                self._running.set()
                await self._stopping.wait()

        self._task = asyncio.create_task(serve(), name="mcp")
        running = asyncio.create_task(self._running.wait())
        await asyncio.wait({self._task, running}, return_when=asyncio.FIRST_COMPLETED)
        if not self._running.is_set():
            running.cancel()
            await self._task  # raises what stopped it

    async def stop(self) -> None:
        # Requests still arriving are answered 503 (retryable), not by a stopped manager.
        self._running.clear()
        self._stopping.set()
        if self._task is not None:
            await self._task

    # --- HTTP -----------------------------------------------------------------------

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Authenticate, then let the SDK answer a POST. Errors before it takes over
        raise, so the app's exception handler answers them as problem+json."""
        request: Request[Any, Any, Any] = Request(scope, receive)
        caller = await authenticate_caller(request, self.deps.keys, None)
        if request.method != "POST":
            # Stateless: no stream to open with GET, no session to end with DELETE (the
            # transport's answer for both is 405).
            raise MethodNotAllowedException(headers={"Allow": "POST"})
        if not self._running.is_set():
            raise SluiceError(ErrorCode.SERVICE_UNAVAILABLE, "The MCP endpoint is not running.")
        # Read here, within the gateway's limit, so that a body too large is its 413.
        body = await read_body(request, self.deps.settings.max_body_bytes)
        delivered = False

        async def replay() -> Any:
            nonlocal delivered
            if delivered:
                return await receive()  # the disconnect, when it comes
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        raw: dict[str, Any] = scope  # type: ignore[assignment]
        raw[_CALLER] = caller
        raw[_EDGE_SPAN] = trace.get_current_span().get_span_context()
        await self.manager.handle_request(raw, replay, send)  # type: ignore[arg-type]

    # --- MCP ------------------------------------------------------------------------

    async def _list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=_TOOL_LIST)

    async def _call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        scope = _scope_of(ctx)
        rctx = _in_call_trace(scope)
        tool = BY_NAME.get(params.name)
        try:
            if tool is None:
                raise SluiceError(
                    ErrorCode.NOT_FOUND,
                    f"No tool '{params.name[:64]}'; list_tools names them.",
                    param="name",
                )
            call = ToolCall(self.deps, scope[_CALLER], rctx)
            result = await run_tool(tool, call, params.arguments or {})
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=orjson.dumps(result).decode())],
                structured_content=result,
            )
        except Exception as exc:
            return self._tool_error(exc, rctx)

    def _tool_error(self, exc: Exception, rctx: RequestContext) -> types.CallToolResult:
        """A tool error the model can read: the problem object, as the HTTP API has it."""
        if isinstance(exc, SluiceError):
            err = exc
        else:
            log.exception("unexpected error in an MCP tool (request %s)", rctx.request_id)
            err = SluiceError(ErrorCode.INTERNAL_ERROR, "The gateway failed to serve this call.")
        self.deps.instruments.errors.add(1, {"code": str(err.code), "service": SERVICE})
        rctx.notes.code = str(err.code)
        problem = render_problem(
            err, instance=rctx.instance, request_id=rctx.request_id, trace_id=rctx.trace_id
        )
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=problem.decode())], is_error=True
        )
