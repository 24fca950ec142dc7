"""The Litestar application: thin controllers over the chat service, the key store and
the readiness check, and one exception handler that renders every error as problem+json."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from litestar import Controller, Litestar, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, ScalarRenderPlugin
from litestar.response import Stream
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sluice import __version__
from sluice.catalog import Catalog
from sluice.errors import ErrorCode, SluiceError
from sluice.keys.v1 import keys_pb2
from sluice.metrics import Instruments

from services.gateway.auth import KeyStore, extract_secret
from services.gateway.chat import SERVICE, ChatService
from services.gateway.edge import request_context
from services.gateway.normalize import parse_body
from services.gateway.problems import PROBLEM_CONTENT_TYPE, problem_headers, render_problem
from services.gateway.render import RequestMeta
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

JSON = "application/json"


class ReadinessCheck(Protocol):
    async def check(self) -> dict[str, bool]: ...


@dataclass
class GatewayDeps:
    settings: GatewaySettings
    keys: KeyStore
    chat: ChatService
    readiness: ReadinessCheck
    instruments: Instruments
    models_body: bytes


def models_list_body(catalog: Catalog) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": m.name, "object": "model", "created": 0, "owned_by": m.owned_by}
                for m in catalog.models.values()
            ],
        }
    )


def _deps(request: Request[Any, Any, Any]) -> GatewayDeps:
    deps: GatewayDeps = request.app.state["deps"]
    return deps


async def _authenticate(
    request: Request[Any, Any, Any], deps: GatewayDeps
) -> keys_pb2.ApiKeyRecord:
    headers = request.headers
    secret = extract_secret(headers.get("authorization"), headers.get("x-api-key"))
    return await deps.keys.authenticate(secret)


# A client that sent too much is read to the end before the 413, up to this many bytes:
# answering mid-upload makes many clients report a reset connection instead of the 413.
_DRAIN_LIMIT_BYTES = 64 * 1024 * 1024


async def read_body(request: Request[Any, Any, Any], limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            break
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            too_large = True
        if not too_large:
            chunks.append(chunk)
        if not message.get("more_body", False) or size > limit + _DRAIN_LIMIT_BYTES:
            break
    if too_large:
        raise SluiceError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"The request body is above the gateway's limit of {limit} bytes.",
            details={"limit_bytes": limit},
        )
    return b"".join(chunks)


def _check_content_type(value: str | None) -> None:
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media != JSON and not media.endswith("+json"):
        raise SluiceError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            "The body must be JSON (Content-Type: application/json).",
        )


class ChatController(Controller):
    path = "/v1"
    tags = ["chat"]

    @post(
        "/chat/completions",
        operation_id="createChatCompletion",
        summary="Create a chat completion",
        status_code=200,
    )
    async def create_chat_completion(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """OpenAI-compatible chat completion, as JSON or, with ``stream: true``, as
        Server-Sent Events of ``chat.completion.chunk``. The response (or its last chunk)
        carries a ``sluice`` object: model served, provider, cache status, tokens, cost
        and latency breakdown. Unknown body members pass through to the provider.
        ``Cache-Control: no-cache`` skips the exact cache, ``no-store`` keeps the answer
        out of it."""
        deps = _deps(request)
        ctx = request_context(request.scope)
        key = await _authenticate(request, deps)
        _check_content_type(request.headers.get("content-type"))
        body = parse_body(await read_body(request, deps.settings.max_body_bytes))
        meta = RequestMeta(ctx.request_id, ctx.trace_id, body.model)
        result = await deps.chat.complete(
            key,
            body,
            meta,
            cache_control=request.headers.get("cache-control", ""),
            instance=ctx.instance,
        )
        if result.stream is not None:
            return Stream(result.stream, media_type="text/event-stream", headers=result.headers)
        return Response(result.body, media_type=JSON, headers=result.headers)


class ModelsController(Controller):
    path = "/v1"
    tags = ["models"]

    @get("/models", operation_id="listModels", summary="List models")
    async def list_models(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """The model names this gateway serves, in OpenAI's list shape."""
        deps = _deps(request)
        await _authenticate(request, deps)
        return Response(deps.models_body, media_type=JSON)


