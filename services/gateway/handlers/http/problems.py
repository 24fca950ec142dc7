"""Every error as the client's API shapes it: RFC 9457 problem+json, or an Anthropic
error body under ``/v1/messages``; Litestar's own errors (404, 405, 413) mapped onto the
same catalogue; anything unexpected a 500 without internals."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException
from sluice.errors import ErrorCode, SluiceError
from sluice.metrics import Instruments

from services.gateway.domain.dialects.anthropic.response import render_error
from services.gateway.domain.exchange import JSON, RequestContext
from services.gateway.domain.problems import (
    PROBLEM_CONTENT_TYPE,
    problem_headers,
    render_problem,
)
from services.gateway.handlers.http.middleware import request_context
from services.gateway.handlers.http.routes import is_messages_path

log = logging.getLogger(__name__)

SERVICE = "gateway"

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


def problem_response(err: SluiceError, ctx: RequestContext) -> Response[bytes]:
    """``err`` in the shape the route's clients read."""
    headers = problem_headers(err)
    if is_messages_path(ctx.path):
        headers["request-id"] = ctx.request_id
        body = render_error(
            err, instance=ctx.instance, request_id=ctx.request_id, trace_id=ctx.trace_id
        )
        return Response(body, status_code=err.status, media_type=JSON, headers=headers)
    body = render_problem(
        err, instance=ctx.instance, request_id=ctx.request_id, trace_id=ctx.trace_id
    )
    return Response(body, status_code=err.status, media_type=PROBLEM_CONTENT_TYPE, headers=headers)


ExceptionHandler = Callable[[Request[Any, Any, Any], Exception], Response[bytes]]


def exception_handler(instruments: Instruments) -> ExceptionHandler:
    def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        ctx = request_context(request.scope)
        if isinstance(exc, SluiceError):
            err = exc
        elif isinstance(exc, HTTPException):
            err = _from_http_exception(exc)
        else:
            log.exception("unexpected error serving %s (request %s)", ctx.path, ctx.request_id)
            err = SluiceError(ErrorCode.INTERNAL_ERROR, "The gateway failed to serve this request.")
        instruments.errors.add(1, {"code": str(err.code), "service": SERVICE})
        ctx.notes.code = str(err.code)
        response = problem_response(err, ctx)
        if (
            err.code is ErrorCode.METHOD_NOT_ALLOWED
            and isinstance(exc, HTTPException)
            and exc.headers
        ):
            allow = exc.headers.get("Allow") or exc.headers.get("allow")
            if allow:
                response.headers["allow"] = allow
        return response

    return handle
