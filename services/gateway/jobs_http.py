"""HTTP glue of jobs and idempotency: ``Prefer`` handling, the 202 / inline answers, the
``Idempotency-Key`` wrapper, and turning an ``HttpAnswer`` into a Litestar response.
The controllers in ``app.py`` stay thin over these."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from litestar import Response
from litestar.response import Stream
from sluice.errors import SluiceError
from sluice.keys.v1 import keys_pb2
from sluice.topology import PriorityClass

from services.gateway.edge import RequestContext
from services.gateway.idempotency import (
    SSE,
    HttpAnswer,
    Idempotency,
    IdempotentRequest,
)
from services.gateway.jobs import (
    JobCreateRequest,
    JobService,
    Prefer,
    S,
    parse_prefer,
    resolve_priority,
)
from services.gateway.problems import GatewayError

JSON = "application/json"
PRIORITY_HEADER = "x-sluice-priority"
IDEMPOTENCY_HEADER = "idempotency-key"
JOBS_ROUTE = "/v1/jobs"
CHAT_ROUTE = "/v1/chat/completions"


def to_response(answer: HttpAnswer) -> Response[Any]:
    if answer.stream is not None:
        return Stream(
            answer.stream,
            status_code=answer.status,
            media_type=answer.media_type,
            headers=answer.headers,
        )
    return Response(
        answer.body,
        status_code=answer.status,
        media_type=answer.media_type,
        headers=answer.headers,
    )


def prefer_of(headers: Any) -> Prefer:
    values: list[str] = headers.getall("prefer", [])
    return parse_prefer(values)


def job_priority(
    key: keys_pb2.ApiKeyRecord, headers: Mapping[str, str], prefer: Prefer
) -> PriorityClass:
    """Jobs run as ``batch`` unless the caller waits for them (``Prefer: wait``)."""
    default = PriorityClass.INTERACTIVE if prefer.wait is not None else PriorityClass.BATCH
    return resolve_priority(key, headers.get(PRIORITY_HEADER), default)


async def submit_job(
    jobs: JobService,
    key: keys_pb2.ApiKeyRecord,
    *,
    ctx: RequestContext,
    spec: JobCreateRequest,
    prefer: Prefer,
    priority: PriorityClass,
) -> HttpAnswer:
    """202 + ``Location`` for the job; with ``Prefer: wait=N`` and the job done in time,
    200 with the completion itself (or its error)."""
    submitted = await jobs.submit(
        key, spec, priority=priority, trace_id=ctx.trace_id, wait=prefer.wait
    )
    record = submitted.record
    applied = []
    if prefer.respond_async:
        applied.append("respond-async")
    if prefer.wait is not None:
        applied.append(f"wait={prefer.wait:g}")
    headers = {
        "location": f"{JOBS_ROUTE}/{record.job_id}",
        "x-sluice-job-id": record.job_id,
    }
    if applied:
        headers["preference-applied"] = ", ".join(applied)
    if submitted.finished and record.status == S.JOB_STATUS_COMPLETED:
        return HttpAnswer(200, headers, JSON, body=record.result_json)
    if submitted.finished and record.HasField("error") and record.error.code:
        err = SluiceError.from_proto(record.error)
        raise GatewayError(
            err.code,
            err.detail,
            details=err.details,
            param=err.param,
            status_override=err.status_override,
            headers=headers,
        )
    body = orjson.dumps(await jobs.view(record))
    return HttpAnswer(202, headers, JSON, body=body)


def _loose(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


async def idempotent(
    idempotency: Idempotency | None,
    headers: Mapping[str, str],
    *,
    key: keys_pb2.ApiKeyRecord,
    ctx: RequestContext,
    raw: bytes,
    route: str,
    run: Callable[[], Awaitable[HttpAnswer]],
    job: bool,
) -> HttpAnswer:
    """Runs ``run`` under the request's ``Idempotency-Key``, if it sent one."""
    raw_key = headers.get(IDEMPOTENCY_HEADER)
    if raw_key is None or idempotency is None:
        return await run()
    body = _loose(raw)
    chat = body.get("request") if route == JOBS_ROUTE else body
    chat = chat if isinstance(chat, dict) else {}
    options = chat.get("stream_options")
    stream = bool(chat.get("stream")) and not job
    request = IdempotentRequest(
        key=key,
        raw_key=raw_key,
        route=route,
        body=raw,
        ctx=ctx,
        accept=headers.get("accept", ""),
        stream=stream,
        model=str(chat.get("model", "")),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        quick=job,
    )
    return await idempotency.run(request, run)


def sse_answer(stream: Any, headers: dict[str, str]) -> HttpAnswer:
    return HttpAnswer(200, headers, SSE, stream=stream)


def job_json(view: dict[str, Any], status: int = 200) -> Response[bytes]:
    return Response(orjson.dumps(view), status_code=status, media_type=JSON)
