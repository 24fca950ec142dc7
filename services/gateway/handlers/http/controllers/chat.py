"""``POST /v1/chat/completions``: the OpenAI dialect's door to the chat data path, and
to jobs (``Prefer``) and idempotent retries (``Idempotency-Key``)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, post

from services.gateway.domain.dialects.common import RequestMeta
from services.gateway.domain.dialects.openai.request import parse_body, to_chat_request
from services.gateway.domain.exchange import Answer
from services.gateway.domain.jobs.request import JobSpec
from services.gateway.domain.tenancy.policy import Scope, require_scope
from services.gateway.handlers.http import headers as h
from services.gateway.handlers.http.deps import ApiDeps, deps_of
from services.gateway.handlers.http.idempotency import idempotent
from services.gateway.handlers.http.middleware import request_context
from services.gateway.handlers.http.requests import HttpRequest, authenticated_body
from services.gateway.handlers.http.responses import to_response
from services.gateway.handlers.http.routes import CHAT_ROUTE


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
        out of it. ``X-Sluice-Semantic-Cache: on`` (or ``off``) asks a cacheable request to
        also be answered from a paraphrase of its last user message (``x-sluice-cache:
        semantic-hit``), as ``SLUICE_GATEWAY_SEMANTIC_CACHE`` allows.

        ``Prefer: respond-async`` answers ``202`` with a job (``Location: /v1/jobs/{id}``);
        ``Prefer: wait=N`` answers inline when done within N seconds, else ``202``.
        ``Idempotency-Key`` makes retries safe: one run, the same response replayed
        (``Idempotent-Replayed: true``), 409 while the first runs, 422 for another body.
        ``x-sluice-priority`` (interactive, batch, system) picks the scheduling class.

        Needs the ``chat`` scope (and ``jobs`` with ``Prefer: respond-async``); a key
        with a model allow-list gets 403 ``model_not_allowed`` for another model. An
        enterprise JWT (``Authorization: Bearer <JWT>``) works as a key does."""
        return to_response(await chat_completion(request, deps_of(request)))


async def chat_completion(request: HttpRequest, deps: ApiDeps) -> Answer:
    """The route's work on any request shape: Litestar's above, or the bare ASGI request
    the edge hands a direct route (``direct.py``)."""
    ctx = request_context(request.scope)
    caller, raw = await authenticated_body(
        request,
        deps.keys,
        deps.settings.max_body_bytes,
        Scope.CHAT,
        scrub=deps.chat.guard.scrub,
    )
    key = caller.key
    headers = request.headers
    prefer = h.prefer_of(headers)

    async def run() -> Answer:
        body = parse_body(raw)
        ctx.notes.model = body.model
        if prefer.as_job:
            require_scope(key, Scope.JOBS)
            return await deps.jobs.respond(
                key,
                JobSpec(to_chat_request(body), hints=h.answer_hints(headers, body.sluice)),
                prefer=prefer,
                priority=h.job_priority(key, headers, prefer),
                trace_id=ctx.trace_id,
                tags=h.tags_of(headers),
                end_user=caller.end_user,
            )
        options = h.chat_options(
            headers,
            key,
            deps.settings,
            instance=ctx.instance,
            end_user=caller.end_user,
            hints=body.sluice,
        )
        meta = RequestMeta(ctx.request_id, ctx.trace_id, body.model, notes=ctx.notes)
        return await deps.chat.complete(key, to_chat_request(body), meta, options)

    return await idempotent(
        deps.idempotency,
        headers,
        key=key,
        ctx=ctx,
        raw=raw,
        route=CHAT_ROUTE,
        run=run,
        job=prefer.as_job,
    )
