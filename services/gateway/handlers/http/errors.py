"""Every error as the client's API shapes it: RFC 9457 problem+json, or an Anthropic
error body under ``/v1/messages``; Litestar's own errors (404, 405, 413) mapped onto the
same catalogue; anything unexpected a 500 without internals. Shared by the Litestar
exception handler, the edge's own refusals and the direct routes."""

from __future__ import annotations

import logging

from litestar.exceptions import HTTPException
from sluice.errors import ErrorCode, SluiceError

from services.gateway.domain.dialects.anthropic.response import render_error
from services.gateway.domain.exchange import JSON, Answer, RequestContext
from services.gateway.domain.problems import (
    PROBLEM_CONTENT_TYPE,
    problem_headers,
    render_problem,
)
from services.gateway.handlers.http.routes import is_messages_path

log = logging.getLogger(__name__)

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


def as_error(exc: Exception, ctx: RequestContext) -> SluiceError:
    """What the client is told about ``exc``: ours as it is, Litestar's mapped, anything
    else a 500 that names nothing inside (and is logged here, with the request id)."""
    if isinstance(exc, SluiceError):
        return exc
    if isinstance(exc, HTTPException):
        return _from_http_exception(exc)
    log.exception("unexpected error serving %s (request %s)", ctx.path, ctx.request_id)
    return SluiceError(ErrorCode.INTERNAL_ERROR, "The gateway failed to serve this request.")


def problem_answer(err: SluiceError, ctx: RequestContext) -> Answer:
    """``err`` in the shape the route's clients read."""
    headers = problem_headers(err)
    if is_messages_path(ctx.path):
        headers["request-id"] = ctx.request_id
        body = render_error(
            err, instance=ctx.instance, request_id=ctx.request_id, trace_id=ctx.trace_id
        )
        return Answer(err.status, headers, JSON, body)
    body = render_problem(
        err, instance=ctx.instance, request_id=ctx.request_id, trace_id=ctx.trace_id
    )
    return Answer(err.status, headers, PROBLEM_CONTENT_TYPE, body)
