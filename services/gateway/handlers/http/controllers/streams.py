"""``GET /v1/streams/{request_id}``: resume a streamed chat completion."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get
from litestar.params import FromPath, FromQuery

from services.gateway.domain.relay.resume import parse_resume_point
from services.gateway.domain.tenancy.policy import Scope
from services.gateway.handlers.http.deps import deps_of
from services.gateway.handlers.http.middleware import request_context
from services.gateway.handlers.http.requests import authenticate
from services.gateway.handlers.http.responses import to_response


class StreamsController(Controller):
    path = "/v1"
    tags = ["chat"]

    @get(
        "/streams/{request_id:str}",
        operation_id="resumeStream",
        summary="Resume a streamed chat completion",
    )
    async def resume_stream(
        self,
        request: Request[Any, Any, Any],
        request_id: FromPath[str],
        after: FromQuery[int | None] = None,
    ) -> Response[Any]:
        """Replays the SSE events of a streamed completion that came after the client's
        last event, then follows the live tail. The resume point is ``Last-Event-ID``
        (``<request_id>:<sequence>``, as EventSource sends it) or ``?after=<sequence>``;
        neither replays from the start. A finished stream replays to its final chunk and
        ``[DONE]`` (or its error event). Only keys of the team that made the request can
        resume it; anyone else, an unknown id or an expired stream gets 404."""
        deps = deps_of(request)
        ctx = request_context(request.scope)
        key = await authenticate(request, deps.keys, Scope.CHAT)
        point = parse_resume_point(request.headers.get("last-event-id"), after, request_id)
        answer = await deps.resumer.resume(
            key, request_id, point, trace_id=ctx.trace_id, instance=ctx.instance
        )
        return to_response(answer)
