"""The Litestar application: thin controllers over the chat service, the key store and
the readiness check, and one exception handler that renders every error as problem+json
(in the Anthropic error shape under ``/v1/messages``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from litestar import Controller, Litestar, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, ScalarRenderPlugin
from litestar.params import FromPath, FromQuery
from litestar.response import Stream
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sluice import __version__
from sluice.catalog import Catalog
from sluice.errors import ErrorCode, SluiceError
from sluice.keys.v1 import keys_pb2
from sluice.metrics import Instruments
from sluice.topology import PriorityClass

from services.gateway.anthropic import (
    ANTHROPIC,
    VERSION_HEADER,
    anthropic_to_chat_request,
    check_version,
    parse_messages_body,
    render_error,
)
from services.gateway.auth import KeyStore, extract_secret
from services.gateway.chat import (
    DISCONNECT_HEADER,
    SEMANTIC_HEADER,
    SERVICE,
    ChatService,
    disconnect_policy,
    semantic_wanted,
)
from services.gateway.edge import MESSAGES_ROUTE, RequestContext, request_context
from services.gateway.idempotency import HttpAnswer, Idempotency
from services.gateway.jobs import JobCreateRequest, JobService, parse_job_body, resolve_priority
from services.gateway.jobs_http import (
    CHAT_ROUTE,
    IDEMPOTENCY_HEADER,
    JOBS_ROUTE,
    PRIORITY_HEADER,
    idempotent,
    job_json,
    job_priority,
    prefer_of,
    submit_job,
    to_response,
)
from services.gateway.normalize import parse_body, to_chat_request
from services.gateway.problems import PROBLEM_CONTENT_TYPE, problem_headers, render_problem
from services.gateway.render import RequestMeta
from services.gateway.settings import GatewaySettings
from services.gateway.streams import StreamResumer, parse_resume_point

log = logging.getLogger(__name__)

JSON = "application/json"


class ReadinessCheck(Protocol):
    async def check(self) -> dict[str, bool]: ...


@dataclass
class GatewayDeps:
    settings: GatewaySettings
    keys: KeyStore
    chat: ChatService
    readiness: ReadinessCheck
    instruments: Instruments
    models_body: bytes
    # Jobs, idempotency keys and webhook secrets (absent: those features are off).
    jobs: JobService | None = None
    idempotency: Idempotency | None = None


def models_list_body(catalog: Catalog) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": m.name, "object": "model", "created": 0, "owned_by": m.owned_by}
                for m in catalog.models.values()
            ],
        }
    )


def _deps(request: Request[Any, Any, Any]) -> GatewayDeps:
    deps: GatewayDeps = request.app.state["deps"]
    return deps


async def _authenticate(
    request: Request[Any, Any, Any], deps: GatewayDeps
) -> keys_pb2.ApiKeyRecord:
    headers = request.headers
    secret = extract_secret(headers.get("authorization"), headers.get("x-api-key"))
    return await deps.keys.authenticate(secret)


# A client that sent too much is read to the end before the 413, up to this many bytes:
# answering mid-upload makes many clients report a reset connection instead of the 413.
_DRAIN_LIMIT_BYTES = 64 * 1024 * 1024


async def read_body(request: Request[Any, Any, Any], limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            break
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            too_large = True
        if not too_large:
            chunks.append(chunk)
        if not message.get("more_body", False) or size > limit + _DRAIN_LIMIT_BYTES:
            break
    if too_large:
        raise SluiceError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"The request body is above the gateway's limit of {limit} bytes.",
            details={"limit_bytes": limit},
        )
    return b"".join(chunks)


def _check_content_type(value: str | None) -> None:
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media != JSON and not media.endswith("+json"):
        raise SluiceError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            "The body must be JSON (Content-Type: application/json).",
        )


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
        ``x-sluice-priority`` (interactive, batch, system) picks the scheduling class."""
        deps = _deps(request)
        ctx = request_context(request.scope)
        key = await _authenticate(request, deps)
        _check_content_type(request.headers.get("content-type"))
        raw = await read_body(request, deps.settings.max_body_bytes)
        headers = request.headers
        prefer = prefer_of(headers)
        as_job = deps.jobs is not None and (prefer.respond_async or prefer.wait is not None)

        async def run() -> HttpAnswer:
            body = parse_body(raw)
            if deps.jobs is not None and as_job:
                priority = job_priority(key, headers, prefer)
                spec = JobCreateRequest(request=body)
                return await submit_job(
                    deps.jobs,
                    key,
                    ctx=ctx,
                    spec=spec,
                    prefer=prefer,
                    priority=priority,
                )
            priority = resolve_priority(
                key, headers.get(PRIORITY_HEADER), PriorityClass.INTERACTIVE
            )
            meta = RequestMeta(ctx.request_id, ctx.trace_id, body.model)
            result = await deps.chat.complete(
                key,
                to_chat_request(body),
                meta,
                cache_control=headers.get("cache-control", ""),
                instance=ctx.instance,
                on_disconnect=disconnect_policy(headers.get(DISCONNECT_HEADER)),
                semantic=semantic_wanted(
                    deps.settings.semantic_cache, headers.get(SEMANTIC_HEADER)
                ),
                priority=priority,
                # An idempotent request's record follows its lifecycle events.
                lifecycle_events=IDEMPOTENCY_HEADER in headers,
            )
            if result.stream is not None:
                return HttpAnswer(200, result.headers, "text/event-stream", stream=result.stream)
            return HttpAnswer(200, result.headers, JSON, body=result.body or b"")

        answer = await idempotent(
            deps.idempotency,
            headers,
            key=key,
            ctx=ctx,
            raw=raw,
            route=CHAT_ROUTE,
            run=run,
            job=as_job,
        )
        return to_response(answer)


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
        respond-async`` is not applied here (a job answers as a chat completion)."""
        deps = _deps(request)
        ctx = request_context(request.scope)
        key = await _authenticate(request, deps)
        headers = request.headers
        check_version(headers.get(VERSION_HEADER))
        _check_content_type(headers.get("content-type"))
        if IDEMPOTENCY_HEADER in headers:
            raise SluiceError(
                ErrorCode.INVALID_REQUEST,
                "Idempotency-Key is supported on /v1/chat/completions only.",
                param="Idempotency-Key",
            )
        raw = await read_body(request, deps.settings.max_body_bytes)
        body = parse_messages_body(raw)
        meta = RequestMeta(ctx.request_id, ctx.trace_id, body.model)
        result = await deps.chat.complete(
            key,
            anthropic_to_chat_request(body),
            meta,
            dialect=ANTHROPIC,
            cache_control=headers.get("cache-control", ""),
            instance=ctx.instance,
            on_disconnect=disconnect_policy(headers.get(DISCONNECT_HEADER)),
            semantic=semantic_wanted(deps.settings.semantic_cache, headers.get(SEMANTIC_HEADER)),
            priority=resolve_priority(key, headers.get(PRIORITY_HEADER), PriorityClass.INTERACTIVE),
        )
        # Where the SDK looks for the request id (``message._request_id``).
        result.headers["request-id"] = ctx.request_id
        if result.stream is not None:
            return Stream(result.stream, media_type="text/event-stream", headers=result.headers)
        return Response(result.body or b"", media_type=JSON, headers=result.headers)


class JobsController(Controller):
    path = "/v1"
    tags = ["jobs"]

    @post(
        "/jobs",
        operation_id="createJob",
        summary="Submit a chat completion as a job",
        status_code=202,
    )
    async def create_job(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """Queues a chat completion and answers ``202 Accepted`` with the job object
        and ``Location: /v1/jobs/{id}``. Body::

            {"request": {<chat completion request>},
             "webhook_url": "https://example.com/hook",   (optional)
             "metadata": {"k": "v"}}                       (optional, up to 16 pairs)

        Jobs run in the ``batch`` class unless ``x-sluice-priority`` says otherwise (or
        ``Prefer: wait=N`` asks to hold the request: then ``interactive``, and a job done
        within N seconds is answered inline with the ``chat.completion``). The webhook
        (Standard Webhooks, signed with ``GET /v1/webhooks/secret``) reports
        ``job.completed``, ``job.failed`` or ``job.cancelled``; URLs that resolve to
        loopback, private, link-local or metadata addresses are refused.
        ``Idempotency-Key`` is honoured."""
        deps = _deps(request)
        jobs = _jobs(deps)
        ctx = request_context(request.scope)
        key = await _authenticate(request, deps)
        _check_content_type(request.headers.get("content-type"))
        raw = await read_body(request, deps.settings.max_body_bytes)
        headers = request.headers
        prefer = prefer_of(headers)

        async def run() -> HttpAnswer:
            spec = parse_job_body(raw)
            priority = job_priority(key, headers, prefer)
            return await submit_job(
                jobs,
                key,
                ctx=ctx,
                spec=spec,
                prefer=prefer,
                priority=priority,
            )

        answer = await idempotent(
            deps.idempotency,
            headers,
            key=key,
            ctx=ctx,
            raw=raw,
            route=JOBS_ROUTE,
            run=run,
            job=True,
        )
        return to_response(answer)

    @get("/jobs", operation_id="listJobs", summary="List jobs")
    async def list_jobs(
        self,
        request: Request[Any, Any, Any],
        limit: FromQuery[int] = 20,
        after: FromQuery[str | None] = None,
    ) -> Response[Any]:
        """The caller's team's jobs, newest first. ``limit`` (1-100) and ``after`` (the
        ``last_id`` of the previous page) paginate; ``has_more`` says whether to."""
        deps = _deps(request)
        jobs = _jobs(deps)
        key = await _authenticate(request, deps)
        if not 1 <= limit <= 100:
            raise SluiceError(
                ErrorCode.INVALID_REQUEST, "limit must be between 1 and 100.", param="limit"
            )
        return job_json(await jobs.list(key, limit=limit, after=after))

    @get("/jobs/{job_id:str}", operation_id="getJob", summary="Get a job")
    async def get_job(
        self, request: Request[Any, Any, Any], job_id: FromPath[str]
    ) -> Response[Any]:
        """Status (queued, in_progress, completed, failed, cancelled), progress (tokens
        so far, and the fraction of max_tokens), result (the ``chat.completion``), usage,
        cost, error (a problem object), timestamps, attempts and the webhook delivery
        log. Another team's job is 404."""
        deps = _deps(request)
        jobs = _jobs(deps)
        key = await _authenticate(request, deps)
        return job_json(await jobs.view(await jobs.find(key, job_id)))

    @get("/jobs/{job_id:str}/events", operation_id="streamJobEvents", summary="Job events")
    async def job_events(
        self, request: Request[Any, Any, Any], job_id: FromPath[str]
    ) -> Response[Any]:
        """Server-Sent Events: ``status`` (the job object, at once and on every change)
        and ``token`` (each generated piece, replayed from the start, then live) until
        the job ends."""
        deps = _deps(request)
        jobs = _jobs(deps)
        key = await _authenticate(request, deps)
        record = await jobs.find(key, job_id)
        return Stream(
            jobs.events(record),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    @post(
        "/jobs/{job_id:str}/cancel",
        operation_id="cancelJob",
        summary="Cancel a job",
        status_code=200,
    )
    async def cancel_job(
        self, request: Request[Any, Any, Any], job_id: FromPath[str]
    ) -> Response[Any]:
        """Stops the job: a queued job never runs; a running one stops generating
        upstream and is billed for what it produced. Answers the job object
        (``cancel_requested: true``; ``status`` becomes ``cancelled`` when it stopped)."""
        deps = _deps(request)
        jobs = _jobs(deps)
        key = await _authenticate(request, deps)
        return job_json(await jobs.view(await jobs.cancel(key, job_id)))


class WebhooksController(Controller):
    path = "/v1"
    tags = ["jobs"]

    @get("/webhooks/secret", operation_id="getWebhookSecret", summary="Webhook secret")
    async def webhook_secret(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """The team's Standard Webhooks signing secret (``whsec_...``): verify
        ``webhook-signature`` over ``<webhook-id>.<webhook-timestamp>.<body>``, e.g. with
        ``standardwebhooks.Webhook(secret).verify(body, headers)``."""
        deps = _deps(request)
        jobs = _jobs(deps)
        key = await _authenticate(request, deps)
        secret = await jobs.webhook_secrets.get(key.team_id)
        return job_json({"object": "webhook_secret", "team_id": key.team_id, "secret": secret})


def _jobs(deps: GatewayDeps) -> JobService:
    if deps.jobs is None:
        raise SluiceError(ErrorCode.NOT_FOUND, "Jobs are not enabled on this gateway.")
    return deps.jobs


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
        deps = _deps(request)
        ctx = request_context(request.scope)
        key = await _authenticate(request, deps)
        point = parse_resume_point(request.headers.get("last-event-id"), after, request_id)
        result = await StreamResumer(deps.chat).resume(
            key, request_id, point, trace_id=ctx.trace_id, instance=ctx.instance
        )
        assert result.stream is not None
        return Stream(result.stream, media_type="text/event-stream", headers=result.headers)


class ModelsController(Controller):
    path = "/v1"
    tags = ["models"]

    @get("/models", operation_id="listModels", summary="List models")
    async def list_models(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """The model names this gateway serves, in OpenAI's list shape."""
        deps = _deps(request)
        await _authenticate(request, deps)
        return Response(deps.models_body, media_type=JSON)


class OpsController(Controller):
    tags = ["operations"]

    @get("/healthz", operation_id="getHealth", summary="Liveness")
    async def healthz(self) -> Response[bytes]:
        """200 while the process is alive."""
        return Response(b'{"status":"ok"}', media_type=JSON)

    @get("/readyz", operation_id="getReadiness", summary="Readiness")
    async def readyz(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """200 when NATS is connected and every Sluice service answers ready over NATS."""
        services = await _deps(request).readiness.check()
        ready = bool(services) and all(services.values())
        if ready:
            return Response(
                orjson.dumps({"status": "ready", "services": services}), media_type=JSON
            )
        ctx = request_context(request.scope)
        err = SluiceError(
            ErrorCode.SERVICE_UNAVAILABLE,
            "Not every service is ready: "
            + ", ".join(sorted(s for s, ok in services.items() if not ok))
            + ".",
            details={"services": services},
            retry_after_ms=1000,
        )
        return _problem_response(err, ctx.instance, ctx.request_id, ctx.trace_id)

    @get("/metrics", operation_id="getMetrics", summary="Prometheus metrics")
    async def metrics(self) -> Response[bytes]:
        """Prometheus exposition of the gateway's OpenTelemetry metrics."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


_HTTP_CODES = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.SERVICE_UNAVAILABLE,
}

_HTTP_DETAILS = {
    ErrorCode.NOT_FOUND: "No route matches this path.",
    ErrorCode.METHOD_NOT_ALLOWED: "This route does not accept this method.",
    ErrorCode.PAYLOAD_TOO_LARGE: "The request body is above the gateway's size limit.",
    ErrorCode.INVALID_REQUEST: "The request parameters are not valid.",
}


def _from_http_exception(exc: HTTPException) -> SluiceError:
    code = _HTTP_CODES.get(exc.status_code)
    if code is None:
        code = ErrorCode.INVALID_REQUEST if exc.status_code < 500 else ErrorCode.INTERNAL_ERROR
        return SluiceError(
            code, "The request could not be served.", status_override=exc.status_code
        )
    return SluiceError(code, _HTTP_DETAILS.get(code, str(exc.detail)))


def _problem_response(
    err: SluiceError, instance: str, request_id: str, trace_id: str
) -> Response[bytes]:
    return Response(
        render_problem(err, instance=instance, request_id=request_id, trace_id=trace_id),
        status_code=err.status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=problem_headers(err),
    )


def _anthropic_error_response(err: SluiceError, ctx: RequestContext) -> Response[bytes]:
    headers = problem_headers(err)
    headers["request-id"] = ctx.request_id
    return Response(
        render_error(err, instance=ctx.instance, request_id=ctx.request_id, trace_id=ctx.trace_id),
        status_code=err.status,
        media_type=JSON,
        headers=headers,
    )


def _is_messages_path(path: str) -> bool:
    # Anthropic clients parse only their own error shape, on the route and beneath it
    # (an SDK calling /v1/messages/count_tokens gets its 404 in that shape too).
    return path == MESSAGES_ROUTE or path.startswith(MESSAGES_ROUTE + "/")


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    ctx = request_context(request.scope)
    if isinstance(exc, SluiceError):
        err = exc
    elif isinstance(exc, HTTPException):
        err = _from_http_exception(exc)
    else:
        log.exception("unexpected error serving %s (request %s)", ctx.path, ctx.request_id)
        err = SluiceError(ErrorCode.INTERNAL_ERROR, "The gateway failed to serve this request.")
    instruments: Instruments | None = None
    deps = request.app.state.get("deps")
    if isinstance(deps, GatewayDeps):
        instruments = deps.instruments
    if instruments is not None:
        instruments.errors.add(1, {"code": str(err.code), "service": SERVICE})
    if _is_messages_path(ctx.path):
        response = _anthropic_error_response(err, ctx)
    else:
        response = _problem_response(err, ctx.instance, ctx.request_id, ctx.trace_id)
    if err.code is ErrorCode.METHOD_NOT_ALLOWED and isinstance(exc, HTTPException) and exc.headers:
        allow = exc.headers.get("Allow") or exc.headers.get("allow")
        if allow:
            response.headers["allow"] = allow
    return response


def create_app(deps: GatewayDeps) -> Litestar:
    return Litestar(
        route_handlers=[
            ChatController,
            MessagesController,
            StreamsController,
            JobsController,
            WebhooksController,
            ModelsController,
            OpsController,
        ],
        exception_handlers={Exception: handle_exception},
        request_max_body_size=deps.settings.max_body_bytes,
        state=State({"deps": deps}),
        openapi_config=OpenAPIConfig(
            title="Sluice gateway",
            version=__version__,
            description="OpenAI-compatible chat completions and the Anthropic Messages "
            "API with limits, caching, cost and one trace per request. Errors are RFC 9457 "
            "problem+json (Anthropic error bodies on /v1/messages).",
            path="/docs",
            use_handler_docstrings=True,
            render_plugins=[ScalarRenderPlugin(path="/"), JsonRenderPlugin()],
        ),
        logging_config=None,
        debug=False,
    )