class OpsController(Controller):
    tags = ["operations"]

    @get("/healthz", operation_id="getHealth", summary="Liveness")
    async def healthz(self) -> Response[bytes]:
        """200 while the process is alive."""
        return Response(b'{"status":"ok"}', media_type=JSON)

    @get("/readyz", operation_id="getReadiness", summary="Readiness")
    async def readyz(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """200 when NATS is connected and every Sluice service answers ready over NATS."""
        services = await _deps(request).readiness.check()
        ready = bool(services) and all(services.values())
        if ready:
            return Response(
                orjson.dumps({"status": "ready", "services": services}), media_type=JSON
            )
        ctx = request_context(request.scope)
        err = SluiceError(
            ErrorCode.SERVICE_UNAVAILABLE,
            "Not every service is ready: "
            + ", ".join(sorted(s for s, ok in services.items() if not ok))
            + ".",
            details={"services": services},
            retry_after_ms=1000,
        )
        return _problem_response(err, ctx.instance, ctx.request_id, ctx.trace_id)

    @get("/metrics", operation_id="getMetrics", summary="Prometheus metrics")
    async def metrics(self) -> Response[bytes]:
        """Prometheus exposition of the gateway's OpenTelemetry metrics."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


_HTTP_CODES = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.SERVICE_UNAVAILABLE,
}

_HTTP_DETAILS = {
    ErrorCode.NOT_FOUND: "No route matches this path.",
    ErrorCode.METHOD_NOT_ALLOWED: "This route does not accept this method.",
    ErrorCode.PAYLOAD_TOO_LARGE: "The request body is above the gateway's size limit.",
    ErrorCode.INVALID_REQUEST: "The request parameters are not valid.",
}


def _from_http_exception(exc: HTTPException) -> SluiceError:
    code = _HTTP_CODES.get(exc.status_code)
    if code is None:
        code = ErrorCode.INVALID_REQUEST if exc.status_code < 500 else ErrorCode.INTERNAL_ERROR
        return SluiceError(
            code, "The request could not be served.", status_override=exc.status_code
        )
    return SluiceError(code, _HTTP_DETAILS.get(code, str(exc.detail)))


def _problem_response(
    err: SluiceError, instance: str, request_id: str, trace_id: str
) -> Response[bytes]:
    return Response(
        render_problem(err, instance=instance, request_id=request_id, trace_id=trace_id),
        status_code=err.status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=problem_headers(err),
    )


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    ctx = request_context(request.scope)
    if isinstance(exc, SluiceError):
        err = exc
    elif isinstance(exc, HTTPException):
        err = _from_http_exception(exc)
    else:
        log.exception("unexpected error serving %s (request %s)", ctx.path, ctx.request_id)
        err = SluiceError(ErrorCode.INTERNAL_ERROR, "The gateway failed to serve this request.")
    instruments: Instruments | None = None
    deps = request.app.state.get("deps")
    if isinstance(deps, GatewayDeps):
        instruments = deps.instruments
    if instruments is not None:
        instruments.errors.add(1, {"code": str(err.code), "service": SERVICE})
    response = _problem_response(err, ctx.instance, ctx.request_id, ctx.trace_id)
    if err.code is ErrorCode.METHOD_NOT_ALLOWED and isinstance(exc, HTTPException) and exc.headers:
        allow = exc.headers.get("Allow") or exc.headers.get("allow")
        if allow:
            response.headers["allow"] = allow
    return response


def create_app(deps: GatewayDeps) -> Litestar:
    return Litestar(
        route_handlers=[ChatController, ModelsController, OpsController],
        exception_handlers={Exception: handle_exception},
        request_max_body_size=deps.settings.max_body_bytes,
        state=State({"deps": deps}),
        openapi_config=OpenAPIConfig(
            title="Sluice gateway",
            version=__version__,
            description="OpenAI-compatible chat completions with limits, caching, cost "
            "and one trace per request. Errors are RFC 9457 problem+json.",
            path="/docs",
            use_handler_docstrings=True,
            render_plugins=[ScalarRenderPlugin(path="/"), JsonRenderPlugin()],
        ),
        logging_config=None,
        debug=False,
    )
