"""``POST /v1/messages``: the Anthropic dialect's door to the chat data path."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, post

from services.gateway.domain.dialects.anthropic.request import (
    VERSION_HEADER,
    anthropic_to_chat_request,
    check_version,
    parse_messages_body,
)
from services.gateway.domain.dialects.anthropic.response import ANTHROPIC
from services.gateway.domain.dialects.common import RequestMeta
from services.gateway.domain.exchange import Answer
from services.gateway.domain.jobs.request import JobSpec
from services.gateway.domain.tenancy.policy import Scope, require_scope
from services.gateway.handlers.http import headers as h
from services.gateway.handlers.http.deps import ApiDeps, deps_of
from services.gateway.handlers.http.idempotency import idempotent
from services.gateway.handlers.http.middleware import request_context
from services.gateway.handlers.http.requests import (
    HttpRequest,
    authenticate_caller,
    check_content_type,
    read_body,
)
from services.gateway.handlers.http.responses import to_response
from services.gateway.handlers.http.routes import MESSAGES_ROUTE


class MessagesController(Controller):
    path = "/v1"
    tags = ["messages"]

    @post(
        "/messages",
        operation_id="createMessage",
        summary="Create a message (Anthropic Messages API)",
        status_code=200,
    )
    async def create_message(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """Anthropic Messages API on the same data path as chat completions (limits,
        cache, queue, cost, trace), for the official ``anthropic`` SDK: ``x-api-key``
        (or ``Authorization: Bearer``), a body with ``model``, ``max_tokens``,
        ``messages`` (text, image, tool_use and tool_result blocks), ``system``,
        ``tools``, ``tool_choice``, ``stop_sequences``, ``temperature``, ``top_p``,
        ``top_k``, ``metadata.user_id``; JSON ``message`` or, with ``stream: true``,
        Server-Sent Events (``message_start`` ... ``message_stop``, ``ping`` while idle).
        The message (or the stream's ``message_delta``) carries the ``sluice`` object.

        ``anthropic-version`` is optional (missing means ``2023-06-01``; any dated
        version is accepted). Rate limits come as ``anthropic-ratelimit-*`` and the IETF
        ``RateLimit`` fields, ``retry-after`` on 429. Errors are Anthropic error bodies
        (``{"type": "error", "error": {...}}``) with Sluice's ``code`` and ``trace_id``.
        ``Cache-Control``, ``X-Sluice-Semantic-Cache``, ``x-sluice-priority`` and
        ``x-sluice-on-disconnect`` work as on chat completions, and so do
        ``Idempotency-Key`` (one run, the same message replayed, 409 while the first
        runs, 422 for another body), resumable streams (``id:`` on the events,
        ``GET /v1/streams/{id}`` with ``Last-Event-ID`` answers in this dialect) and
        ``Prefer: respond-async`` / ``wait=N`` (a job whose result is a ``message``;
        needs the ``jobs`` scope). The ``sluice`` status (status, errors, confidence,
        requires_human_review) rides on every message, as on chat completions. Needs
        the ``chat`` scope; the key's model allow-list applies."""
        return to_response(await create_message(request, deps_of(request)))


async def create_message(request: HttpRequest, deps: ApiDeps) -> Answer:
    """The route's work on any request shape: Litestar's above, or the bare ASGI request
    the edge hands a direct route (``direct.py``)."""
    ctx = request_context(request.scope)
    caller = await authenticate_caller(request, deps.keys, Scope.CHAT)
    key = caller.key
    headers = request.headers
    check_version(headers.get(VERSION_HEADER))
    check_content_type(headers.get("content-type"))
    raw = await read_body(request, deps.settings.max_body_bytes)
    if ctx.notes.audit_prompts:
        ctx.notes.prompt = deps.chat.guard.scrub(raw.decode("utf-8", "replace"))
    prefer = h.prefer_of(headers)

    async def run() -> Answer:
        body = parse_messages_body(raw)
        ctx.notes.model = body.model
        chat_request = anthropic_to_chat_request(body)
        if prefer.as_job:
            require_scope(key, Scope.JOBS)
            answer = await deps.jobs.respond(
                key,
                JobSpec(
                    chat_request,
                    dialect=ANTHROPIC.name,
                    hints=h.answer_hints(headers, body.sluice),
                ),
                prefer=prefer,
                priority=h.job_priority(key, headers, prefer),
                trace_id=ctx.trace_id,
                tags=h.tags_of(headers),
                end_user=caller.end_user,
            )
            answer.headers["request-id"] = ctx.request_id
            return answer
        options = h.chat_options(
            headers,
            key,
            deps.settings,
            instance=ctx.instance,
            dialect=ANTHROPIC,
            end_user=caller.end_user,
            hints=body.sluice,
        )
        meta = RequestMeta(ctx.request_id, ctx.trace_id, body.model, notes=ctx.notes)
        answer = await deps.chat.complete(key, chat_request, meta, options)
        # Where the SDK looks for the request id (``message._request_id``).
        answer.headers["request-id"] = ctx.request_id
        return answer

    return await idempotent(
        deps.idempotency,
        headers,
        key=key,
        ctx=ctx,
        raw=raw,
        route=MESSAGES_ROUTE,
        run=run,
        job=prefer.as_job,
        dialect=ANTHROPIC.name,
    )
