"""The JSON the console reads beside the public API: ``GET /v1/me``, ``GET
/v1/traces/{trace_id}``, ``GET /v1/cache``, ``POST /v1/cache/invalidate`` and ``GET
/v1/providers``. Each authenticates first and answers problem+json on error; who may
read what is in ``domain/console.py``."""

from __future__ import annotations

import time
from typing import Any

import orjson
from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath
from pydantic import BaseModel, ConfigDict
from sluice.errors import ErrorCode, SluiceError
from sluice.topology import PriorityClass

from services.gateway.domain import console
from services.gateway.domain.dialects.openai.request import parse_body, to_chat_request
from services.gateway.domain.dialects.parsing import parse_model
from services.gateway.domain.tenancy.policy import Scope
from services.gateway.handlers.http.deps import deps_of
from services.gateway.handlers.http.requests import (
    authenticate,
    authenticated_body,
)
from services.gateway.handlers.http.responses import json_response


class InvalidateBody(BaseModel):
    """Either ``all`` (operators) or ``request`` (a chat completion request)."""

    model_config = ConfigDict(extra="forbid")

    all: bool = False
    request: dict[str, Any] | None = None


class ConsoleApiController(Controller):
    path = "/v1"
    tags = ["console"]

    @get("/me", operation_id="getCaller", summary="The calling key, its team and budgets")
    async def me(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """Who the credentials are: ``key_id``, ``name``, ``team_id``, ``scopes``,
        ``admin`` (the ``admin`` scope: the team's keys), ``operator`` (a key of the
        ``admin`` team: every team), ``model_allow``, and the budgets that apply to
        the key (its own) and to its team (the team's over its tier's), as USD text and
        in nano-USD; 0 is no budget. The console logs in with it."""
        deps = deps_of(request)
        key = await authenticate(request, deps.keys, None)
        found = await deps.chat.tenancy.entitlements(
            key, end_user="", priority=PriorityClass.INTERACTIVE
        )
        return json_response(console.me_view(key, found))

    @get(
        "/traces/{trace_id:str}",
        operation_id="getTrace",
        summary="One request's trace as a tree",
    )
    async def trace(
        self, request: Request[Any, Any, Any], trace_id: FromPath[str]
    ) -> Response[Any]:
        """The spans of one request across the services (the trace id is the middle
        part of the answer's ``traceparent`` header), as a tree with times in ms from
        its start, read from the local span files as ``sluice trace`` does (with an
        OTLP endpoint set, spans are in your tracing backend instead). Attributes that
        may hold prompt or answer text are left out. A trace of another team answers
        404, as an unknown one does; operators read every team's."""
        deps = deps_of(request)
        key = await authenticate(request, deps.keys, None)
        wanted = console.check_trace_id(trace_id)
        return json_response(console.trace_view(key, wanted, await deps.spans.trace(wanted)))

    @get("/cache", operation_id="getCacheStats", summary="Cache hit rates (operators)")
    async def cache_stats(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """The cache service's counters since its start (the instance that answers):
        lookups, exact and semantic hits with their rates, stores, and the entries in
        the shared bucket. They count every team's requests, so only keys of the
        ``admin`` team read them (403 otherwise); a team's own cache hits and savings
        are in ``GET /v1/usage`` (``cache_hits``, ``saved_usd``)."""
        deps = deps_of(request)
        key = await authenticate(request, deps.keys, None)
        console.check_operator(key, "The cache service's counters")
        counters = await deps.cache_admin.stats()
        return json_response({"object": "cache.stats", **counters.as_dict()})

    @post(
        "/cache/invalidate",
        operation_id="invalidateCache",
        summary="Remove a request's cached answer",
    )
    async def invalidate(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """Body ``{"request": {<chat completion request>}}`` removes the cached answer
        (and its semantic point) that request would be served from for the caller's
        team (the ``chat`` scope), as sent: the same model, messages and sampling
        parameters. ``{"all": true}`` empties the whole cache, every team's: keys of the
        ``admin`` team only (403 otherwise). Answers how many entries were removed."""
        deps = deps_of(request)
        caller, raw = await authenticated_body(
            request, deps.keys, deps.settings.max_body_bytes, Scope.CHAT
        )
        body = parse_model(raw, InvalidateBody)
        if body.all == (body.request is not None):
            raise SluiceError(
                ErrorCode.INVALID_REQUEST,
                'Send either {"request": {<chat completion request>}} or {"all": true}.',
                param="request",
            )
        if body.all:
            console.check_operator(caller.key, "Emptying the cache")
            removed = await deps.cache_admin.invalidate("")
            return json_response(console.cache_answer(removed, "all"))
        assert body.request is not None
        chat_request = to_chat_request(parse_body(orjson.dumps(body.request)))
        cache_key = await deps.chat.cache_key_for(caller.key, chat_request)
        removed = await deps.cache_admin.invalidate(cache_key) if cache_key else 0
        return json_response(console.cache_answer(removed, "request"))

    @get(
        "/providers",
        operation_id="listProviders",
        summary="Routes, breakers and recent provider calls",
    )
    async def providers(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """Every route the key may use: its chain of steps and deployments, each
        deployment's breaker as the workers share it (``closed``, ``open`` with the
        seconds left, ``half_open``; the reason and the failure rate when it changed),
        and the calls the workers made to it in the last 15 minutes (count, errors,
        error rate, p50 and p95 latency in ms) read from the local span files
        (``calls_source: none`` when spans go to an OTLP endpoint instead)."""
        deps = deps_of(request)
        key = await authenticate(request, deps.keys, None)
        since = time.time_ns() - console.CALLS_WINDOW_SECONDS * 1_000_000_000
        calls = await deps.spans.calls(since) if deps.spans.local else []
        return json_response(
            console.providers_view(
                key,
                deps.chat.catalog,
                deps.breakers.all(),
                calls,
                spans_local=deps.spans.local,
            )
        )
