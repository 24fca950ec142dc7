"""``POST /v1/messages``: the Anthropic dialect's door to the chat data path."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, post
from sluice.errors import ErrorCode, SluiceError

from services.gateway.domain.dialects.anthropic.request import (
    VERSION_HEADER,
    anthropic_to_chat_request,
    check_version,
    parse_messages_body,
)
from services.gateway.domain.dialects.anthropic.response import ANTHROPIC
from services.gateway.domain.dialects.common import RequestMeta
from services.gateway.domain.tenancy.policy import Scope
from services.gateway.handlers.http import headers as h
from services.gateway.handlers.http.deps import deps_of
from services.gateway.handlers.http.middleware import request_context
from services.gateway.handlers.http.requests import (
    authenticate_caller,
    check_content_type,
    read_body,
)
from services.gateway.handlers.http.responses import to_response


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
        ``x-sluice-on-disconnect`` work as on chat completions. ``Idempotency-Key`` is
        refused (400): its stored replays are chat completions. ``Prefer:
        respond-async`` is not applied here (a job answers as a chat completion). Needs
        the ``chat`` scope; the key's model allow-list applies."""
        deps = deps_of(request)
        ctx = request_context(request.scope)
        caller = await authenticate_caller(request, deps.keys, Scope.CHAT)
        key = caller.key
        headers = request.headers
        check_version(headers.get(VERSION_HEADER))
        check_content_type(headers.get("content-type"))
        if h.IDEMPOTENCY_HEADER in headers:
            raise SluiceError(
                ErrorCode.INVALID_REQUEST,
                "Idempotency-Key is supported on /v1/chat/completions only.",
                param="Idempotency-Key",
            )
        raw = await read_body(request, deps.settings.max_body_bytes)
        if ctx.notes.audit_prompts:
            ctx.notes.prompt = raw.decode("utf-8", "replace")
        body = parse_messages_body(raw)
        ctx.notes.model = body.model
        options = h.chat_options(
            headers,
            key,
            deps.settings,
            instance=ctx.instance,
            dialect=ANTHROPIC,
            end_user=caller.end_user,
        )
        meta = RequestMeta(ctx.request_id, ctx.trace_id, body.model, notes=ctx.notes)
        answer = await deps.chat.complete(key, anthropic_to_chat_request(body), meta, options)
        # Where the SDK looks for the request id (``message._request_id``).
        answer.headers["request-id"] = ctx.request_id
        return to_response(answer)
