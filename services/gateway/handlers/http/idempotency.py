"""``Idempotency-Key`` around the POSTs that cost money: the header and the body's
shape into an ``IdempotentRequest`` for the domain to run."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from sluice.keys.v1 import keys_pb2

from services.gateway.domain.exchange import Answer, RequestContext
from services.gateway.domain.idempotency.policy import IdempotentRequest
from services.gateway.domain.idempotency.service import Idempotency
from services.gateway.handlers.http.headers import IDEMPOTENCY_HEADER
from services.gateway.handlers.http.routes import JOBS_ROUTE


def _loose(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


async def idempotent(
    idempotency: Idempotency,
    headers: Mapping[str, str],
    *,
    key: keys_pb2.ApiKeyRecord,
    ctx: RequestContext,
    raw: bytes,
    route: str,
    run: Callable[[], Awaitable[Answer]],
    job: bool,
    dialect: str = "openai",
) -> Answer:
    """Runs ``run`` under the request's ``Idempotency-Key``, if it sent one."""
    raw_key = headers.get(IDEMPOTENCY_HEADER)
    if raw_key is None:
        return await run()
    body = _loose(raw)
    chat = body.get("request") if route == JOBS_ROUTE else body
    chat = chat if isinstance(chat, dict) else {}
    options = chat.get("stream_options")
    request = IdempotentRequest(
        key=key,
        raw_key=raw_key,
        route=route,
        body=raw,
        ctx=ctx,
        accept=headers.get("accept", ""),
        stream=bool(chat.get("stream")) and not job,
        model=str(chat.get("model", "")),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        quick=job,
        dialect=dialect,
    )
    return await idempotency.run(request, run)
