"""``/v1/jobs``: submit a chat completion as a job, list, read, follow and cancel jobs;
``/v1/webhooks/secret``: the team's webhook signing secret."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath, FromQuery
from sluice.errors import ErrorCode, SluiceError

from services.gateway.domain.exchange import Answer
from services.gateway.domain.jobs.request import parse_job_body
from services.gateway.domain.tenancy.policy import Scope
from services.gateway.handlers.http import headers as h
from services.gateway.handlers.http.deps import deps_of
from services.gateway.handlers.http.idempotency import idempotent
from services.gateway.handlers.http.middleware import request_context
from services.gateway.handlers.http.requests import authenticate, authenticated_body
from services.gateway.handlers.http.responses import json_response, to_response
from services.gateway.handlers.http.routes import JOBS_ROUTE


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
        ``Idempotency-Key`` is honoured. Every ``/v1/jobs`` route and the webhook secret
        need the ``jobs`` scope."""
        deps = deps_of(request)
        ctx = request_context(request.scope)
        caller, raw = await authenticated_body(
            request,
            deps.keys,
            deps.settings.max_body_bytes,
            Scope.JOBS,
            scrub=deps.chat.guard.scrub,
        )
        key = caller.key
        headers = request.headers
        prefer = h.prefer_of(headers)

        async def run() -> Answer:
            return await deps.jobs.respond(
                key,
                parse_job_body(raw).spec(),
                prefer=prefer,
                priority=h.job_priority(key, headers, prefer),
                trace_id=ctx.trace_id,
                tags=h.tags_of(headers),
                end_user=caller.end_user,
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
        deps = deps_of(request)
        jobs = deps.jobs
        key = await authenticate(request, deps.keys, Scope.JOBS)
        if not 1 <= limit <= 100:
            raise SluiceError(
                ErrorCode.INVALID_REQUEST, "limit must be between 1 and 100.", param="limit"
            )
        return json_response(await jobs.list(key, limit=limit, after=after))

    @get("/jobs/{job_id:str}", operation_id="getJob", summary="Get a job")
    async def get_job(
        self, request: Request[Any, Any, Any], job_id: FromPath[str]
    ) -> Response[Any]:
        """Status (queued, in_progress, completed, failed, cancelled), progress (tokens
        so far, and the fraction of max_tokens), result (the ``chat.completion``), usage,
        cost, error (a problem object), timestamps, attempts and the webhook delivery
        log. Another team's job is 404."""
        deps = deps_of(request)
        jobs = deps.jobs
        key = await authenticate(request, deps.keys, Scope.JOBS)
        return json_response(await jobs.view(await jobs.find(key, job_id)))

    @get("/jobs/{job_id:str}/events", operation_id="streamJobEvents", summary="Job events")
    async def job_events(
        self, request: Request[Any, Any, Any], job_id: FromPath[str]
    ) -> Response[Any]:
        """Server-Sent Events: ``status`` (the job object, at once and on every change)
        and ``token`` (each generated piece, replayed from the start, then live) until
        the job ends."""
        deps = deps_of(request)
        jobs = deps.jobs
        key = await authenticate(request, deps.keys, Scope.JOBS)
        record = await jobs.find(key, job_id)
        return to_response(Answer.sse(jobs.events(record), {}))

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
        deps = deps_of(request)
        jobs = deps.jobs
        key = await authenticate(request, deps.keys, Scope.JOBS)
        return json_response(await jobs.view(await jobs.cancel(key, job_id)))


class WebhooksController(Controller):
    path = "/v1"
    tags = ["jobs"]

    @get("/webhooks/secret", operation_id="getWebhookSecret", summary="Webhook secret")
    async def webhook_secret(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """The team's Standard Webhooks signing secret (``whsec_...``): verify
        ``webhook-signature`` over ``<webhook-id>.<webhook-timestamp>.<body>``, e.g. with
        ``standardwebhooks.Webhook(secret).verify(body, headers)``."""
        deps = deps_of(request)
        jobs = deps.jobs
        key = await authenticate(request, deps.keys, Scope.JOBS)
        secret = await jobs.webhook_secrets.get(key.team_id)
        return json_response({"object": "webhook_secret", "team_id": key.team_id, "secret": secret})
