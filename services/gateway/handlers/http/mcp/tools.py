"""The gateway's operations as MCP tools: each one checks the caller's scope, then calls
the same domain service its HTTP route calls, under the caller's key. Errors come back as
the route's problem object (code, detail, fix hint, trace id), never as internals."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from sluice.topology import PriorityClass

from services.gateway.domain.chat import ChatOptions
from services.gateway.domain.dialects.common import RequestMeta
from services.gateway.domain.dialects.openai.request import ChatCompletionRequest, to_chat_request
from services.gateway.domain.dialects.parsing import parse_model, validation_problem
from services.gateway.domain.exchange import Answer, RequestContext
from services.gateway.domain.jobs.request import JobCreateRequest, Prefer
from services.gateway.domain.tenancy.policy import Caller, Scope, require_scope
from services.gateway.domain.usage import parse_params
from services.gateway.domain.work import resolve_priority
from services.gateway.handlers.http.deps import ApiDeps
from services.gateway.handlers.http.headers import IDEMPOTENCY_HEADER
from services.gateway.handlers.http.idempotency import idempotent
from services.gateway.handlers.http.mcp import schemas as s
from services.gateway.handlers.http.routes import JOBS_ROUTE


@dataclass(frozen=True)
class ToolCall:
    """One tool call: what it may reach and on whose behalf."""

    deps: ApiDeps
    caller: Caller
    ctx: RequestContext


Run = Callable[[ToolCall, Any], Awaitable[BaseModel]]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    title: str
    description: str
    args: type[BaseModel]
    result: type[BaseModel]
    # The key scope the tool needs (None: any key).
    scope: Scope | None
    run: Run
    read_only: bool

    def parse(self, arguments: dict[str, Any]) -> BaseModel:
        """The arguments as the tool's model, or the route's 400 naming the fields."""
        try:
            return self.args.model_validate(arguments)
        except ValidationError as exc:
            raise validation_problem(exc) from None


def _chat_body(args: s.ChatArgs) -> ChatCompletionRequest:
    # The HTTP route's own model and checks, from the tool's arguments.
    body = args.model_dump(include={"model", "messages", "max_tokens", "temperature"})
    return parse_model(orjson.dumps(body), ChatCompletionRequest)


def _plain(value: Any) -> Any:
    """A domain view as plain JSON values (views may hold pre-serialised fragments)."""
    return orjson.loads(orjson.dumps(value))


async def chat(call: ToolCall, args: s.ChatArgs) -> s.ChatResult:
    deps, ctx, key = call.deps, call.ctx, call.caller.key
    body = _chat_body(args)
    ctx.notes.model = body.model
    options = ChatOptions(
        instance=ctx.instance,
        priority=resolve_priority(key, None, PriorityClass.INTERACTIVE),
        end_user=call.caller.end_user,
    )
    meta = RequestMeta(ctx.request_id, ctx.trace_id, body.model, notes=ctx.notes)
    answer = await deps.chat.complete(key, to_chat_request(body), meta, options)
    completion = orjson.loads(answer.body)
    choice = completion["choices"][0]
    usage = completion.get("usage") or {}
    sluice = completion.get("sluice") or {}
    return s.ChatResult(
        text=choice["message"].get("content") or "",
        finish_reason=choice.get("finish_reason"),
        model=completion.get("model", body.model),
        usage=s.TokenUsage(
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            total_tokens=usage.get("total_tokens", 0),
        ),
        cost_usd=float(sluice.get("cost_usd") or 0.0),
        sluice=sluice,
    )


async def submit_job(call: ToolCall, args: s.SubmitJobArgs) -> s.Job:
    deps, ctx, key = call.deps, call.ctx, call.caller.key
    spec = JobCreateRequest(
        request=_chat_body(args), webhook_url=args.webhook_url, metadata=args.metadata
    )
    ctx.notes.model = args.model

    async def run() -> Answer:
        return await deps.jobs.respond(
            key,
            spec.spec(),
            prefer=Prefer(respond_async=True),
            priority=resolve_priority(key, None, PriorityClass.BATCH),
            trace_id=ctx.trace_id,
            end_user=call.caller.end_user,
        )

    # The submission as a POST /v1/jobs body: what the key's record fingerprints.
    raw = orjson.dumps(spec.model_dump(mode="json", exclude_none=True))
    answer = await idempotent(
        deps.idempotency,
        {IDEMPOTENCY_HEADER: args.idempotency_key} if args.idempotency_key else {},
        key=key,
        ctx=ctx,
        raw=raw,
        route=JOBS_ROUTE,
        run=run,
        job=True,
    )
    # A replay answers the job as it was submitted: read it as it is now.
    record = await deps.jobs.find(key, orjson.loads(answer.body)["id"])
    return s.Job.model_validate(_plain(await deps.jobs.view(record)))


async def get_job(call: ToolCall, args: s.JobArgs) -> s.Job:
    jobs = call.deps.jobs
    record = await jobs.find(call.caller.key, args.job_id)
    return s.Job.model_validate(_plain(await jobs.view(record)))


async def cancel_job(call: ToolCall, args: s.JobArgs) -> s.Job:
    jobs = call.deps.jobs
    record = await jobs.cancel(call.caller.key, args.job_id)
    return s.Job.model_validate(_plain(await jobs.view(record)))


async def estimate_cost(call: ToolCall, args: s.ChatArgs) -> s.Estimate:
    estimate = call.deps.estimator.estimate(to_chat_request(_chat_body(args)))
    return s.Estimate.model_validate(estimate)


async def my_usage(call: ToolCall, args: s.UsageArgs) -> s.UsageReport:
    query: dict[str, list[str]] = {}
    for name in ("since", "until", "model", "tag", "limit"):
        value = getattr(args, name)
        if value is not None:
            query[name] = [str(value)]
    if args.group_by is not None:
        query["group_by"] = [",".join(args.group_by)]
    # Always the caller's own team: the tool takes no team_id.
    report = await call.deps.usage.report(call.caller.key, parse_params(query))
    return s.UsageReport.model_validate(report)


async def list_models(call: ToolCall, _args: s.NoArgs) -> s.ModelList:
    listed = orjson.loads(call.deps.models_body)["data"]
    return s.ModelList(models=[s.Model(id=m["id"], owned_by=m["owned_by"]) for m in listed])


TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        "chat",
        "Chat completion",
        "Ask a model and get its answer, with the tokens used, the exact cost and the "
        "gateway's metadata (trace id, provider, cache status, latency). Needs the 'chat' "
        "scope. Answers can come from the gateway's cache (then they cost nothing).",
        s.ChatArgs,
        s.ChatResult,
        Scope.CHAT,
        chat,
        read_only=False,
    ),
    ToolSpec(
        "submit_job",
        "Submit a job",
        "Queue a chat completion to run in the background (batch class) and get the job "
        "at once; poll it with get_job until status is completed, failed or cancelled. "
        "Send an idempotency_key to make retries safe. Needs the 'jobs' scope.",
        s.SubmitJobArgs,
        s.Job,
        Scope.JOBS,
        submit_job,
        read_only=False,
    ),
    ToolSpec(
        "get_job",
        "Get a job",
        "A job's status, progress (tokens so far), result (the chat.completion), usage, "
        "cost and error. Only the caller's team's jobs. Needs the 'jobs' scope.",
        s.JobArgs,
        s.Job,
        Scope.JOBS,
        get_job,
        read_only=True,
    ),
    ToolSpec(
        "cancel_job",
        "Cancel a job",
        "Stop a job: a queued job never runs, a running one stops generating and is billed "
        "for what it produced. Needs the 'jobs' scope.",
        s.JobArgs,
        s.Job,
        Scope.JOBS,
        cancel_job,
        read_only=False,
    ),
    ToolSpec(
        "estimate_cost",
        "Estimate a request's cost",
        "What a chat request would cost, without calling a model: prompt tokens, an output "
        "token range and the exact USD range at the price table's prices. Needs the 'chat' "
        "scope.",
        s.ChatArgs,
        s.Estimate,
        Scope.CHAT,
        estimate_cost,
        read_only=True,
    ),
    ToolSpec(
        "my_usage",
        "My team's usage",
        "Cost, tokens, requests and cache savings of the caller's own team, grouped "
        "(key, team, end_user, model, provider, tag, day, hour) and filtered. Amounts are "
        "exact decimal strings of USD.",
        s.UsageArgs,
        s.UsageReport,
        None,
        my_usage,
        read_only=True,
    ),
    ToolSpec(
        "list_models",
        "List models",
        "The model names this gateway serves.",
        s.NoArgs,
        s.ModelList,
        None,
        list_models,
        read_only=True,
    ),
)
BY_NAME = {tool.name: tool for tool in TOOLS}


async def run_tool(tool: ToolSpec, call: ToolCall, arguments: dict[str, Any]) -> dict[str, Any]:
    """The tool's result as JSON values; a ``SluiceError`` for the caller to fix."""
    if tool.scope is not None:
        require_scope(call.caller.key, tool.scope)
    result = await tool.run(call, tool.parse(arguments))
    out: dict[str, Any] = result.model_dump(mode="json")
    return out
