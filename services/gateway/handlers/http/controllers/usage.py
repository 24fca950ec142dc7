"""``GET /v1/usage``: cost, tokens, requests and cache savings, grouped; ``POST
/v1/estimate``: what a request would cost, without calling a model."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post

from services.gateway.domain.dialects.openai.request import parse_body, to_chat_request
from services.gateway.domain.tenancy.policy import Scope
from services.gateway.domain.usage import parse_params
from services.gateway.handlers.http.deps import deps_of
from services.gateway.handlers.http.requests import authenticate, authenticated_body
from services.gateway.handlers.http.responses import json_response


class UsageController(Controller):
    path = "/v1"
    tags = ["usage"]

    @get("/usage", operation_id="getUsage", summary="Usage and cost, grouped")
    async def usage(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """Cost, tokens, requests and cache savings of the caller's team (every team's
        with the ``usage:read`` scope), grouped and filtered. Query parameters:
        ``since``, ``until`` (RFC 3339 times or dates, UTC when no offset is given;
        since inclusive, until exclusive), ``group_by`` (comma-separated: ``key``,
        ``team``, ``end_user``, ``model``, ``provider``, ``tag``, ``day``, ``hour``;
        default ``key,model``), the filters ``key_id``, ``team_id``, ``model``,
        ``provider``, ``end_user``, ``tag``, and ``limit`` (rows, 1-10000, default
        1000; ``has_more`` says when there were more). Every team's usage (or another
        team's, with ``team_id``) needs a key of the operators' team (``admin``) with the
        ``usage:read`` scope; any other key reads its own team's, and is answered 403 for
        another. Amounts are exact: nano-USD
        integers (``*_usd_nanos``) and decimal strings of USD (``*_usd``).
        ``saved_usd`` is what cache hits saved: what their answers cost when they were
        made. Grouped by tag, a request counts under each of its tags (untagged ones
        under ``""``); ``totals`` counts each request once."""
        deps = deps_of(request)
        # Any key reads its own team's usage; to_query decides who reads more.
        key = await authenticate(request, deps.keys, None)
        params = parse_params(
            {name: request.query_params.getall(name) for name in request.query_params}
        )
        return json_response(await deps.usage.report(key, params))

    @post("/estimate", operation_id="estimateCost", summary="Estimate a request's cost")
    async def estimate(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """The body is a chat completion request (the ``chat`` scope), checked as
        ``/v1/chat/completions``
        checks it; no model is called and nothing is reserved or recorded. Answers the
        prompt's tokens (the gateway's tokenizer), an output range (1 to ``max_tokens``,
        or to what the gateway reserves without it) and the USD range for them at the
        price table's prices, exact (``cost_usd`` as decimal strings,
        ``cost_usd_nanos`` as integers), every input token at the fresh input rate. A
        cache hit would cost nothing. A model without a price: ``priced: false``."""
        deps = deps_of(request)
        _caller, raw = await authenticated_body(
            request, deps.keys, deps.settings.max_body_bytes, Scope.CHAT
        )
        chat_request = to_chat_request(parse_body(raw))
        return json_response(deps.estimator.estimate(chat_request))
