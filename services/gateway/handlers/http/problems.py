"""The Litestar app's one exception handler: every error as ``errors.problem_answer``
shapes it, counted on the metrics and noted for the request's audit record."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException
from sluice.errors import ErrorCode
from sluice.metrics import Instruments

from services.gateway.handlers.http.errors import as_error, problem_answer
from services.gateway.handlers.http.middleware import request_context
from services.gateway.handlers.http.responses import to_response

SERVICE = "gateway"

ExceptionHandler = Callable[[Request[Any, Any, Any], Exception], Response[Any]]


def exception_handler(instruments: Instruments) -> ExceptionHandler:
    def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        ctx = request_context(request.scope)
        err = as_error(exc, ctx)
        instruments.errors.add(1, {"code": str(err.code), "service": SERVICE})
        ctx.notes.code = str(err.code)
        response = to_response(problem_answer(err, ctx))
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
