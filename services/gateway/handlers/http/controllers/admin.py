"""``/v1/admin``: teams, keys and the audit trail, for the admin key (every team) and for
keys with the ``admin`` scope (their own team). Every route authenticates before it
reads a body; every change writes one audit record."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from litestar import Controller, Request, Response, get, patch, post
from litestar.params import FromPath, FromQuery
from sluice.errors import ErrorCode, SluiceError

from services.gateway.domain.dialects.parsing import parse_model
from services.gateway.domain.tenancy.policy import Caller, Scope
from services.gateway.domain.tenancy.ports import AuditQuery
from services.gateway.handlers.http.admin_bodies import (
    KeyCreateBody,
    KeyRotateBody,
    KeyUpdateBody,
    TeamCreateBody,
    TeamUpdateBody,
    audit_view,
    effective_view,
    key_view,
    team_view,
)
from services.gateway.handlers.http.deps import ApiDeps, deps_of
from services.gateway.handlers.http.middleware import request_context
from services.gateway.handlers.http.requests import (
    authenticate_caller,
    check_content_type,
    read_body,
)
from services.gateway.handlers.http.responses import json_response


async def _admin(request: Request[Any, Any, Any]) -> tuple[ApiDeps, Caller]:
    deps = deps_of(request)
    return deps, await authenticate_caller(request, deps.keys, Scope.ADMIN)


async def _body(request: Request[Any, Any, Any], deps: ApiDeps, *, optional: bool = False) -> bytes:
    check_content_type(request.headers.get("content-type"))
    raw = await read_body(request, deps.settings.max_body_bytes)
    return raw if raw.strip() or not optional else b"{}"


class AdminTeamsController(Controller):
    path = "/v1/admin/teams"
    tags = ["admin"]

    @post("/", operation_id="adminCreateTeam", summary="Create a team", status_code=201)
    async def create_team(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """Operators only (the admin key). Body: ``team_id`` (lower-case letters,
        digits, ``-``, ``_``), ``name``, ``tier`` (of ``config/tiers.yaml``; default its
        ``default_tier``), and overrides of the tier's defaults: ``limits``
        (``requests_per_minute``, ``input_tokens_per_minute``,
        ``output_tokens_per_minute``, ``concurrent_requests``), ``budgets``
        (``usd_per_day``, ``usd_per_month``), ``end_user_limits``, ``end_user_budgets``,
        ``metadata``. 409 when the id exists."""
        deps, caller = await _admin(request)
        body = parse_model(await _body(request, deps), TeamCreateBody)
        team = await deps.admin.create_team(
            caller, body.spec(), request_context(request.scope).trace_id
        )
        return json_response(team_view(team), status=201)

    @get("/", operation_id="adminListTeams", summary="List teams")
    async def list_teams(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """Every team for an operator; a team's own admin sees only its team."""
        deps, caller = await _admin(request)
        teams = await deps.admin.list_teams(caller)
        return json_response({"object": "list", "data": [team_view(t) for t in teams]})

    @get("/{team_id:str}", operation_id="adminGetTeam", summary="Get a team")
    async def get_team(
        self, request: Request[Any, Any, Any], team_id: FromPath[str]
    ) -> Response[Any]:
        """A team, with its tier, its own limits and budgets and ``effective`` ones
        (its own over its tier's). Another team is 404 to a team's admin."""
        deps, caller = await _admin(request)
        team = await deps.admin.team(caller, team_id)
        view = team_view(team)
        view["effective"] = effective_view(team, deps.admin.tiers.get(team.tier))
        return json_response(view)

    @patch("/{team_id:str}", operation_id="adminUpdateTeam", summary="Update a team")
    async def update_team(
        self, request: Request[Any, Any, Any], team_id: FromPath[str]
    ) -> Response[Any]:
        """Operators only. Changes what is given (``name``, ``tier``, ``limits``,
        ``budgets``, ``end_user_limits``, ``end_user_budgets`` field by field, 0 going
        back to the tier's value; ``metadata`` replaced; ``disabled``). Every gateway
        applies the change at once."""
        deps, caller = await _admin(request)
        body = parse_model(await _body(request, deps), TeamUpdateBody)
        team = await deps.admin.update_team(
            caller, team_id, body.changes(), request_context(request.scope).trace_id
        )
        return json_response(team_view(team))


