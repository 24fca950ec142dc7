"""The ASGI layer around the Litestar app: one SERVER span per request (continuing a
client's ``traceparent``), the request id, the response headers every answer carries,
and the request metrics. It wraps the whole app so that routing errors (404, 405) are
traced and counted like any other answer."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from sluice import telemetry
from sluice.errors import SluiceError
from sluice.metrics import Instruments

from services.gateway.domain.exchange import RequestContext
from services.gateway.domain.tenancy import audit
from services.gateway.domain.tenancy.ports import AuditLog
from services.gateway.domain.versions import VERSIONS, ApiVersion, VersionChoice, VersionRegistry
from services.gateway.handlers.http.errors import problem_answer
from services.gateway.handlers.http.routes import (
    ADMIN_PREFIX,
    ANSWER_ROUTES,
    UNTRACED,
    route_label,
)
from services.gateway.handlers.http.sending import send_answer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
# Litestar types its scope and events as TypedDicts; the edge only needs mappings.
ASGIApp = Callable[..., Awaitable[None]]

CTX_KEY = "sluice.ctx"
_TRACE_HEADERS = (b"traceparent", b"tracestate")
_VERSION_HEADER = b"sluice-version"
_DEPRECATION = b"deprecation"


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


def request_context(scope: Any) -> RequestContext:
    ctx = scope.get(CTX_KEY)
    if isinstance(ctx, RequestContext):
        return ctx
    # Only reachable when the app runs without the edge (never in the service).
    return RequestContext(new_request_id(), "", str(scope.get("path", "")))


def with_version(headers: list[tuple[bytes, bytes]], version: ApiVersion) -> None:
    """``Sluice-Version`` on a response, and a deprecated version's ``Deprecation`` and
    ``Sunset`` unless the answer already has its own (a deprecated model's)."""
    extra = version.headers
    if len(extra) > 1 and any(k == _DEPRECATION for k, _ in headers):
        extra = extra[:1]
    headers.extend(extra)


async def _refuse(send: Send, err: SluiceError, ctx: RequestContext) -> int:
    """An error answered by the edge itself (before the app): the route's error shape."""
    await send_answer(send, problem_answer(err, ctx))
    return err.status


class Edge:
    def __init__(
        self,
        app: ASGIApp,
        instruments: Instruments,
        audit_log: AuditLog | None = None,
        versions: VersionRegistry = VERSIONS,
        direct: Mapping[tuple[str, str], ASGIApp] | None = None,
    ) -> None:
        self.app = app
        # Routes served here rather than through the app (``direct.py``).
        self.direct = direct or {}
        self.versions = versions
        self.audit_log = audit_log
        self.instruments = instruments
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tracer = trace.get_tracer("sluice.gateway")

    async def wait_idle(self) -> None:
        """Returns once no request is in flight (graceful stop)."""
        await self._idle.wait()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in UNTRACED:
            # Probes answer in the current version whatever they send.
            current = self.versions.current

            async def send_versioned(message: Message) -> None:
                if message["type"] == "http.response.start":
                    headers = list(message.get("headers") or ())
                    with_version(headers, current)
                    message["headers"] = headers
                await send(message)

            scope[CTX_KEY] = RequestContext(new_request_id(), "", path)
            await self.app(scope, receive, send_versioned)
            return

        carrier: dict[str, str] = {}
        asked: str | None = None
        for name, value in scope["headers"]:
            if name in _TRACE_HEADERS:
                carrier[name.decode()] = value.decode("latin-1")
            elif name == _VERSION_HEADER:
                asked = value.decode("latin-1")
        parent = telemetry.extract(carrier) if carrier else None
        method: str = scope["method"]
        route = route_label(path)
        request_id = new_request_id()
        started = time.perf_counter()
        status = 500
        self.in_flight += 1
        self._idle.clear()
        self.instruments.in_flight.add(1)
        with self._tracer.start_as_current_span(
            f"{method} {route}" if route != "unmatched" else method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "http.route": route,
                "url.path": path,
                "sluice.request_id": request_id,
            },
        ) as span:
            sc = span.get_span_context()
            trace_id = f"{sc.trace_id:032x}"
            extra = [
                (b"x-request-id", request_id.encode()),
                (
                    b"traceparent",
                    f"00-{trace_id}-{sc.span_id:016x}-{sc.trace_flags & 0x01:02x}".encode(),
                ),
            ]
            is_answer = route in ANSWER_ROUTES
            choice = VersionChoice(self.versions)
            ctx = RequestContext(request_id, trace_id, path, version=choice)
            scope[CTX_KEY] = ctx
            refused: SluiceError | None = None
            if asked is not None:
                try:
                    choice.version = self.versions.resolve(asked)
                    choice.explicit = True
                except SluiceError as err:
                    refused = err

            async def send_with_headers(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    headers = list(message.get("headers") or ())
                    headers.extend(extra)
                    with_version(headers, choice.answered)
                    if is_answer and not any(k == b"x-sluice-cache" for k, _ in headers):
                        headers.append((b"x-sluice-cache", b"bypass"))
                    message["headers"] = headers
                await send(message)

            try:
                if refused is not None:
                    ctx.notes.code = str(refused.code)
                    self.instruments.errors.add(1, {"code": ctx.notes.code, "service": "gateway"})
                    await _refuse(send_with_headers, refused, ctx)
                else:
                    serve = self.direct.get((method, path), self.app)
                    await serve(scope, receive, send_with_headers)
            finally:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                self.in_flight -= 1
                if self.in_flight == 0:
                    self._idle.set()
                self.instruments.in_flight.add(-1)
                self.instruments.requests.add(1, {"route": route, "status": str(status)})
                self.instruments.request_duration.record(
                    time.perf_counter() - started, {"route": route}
                )
                # Admin routes record their actions themselves. The record joins the
                # next batch of the team's records (``adapters/audit.py``), whether the
                # answer finished or the client went away.
                if (
                    self.audit_log is not None
                    and ctx.notes.authenticated
                    and not path.startswith(ADMIN_PREFIX)
                ):
                    self.audit_log.record(
                        audit.request_event(
                            ctx.notes,
                            request_id=request_id,
                            route=path,
                            status=status,
                            trace_id=trace_id,
                        ),
                        audit.REQUEST,
                    )