class AdminKeysController(Controller):
    path = "/v1/admin/keys"
    tags = ["admin"]

    @post("/", operation_id="adminCreateKey", summary="Create a key", status_code=201)
    async def create_key(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """A key for a team: ``team_id``, ``name`` (unique in the team), ``scopes``
        (``chat``, ``jobs``, ``usage:read``, ``admin``, ``priority:system``; default
        ``chat``), ``model_allow`` (names or globs), ``limits``, ``budgets``,
        ``expires_at`` or ``expires_in_seconds``, ``metadata``, ``audit_prompts``,
        ``on_budget_exhausted``, ``api_version`` (the ``Sluice-Version`` of its requests
        that name none; default: the current version). The answer holds the secret
        (``secret``), shown this once: only its SHA-256 is stored."""
        deps, caller = await _admin(request)
        body = parse_model(await _body(request, deps), KeyCreateBody)
        now = time.time()
        issued = await deps.admin.create_key(
            caller, body.spec(now), request_context(request.scope).trace_id
        )
        view = key_view(issued.record, now)
        view["secret"] = issued.secret
        return json_response(view, status=201)

    @get("/", operation_id="adminListKeys", summary="List keys")
    async def list_keys(
        self, request: Request[Any, Any, Any], team_id: FromQuery[str | None] = None
    ) -> Response[Any]:
        """Keys (never their secrets), of one team with ``team_id``; a team's admin
        sees its own team's only."""
        deps, caller = await _admin(request)
        records = await deps.admin.list_keys(caller, team_id)
        now = time.time()
        return json_response({"object": "list", "data": [key_view(r, now) for r in records]})

    @get("/{key_id:str}", operation_id="adminGetKey", summary="Get a key")
    async def get_key(
        self, request: Request[Any, Any, Any], key_id: FromPath[str]
    ) -> Response[Any]:
        """One key's record and status (active, rotating, rotated, expired, revoked)."""
        deps, caller = await _admin(request)
        return json_response(key_view(await deps.admin.key(caller, key_id), time.time()))

    @patch("/{key_id:str}", operation_id="adminUpdateKey", summary="Update a key")
    async def update_key(
        self, request: Request[Any, Any, Any], key_id: FromPath[str]
    ) -> Response[Any]:
        """Changes what is given: ``scopes``, ``model_allow``, ``limits``, ``budgets``,
        ``expires_at`` / ``expires_in_seconds`` (0: never), ``metadata``,
        ``audit_prompts``, ``on_budget_exhausted``, ``api_version``. Every gateway
        applies it at once."""
        deps, caller = await _admin(request)
        body = parse_model(await _body(request, deps), KeyUpdateBody)
        now = time.time()
        record = await deps.admin.update_key(
            caller, key_id, body.changes(now), request_context(request.scope).trace_id
        )
        return json_response(key_view(record, now))

    @post(
        "/{key_id:str}/rotate",
        operation_id="adminRotateKey",
        summary="Rotate a key",
        status_code=201,
    )
    async def rotate_key(
        self, request: Request[Any, Any, Any], key_id: FromPath[str]
    ) -> Response[Any]:
        """A new key with the same team, scopes, models, limits and policies (its
        ``secret`` shown once); the old one keeps working for ``grace_seconds`` (default
        3600; 0 stops it now), then answers 401 ``key_expired``."""
        deps, caller = await _admin(request)
        body = parse_model(await _body(request, deps, optional=True), KeyRotateBody)
        issued = await deps.admin.rotate_key(
            caller, key_id, body.grace_seconds, request_context(request.scope).trace_id
        )
        view = key_view(issued.record, time.time())
        view["secret"] = issued.secret
        return json_response(view, status=201)

    @post(
        "/{key_id:str}/revoke",
        operation_id="adminRevokeKey",
        summary="Revoke a key",
        status_code=200,
    )
    async def revoke_key(
        self, request: Request[Any, Any, Any], key_id: FromPath[str]
    ) -> Response[Any]:
        """The key stops working on every gateway at once (within about a second); its
        name may be used again. Revoking a revoked key changes nothing."""
        deps, caller = await _admin(request)
        record = await deps.admin.revoke_key(
            caller, key_id, request_context(request.scope).trace_id
        )
        return json_response(key_view(record, time.time()))


def _when(value: str | None, param: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise SluiceError(
            ErrorCode.INVALID_REQUEST, f"{param} must be an ISO 8601 time.", param=param
        ) from None
    if parsed.tzinfo is None:
        raise SluiceError(
            ErrorCode.INVALID_REQUEST, f"{param} needs a time zone (Z or +hh:mm).", param=param
        )
    return parsed


class AdminAuditController(Controller):
    path = "/v1/admin/audit"
    tags = ["admin"]

    @get("/", operation_id="adminListAudit", summary="Read the audit trail")
    async def list_audit(
        self,
        request: Request[Any, Any, Any],
        *,
        team_id: FromQuery[str | None] = None,
        key_id: FromQuery[str | None] = None,
        action: FromQuery[str | None] = None,
        since: FromQuery[str | None] = None,
        until: FromQuery[str | None] = None,
        limit: FromQuery[int] = 50,
        after: FromQuery[int] = 0,
    ) -> Response[Any]:
        """Audit records, oldest first: admin actions (``team.create``, ``team.update``,
        ``key.create``, ``key.update``, ``key.rotate``, ``key.revoke``) and requests
        (``action=request``: who, when, model, tokens, cost in nano-USD, status, error
        code; the body only for keys with ``audit_prompts``). Filters: ``team_id``,
        ``key_id``, ``action``, ``since`` and ``until`` (ISO 8601). ``limit`` (1-500)
        and ``after`` (the previous page's ``next_after``) page; ``next_after`` is null
        at the end. A team's admin reads its own team's records only."""
        deps, caller = await _admin(request)
        if not 1 <= limit <= 500:
            raise SluiceError(
                ErrorCode.INVALID_REQUEST, "limit must be between 1 and 500.", param="limit"
            )
        if after < 0:
            raise SluiceError(ErrorCode.INVALID_REQUEST, "after cannot be below 0.", param="after")
        query = AuditQuery(
            team_id=team_id or None,
            key_id=key_id or None,
            action=action or None,
            since=_when(since, "since"),
            until=_when(until, "until"),
            limit=limit,
            after=after,
        )
        page = await deps.admin.audit(caller, query)
        return json_response(
            {
                "object": "list",
                "data": [audit_view(cursor, event) for cursor, event in page.events],
                "next_after": page.next_after or None,
            }
        )
