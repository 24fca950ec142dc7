"""One chat completion through the data path: check the model and count tokens, reserve
and look up the cache concurrently, then answer from the cache or queue the work and
relay the worker's stream events, in the dialect of the door it came through."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from sluice import canonical, tokens
from sluice.catalog import Catalog
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2
from sluice.keys.v1 import keys_pb2
from sluice.limiter.v1 import limiter_pb2
from sluice.replay import History
from sluice.topology import PriorityClass

from services.gateway.domain import fail_open
from services.gateway.domain.admission import (
    NO_SEMANTIC,
    DisconnectPolicy,
    SemanticQuery,
    TokenBudget,
    admitted_headers,
    cache_policy,
    check_model,
    reserve_request,
    semantic_query,
    spend_ceiling,
)
from services.gateway.domain.coalesce import coalesce_key
from services.gateway.domain.dialects.common import Dialect, RequestMeta, final_sluice, judge
from services.gateway.domain.dialects.openai.response import OPENAI
from services.gateway.domain.exchange import Answer
from services.gateway.domain.fail_open import FailOpenAllowance
from services.gateway.domain.guard import Guard
from services.gateway.domain.labels import request_labels
from services.gateway.domain.ports import (
    Admission,
    CacheLookup,
    CoalesceClaims,
    StreamStore,
    WorkQueue,
)
from services.gateway.domain.problems import (
    failure_error,
    insufficient_confidence,
    timeout_error,
)
from services.gateway.domain.relay.reader import DeadlineExceeded, EventReader
from services.gateway.domain.relay.sse import StreamRelay
from services.gateway.domain.routing import Resolution, facts_of, resolve
from services.gateway.domain.tenancy.policy import check_model_allowed
from services.gateway.domain.tenancy.resolve import Tenancy
from services.gateway.domain.tenancy.tiers import LimiterFailure
from services.gateway.domain.verdict import (
    AnswerHints,
    AnswerTally,
    IssueType,
    checks_for,
    repair_request,
    schema_problems,
)
from services.gateway.domain.work import CacheInstruction, build_work, opened_event
from services.gateway.settings import GatewaySettings


@dataclass(frozen=True)
class ChatOptions:
    """How the caller wants one request handled (from its headers)."""

    dialect: Dialect = OPENAI
    cache_control: str = ""
    instance: str = ""
    on_disconnect: DisconnectPolicy = DisconnectPolicy.CONTINUE
    priority: PriorityClass = PriorityClass.INTERACTIVE
    # The worker reports started/finished on SLUICE_LIFECYCLE (idempotent requests).
    lifecycle_events: bool = False
    # The request asked for the semantic cache too.
    semantic: bool = False
    # The x-sluice-tags header (domain.labels).
    tags: tuple[str, ...] = ()
    # The end user a JWT vouches for (its ``sub``); else the request's own ``user``.
    end_user: str = ""
    # What the caller asked of the answer: confidence thresholds, schema repair.
    hints: AnswerHints = field(default_factory=AnswerHints)
    # The x-sluice-route header: routing rules may match on it.
    route_hint: str = ""


# Set on an answer served by a route's last resort.
STATUS_HEADER = "x-sluice-status"
# The deployment that answered (a stream's: the one that sent its first token).
DEPLOYMENT_HEADER = "x-sluice-deployment"
# How much longer than the route's deadline the gateway waits for the worker's report.
ROUTE_DEADLINE_GRACE_SECONDS = 1.0


def cache_scope(team_id: str, asked: str, route: str) -> str:
    """The exact cache's scope: the team, and the route when a rule or a sunset chose
    another than the model asked for (the answers of two routes are not the same)."""
    return team_id if route == asked else f"{team_id}|route:{route}"


class ChatService:
    def __init__(
        self,
        *,
        settings: GatewaySettings,
        catalog: Catalog,
        limiter: Admission,
        cache: CacheLookup,
        queue: WorkQueue,
        streams: StreamStore,
        relay: StreamRelay,
        tenancy: Tenancy,
        claims: CoalesceClaims | None = None,
        guard: Guard | None = None,
        fail_open: FailOpenAllowance | None = None,
    ) -> None:
        self.tenancy = tenancy
        self.guard = guard or Guard()
        # None: no coalescing (SLUICE_GATEWAY_COALESCE off).
        self.claims = claims
        # While the limiter does not answer, for the tiers that fail open.
        self.fail_open = fail_open
        self.settings = settings
        self.catalog = catalog
        self.limiter = limiter
        self.cache = cache
        self.queue = queue
        self.streams = streams
        self.relay = relay

    async def reserve(
        self, request: limiter_pb2.ReserveRequest, failure: LimiterFailure
    ) -> limiter_pb2.ReserveResponse:
        """The limiter's decision, or while it does not answer the tier's choice."""
        return await fail_open.reserve(self.limiter, request, failure, self.fail_open)

    def budget(self, request: chat_pb2.ChatRequest) -> TokenBudget:
        """The request's token budget on its model, or the error a client must fix."""
        return check_model(self.catalog, request, self.settings.default_max_output_tokens)

    async def complete(
        self,
        key: keys_pb2.ApiKeyRecord,
        request: chat_pb2.ChatRequest,
        meta: RequestMeta,
        options: ChatOptions,
    ) -> Answer:
        """A request already normalised by its front door, answered in its dialect."""
        meta.model_requested = request.model
        check_model_allowed(key, request.model)
        # Before anything costs: what is redacted is what is counted, cached and sent.
        inspected = self.guard.inspect(request, self.catalog.model(request.model))
        meta.checks = checks_for(
            request,
            options.hints,
            review_threshold=self.settings.review_threshold,
            schema_repair=self.settings.schema_repair,
        )
        if meta.checks.wants_confidence:
            # Confidence is measured from logprobs: asked of the provider (and part of
            # the cache key), returned to the caller only if it asked for them.
            request.sampling.logprobs = True
        routed, budget = await self.route(key, request, options.route_hint)
        meta.route, meta.route_rule = routed.route.name, routed.rule
        end_user, tags = request_labels(request, options.tags, options.end_user)
        meta.prompt_tokens = budget.prompt_tokens
        policy = cache_policy(self.settings.cache_mode, request.sampling, options.cache_control)
        cacheable = policy.lookup or policy.store
        scope = cache_scope(key.team_id, request.model, routed.route.name)
        cache_key = canonical.cache_key(request, scope=scope) if cacheable else ""
        # Only for requests the exact cache takes, and only when asked: otherwise the
        # messages carry empty fields and nobody embeds anything.
        query = (
            semantic_query(request, key.team_id) if options.semantic and cacheable else NO_SEMANTIC
        )
        meta.cache = "miss" if policy.lookup else "bypass"

        reservation, cached = await self._admit(
            key=key,
            request=request,
            meta=meta,
            budget=budget,
            lookup_key=cache_key if policy.lookup else "",
            semantic=query,
            options=options,
        )
        if not reservation.allowed:
            admitted_headers(reservation, options.dialect.limit_headers)  # the refusal
        # The rate-limit headers are the answer's alone: for work sent to a worker they
        # are written while it works (a tiered key has a dozen policies to read).
        limit_headers = functools.partial(
            admitted_headers, reservation, options.dialect.limit_headers
        )
        headers: dict[str, str] = {"x-sluice-cache": meta.cache}
        if meta.cache_reason:
            headers["x-sluice-cache-reason"] = meta.cache_reason
        if inspected.redacted:
            headers["x-sluice-guard"] = "redacted=" + inspected.header
        headers.update(routed.response_headers())
        if cached is not None:
            headers.update(limit_headers())
            return await self._answer_from_cache(
                key=key,
                request=request,
                meta=meta,
                reservation=reservation,
                cached=cached,
                headers=headers,
                dialect=options.dialect,
                labels=(end_user, tags),
            )
        release: Callable[[], Awaitable[None]] | None = None
        # Identical requests of one team in flight together share one upstream call.
        # Not with a schema repair to make: each waiter would repair on its own.
        repairs = bool(meta.checks.schema_json and meta.checks.repair)
        coalesces = bool(cache_key and policy.lookup and policy.store and not repairs)
        claims = self.claims if coalesces else None
        if claims is not None:
            ckey = coalesce_key(cache_key, options.dialect.name, request.stream)
            leader, revision = await claims.claim(ckey, meta.request_id)
            if leader != meta.request_id:
                headers.update(limit_headers())
                followed = await self._follow(
                    leader,
                    key=key,
                    request=request,
                    meta=meta,
                    reservation=reservation,
                    headers=headers,
                    options=options,
                    labels=(end_user, tags),
                )
                if followed is not None:
                    return followed
            elif revision:
                release = functools.partial(claims.release, ckey, revision)
        cache = None
        if policy.store:
            cache = CacheInstruction(
                cache_key, self.settings.cache_ttl_seconds, query.text, query.scope
            )
        work = build_work(
            request_id=meta.request_id,
            key=key,
            request=request,
            priority=options.priority,
            reservation_id=reservation.reservation_id,
            timeout_seconds=self.settings.request_timeout_seconds,
            lifecycle_events=options.lifecycle_events,
            cache=cache,
            end_user=end_user,
            tags=tags,
            spend_ceiling_usd_nanos=spend_ceiling(key, reservation),
        )
        self.route_work(work, routed, key, request, cache_key)
        if release is None:
            return await self._run(key, work, meta, headers, options, limit_headers=limit_headers)
        # The leader's claim ends with its answer: later identical requests find it in
        # the cache, or lead again.
        try:
            answer = await self._run(key, work, meta, headers, options, limit_headers=limit_headers)
        except BaseException:
            await release()
            raise
        if answer.stream is None:
            await release()
        else:
            answer.stream = _then(answer.stream, release)
        return answer

    async def cache_key_for(self, key: keys_pb2.ApiKeyRecord, request: chat_pb2.ChatRequest) -> str:
        """The exact-cache key this key's team would store ``request``'s answer under
        (as sent: no answer checks, no route hint), for invalidation; '' when the cache
        mode takes no such request. The team is part of the key."""
        check_model_allowed(key, request.model)
        self.guard.inspect(request, self.catalog.model(request.model))
        routed, _budget = await self.route(key, request, "")
        policy = cache_policy(self.settings.cache_mode, request.sampling, "")
        if not (policy.lookup or policy.store):
            return ""
        scope = cache_scope(key.team_id, request.model, routed.route.name)
        return canonical.cache_key(request, scope=scope)

    async def route(
        self, key: keys_pb2.ApiKeyRecord, request: chat_pb2.ChatRequest, hint: str
    ) -> tuple[Resolution, TokenBudget]:
        """The route that serves the request (rules, then lifecycle) and the request's
        token budget on it, or the error a client must fix."""
        prompt = tokens.count_chat(request)
        tier = ""
        if any(rule.tiers for rule in self.catalog.rules):
            tier = await self.tenancy.tier_of(key)
        routed = resolve(self.catalog, request.model, facts_of(request, prompt, tier, hint))
        if routed.route.name != request.model:
            # A rule (or the hint a client sends) never opens a route the key may not use.
            check_model_allowed(key, routed.route.name)
        budget = check_model(
            self.catalog,
            request,
            self.settings.default_max_output_tokens,
            model=routed.route,
            prompt=prompt,
        )
        return routed, budget

    def route_work(
        self,
        work: inference_pb2.InferenceWork,
        routed: Resolution,
        key: keys_pb2.ApiKeyRecord,
        request: chat_pb2.ChatRequest,
        cache_key: str,
        *,
        queued: bool = False,
    ) -> None:
        """The route on the work item, its deadline (the route's when shorter than the
        gateway's; not for ``queued`` work, a job, whose deadline the worker counts from
        its pickup), and the key a last resort may find a stored answer under."""
        route = routed.route
        work.route, work.route_rule = route.name, routed.rule
        if route.deadline_seconds is not None and not queued:
            work.deadline_unix_nanos = min(
                work.deadline_unix_nanos,
                work.enqueued_unix_nanos + int(route.deadline_seconds * 1e9),
            )
        resort = route.last_resort
        if resort is not None and resort.cache:
            scope = cache_scope(key.team_id, request.model, route.name)
            work.last_resort_cache_key = cache_key or canonical.cache_key(request, scope=scope)

    async def _admit(
        self,
        *,
        key: keys_pb2.ApiKeyRecord,
        request: chat_pb2.ChatRequest,
        meta: RequestMeta,
        budget: TokenBudget,
        lookup_key: str,
        semantic: SemanticQuery,
        options: ChatOptions,
    ) -> tuple[limiter_pb2.ReserveResponse, inference_pb2.Final | None]:
        """Reserve, and look the cache up at the same time (``lookup_key`` empty: no
        lookup)."""
        reserve = reserve_request(key, request, meta.request_id, budget)
        entitled = await self.tenancy.fill(
            reserve, key, end_user=options.end_user or request.user, priority=options.priority
        )
        if not lookup_key:
            return await self.reserve(reserve, entitled.limiter_failure), None
        lookup_task = asyncio.create_task(
            self.cache.lookup(lookup_key, meta.request_id, semantic.text, semantic.scope)
        )
        try:
            reservation = await self.reserve(reserve, entitled.limiter_failure)
        except BaseException:
            lookup_task.cancel()
            raise
        found = await lookup_task
        meta.cache, meta.cache_ms = found.status, found.elapsed_ms
        if found.status == "error":
            # The cache did not answer within its budget: the request goes on without it.
            meta.cache, meta.cache_reason = "bypass", "unavailable"
        meta.cache_similarity = found.similarity
        return reservation, found.answer

    async def _answer_from_cache(
        self,
        *,
        key: keys_pb2.ApiKeyRecord,
        request: chat_pb2.ChatRequest,
        meta: RequestMeta,
        reservation: limiter_pb2.ReserveResponse,
        cached: inference_pb2.Final,
        headers: dict[str, str],
        dialect: Dialect,
        labels: tuple[str, tuple[str, ...]],
    ) -> Answer:
        await self._record_saving(
            key=key,
            request=request,
            request_id=meta.request_id,
            meta=meta,
            reservation=reservation,
            cached=cached,
            labels=labels,
        )
        if not request.stream:
            self._check_confidence(meta, cached, headers)
            return Answer(headers=headers, body=dialect.body(meta, cached, cache_hit=True))
        renderer = dialect.stream(meta, include_usage=request.include_usage)
        payload = renderer.replay(cached, final_sluice(meta, cached, cache_hit=True))

        async def replay() -> AsyncIterator[bytes]:
            yield payload

        return Answer.sse(replay(), headers)

    async def _record_saving(
        self,
        *,
        key: keys_pb2.ApiKeyRecord,
        request: chat_pb2.ChatRequest,
        request_id: str,
        meta: RequestMeta,
        reservation: limiter_pb2.ReserveResponse,
        cached: inference_pb2.Final,
        labels: tuple[str, tuple[str, ...]],
    ) -> None:
        """The usage event of an answer this request did not pay for (a cache hit, or a
        coalesced follower): its tokens, no cost, and what it saved."""
        event = cost_pb2.UsageEvent(
            request_id=request_id,
            key_id=key.key_id,
            team_id=key.team_id,
            model_requested=request.model,
            model_served=cached.model_served,
            provider=cached.provider,
            usage=cached.usage,
            occurred_unix_nanos=time.time_ns(),
            reservation_id=reservation.reservation_id,
            cache_hit=True,
            outcome="completed",
            trace_id=meta.trace_id,
            end_user=labels[0],
            tags=labels[1],
            route=meta.route,
            route_rule=meta.route_rule,
        )
        # What the answer cost when it was made is what this hit saved: exact when the
        # entry carries it (an entry cached before it did leaves the field unset, and
        # the cost-tracker prices the answer's usage instead).
        if cached.cost_usd_nanos or not cached.cost_usd:
            event.cache_saved_usd_nanos = cached.cost_usd_nanos
        try:
            await self.queue.publish_usage(event)
        except SluiceError:
            # The answer is already paid for; only the reservation must not leak.
            self.limiter.release(reservation.reservation_id, key.key_id, request_id)

    async def _follow(
        self,
        leader: str,
        *,
        key: keys_pb2.ApiKeyRecord,
        request: chat_pb2.ChatRequest,
        meta: RequestMeta,
        reservation: limiter_pb2.ReserveResponse,
        headers: dict[str, str],
        options: ChatOptions,
        labels: tuple[str, tuple[str, ...]],
    ) -> Answer | None:
        """This request's answer from the stream of ``leader``, an identical request of
        the same team in flight (on any replica): its stored events, then its live ones.
        None when there is nothing to follow (the leader left before opening its
        stream, or was cancelled by its client): the request then runs on its own.

        The answer is the leader's (its request id, so ``Last-Event-ID`` resumes it);
        this request's usage event records the tokens at no cost and the saving."""
        own_id = meta.request_id
        deadline = time.monotonic() + self.settings.request_timeout_seconds
        live = await self.streams.watch(leader)
        try:
            stored = await self.streams.stored(
                leader, wait_seconds=self.settings.resume_read_timeout_seconds
            )
            history = History.build(stored) if stored else None
            opened = history.opened if history is not None else None
            if opened is not None and opened.team_id != key.team_id:
                await live.close()
                return None
            events = [
                e
                for e in (history.events if history is not None else ())
                if e.WhichOneof("body") in ("delta", "final", "failure")
            ]
            reader = self.relay.reader(
                leader, live, deadline, last_sequence=history.last_sequence if history else 0
            )
            first = None
            if not events:
                first = await reader.next(self.settings.coalesce_open_wait_seconds)
                if first is None and await self.streams.last_event(leader) is None:
                    # Claimed, never opened: its gateway is gone.
                    await live.close()
                    return None
        except BaseException:
            await live.close()
            raise
        terminal = next((e for e in events if e.WhichOneof("body") != "delta"), first)
        cancelled = (
            terminal is not None
            and terminal.HasField("failure")
            and terminal.failure.problem.code == ErrorCode.CANCELLED
        )
        if cancelled:
            await live.close()
            return None
        meta.request_id = leader
        meta.cache = "coalesced"
        headers["x-sluice-cache"] = "coalesced"
        headers["x-sluice-coalesced-with"] = leader
        if meta.notes is not None:
            meta.notes.details["coalesced_with"] = leader

        async def saving(final: inference_pb2.Final | None) -> None:
            if final is None:
                self.limiter.release(reservation.reservation_id, key.key_id, own_id)
                return
            await self._record_saving(
                key=key,
                request=request,
                request_id=own_id,
                meta=meta,
                reservation=reservation,
                cached=final,
                labels=labels,
            )

        if not request.stream:
            try:
                if terminal is None:
                    final = await self._wait_final(reader, meta, headers)
                elif terminal.HasField("failure"):
                    raise failure_error(terminal.failure, headers)
                else:
                    final = terminal.final
            except BaseException:
                await saving(None)
                raise
            finally:
                await live.close()
            await saving(final)
            self._check_confidence(meta, final, headers)
            return Answer(headers=headers, body=options.dialect.body(meta, final, cache_hit=True))

        renderer = options.dialect.stream(meta, include_usage=request.include_usage)
        if first is not None and first.HasField("failure"):
            await live.close()
            await saving(None)
            raise failure_error(first.failure, headers)
        prelude: list[bytes] = []
        for event in events:
            if event.HasField("delta"):
                meta.tally.add_delta(event.delta)
                prelude.append(renderer.delta(event.sequence, event.delta))
            else:
                prelude.append(
                    self.relay.ending(
                        renderer, meta, event, options.instance, options.dialect.error
                    )
                )
        if events and events[-1].WhichOneof("body") != "delta":
            await live.close()
            body = b"".join(prelude)

            async def finished() -> AsyncIterator[bytes]:
                try:
                    yield body
                finally:
                    await saving(meta.answered)

            return Answer.sse(finished(), headers)
        stream = self.relay.relay(
            reader=reader,
            relay=renderer,
            meta=meta,
            first=first,
            instance=options.instance,
            prelude=b"".join(prelude),
            wait_first=first is None,
            render_error=options.dialect.error,
        )

        async def following() -> AsyncIterator[bytes]:
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                await saving(meta.answered)

        return Answer.sse(following(), headers)

    async def _run(
        self,
        key: keys_pb2.ApiKeyRecord,
        work: inference_pb2.InferenceWork,
        meta: RequestMeta,
        headers: dict[str, str],
        options: ChatOptions,
        *,
        limit_headers: Callable[[], dict[str, str]],
    ) -> Answer:
        request = work.request
        # The worker reports the route's deadline itself (model_timeout, with what it
        # tried); the gateway waits a little longer so that its report arrives.
        timeout = min(
            self.settings.request_timeout_seconds,
            (work.deadline_unix_nanos - work.enqueued_unix_nanos) / 1e9
            + ROUTE_DEADLINE_GRACE_SECONDS,
        )
        deadline = time.monotonic() + timeout
        meta.deadline_ms = int(timeout * 1000)
        opened = opened_event(
            meta.request_id,
            key,
            request,
            meta.created,
            checks=meta.checks.to_proto(),
            dialect=options.dialect.name,
            prompt_tokens=meta.prompt_tokens,
        )
        try:
            live = await self.streams.open(opened)
        except SluiceError:
            self.limiter.release(work.reservation_id, key.key_id, meta.request_id)
            raise
        try:
            await self.queue.enqueue(work, options.priority)
        except BaseException:
            await live.close()
            self.limiter.release(work.reservation_id, key.key_id, meta.request_id)
            raise
        headers.update(limit_headers())

        reader = self.relay.reader(meta.request_id, live, deadline)
        if not request.stream:
            try:
                final = await self._wait_final(reader, meta, headers)
            except asyncio.CancelledError:
                # The client went away while waiting for the whole answer.
                if options.on_disconnect is DisconnectPolicy.CANCEL:
                    await self.streams.cancel(meta.request_id, "client_disconnected")
                raise
            finally:
                await live.close()
            verdict = judge(meta, final)
            if verdict.has(IssueType.SCHEMA_VIOLATION) and meta.checks.repair:
                final = await self._repair(key, work, meta, options, final)
            self._check_confidence(meta, final, headers)
            body = options.dialect.body(meta, final, cache_hit=False)
            return Answer(headers=headers, body=body)

        # Hold the status line until the first event so that a request failing before any
        # token gets a real HTTP error, not a 200 with an error event.
        try:
            first = await reader.next(self.settings.sse_heartbeat_seconds)
        except DeadlineExceeded:
            await live.close()
            raise timeout_error(headers, meta.elapsed_ms(), meta.deadline_ms) from None
        except BaseException:
            await live.close()
            if options.on_disconnect is DisconnectPolicy.CANCEL:
                await self.streams.cancel(meta.request_id, "client_disconnected")
            raise
        if first is not None and first.HasField("failure"):
            await live.close()
            raise failure_error(first.failure, headers)
        if first is not None and first.HasField("delta"):
            if first.delta.deployment:
                headers[DEPLOYMENT_HEADER] = first.delta.deployment
            if first.delta.degraded:
                headers[STATUS_HEADER] = "degraded"
        renderer = options.dialect.stream(meta, include_usage=request.include_usage)
        stream = self.relay.relay(
            reader=reader,
            relay=renderer,
            meta=meta,
            first=first,
            instance=options.instance,
            on_disconnect=options.on_disconnect,
            render_error=options.dialect.error,
        )
        return Answer.sse(stream, headers)

    @staticmethod
    def _check_confidence(
        meta: RequestMeta, final: inference_pb2.Final, headers: dict[str, str]
    ) -> None:
        """422 when the answer is below the caller's minimum confidence."""
        verdict = meta.verdict or judge(meta, final)
        if verdict.insufficient:
            # The answer was made and is billed: the audit record says what it cost.
            final_sluice(meta, final, cache_hit=False)
            raise insufficient_confidence(verdict, meta.checks, headers)

    async def _repair(
        self,
        key: keys_pb2.ApiKeyRecord,
        work: inference_pb2.InferenceWork,
        meta: RequestMeta,
        options: ChatOptions,
        final: inference_pb2.Final,
    ) -> inference_pb2.Final:
        """One repair of an answer that breaks the request's JSON schema: a second call
        (request id ``<id>-repair``, admitted, queued and billed like any other) with
        the answer and what is wrong with it. Returns the repaired answer, its usage and
        cost added to the first's; the first answer when the repair could not run."""
        choice = next((c for c in final.choices if c.index == 0), None)
        if choice is None:
            return final
        problems = schema_problems(meta.checks.schema_json, choice.content)
        request = repair_request(work.request, choice.content, problems)
        repair_id = f"{meta.request_id}-repair"
        meta.repair = {"attempted": True, "request_id": repair_id, "succeeded": False}
        try:
            budget = self.budget(request)
            reserve = reserve_request(key, request, repair_id, budget)
            await self.tenancy.fill(reserve, key, end_user=work.end_user, priority=options.priority)
            reservation = await self.limiter.reserve(reserve)
        except SluiceError as err:
            # Out of quota or context for the second call: the first answer stands.
            meta.repair["error"] = str(err.code)
            return final
        repair_work = build_work(
            request_id=repair_id,
            key=key,
            request=request,
            priority=options.priority,
            reservation_id=reservation.reservation_id,
            timeout_seconds=self.settings.request_timeout_seconds,
            end_user=work.end_user,
            tags=tuple(work.tags),
        )
        # The repair goes where the answer came from: the same route and rule.
        repair_work.route, repair_work.route_rule = work.route, work.route_rule
        deadline = time.monotonic() + self.settings.request_timeout_seconds
        try:
            live = await self.streams.open(
                opened_event(repair_id, key, request, meta.created, dialect=options.dialect.name)
            )
        except SluiceError as err:
            self.limiter.release(reservation.reservation_id, key.key_id, repair_id)
            meta.repair["error"] = str(err.code)
            return final
        try:
            await self.queue.enqueue(repair_work, options.priority)
            reader = self.relay.reader(repair_id, live, deadline)
            repaired = await self._wait_final(reader, meta, {})
        except SluiceError as err:
            meta.repair["error"] = str(err.code)
            return final
        finally:
            await live.close()
        combined = inference_pb2.Final()
        combined.CopyFrom(repaired)
        for name in ("input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens"):
            total = getattr(final.usage, name) + getattr(repaired.usage, name)
            setattr(combined.usage, name, total)
        combined.cost_usd_nanos = final.cost_usd_nanos + repaired.cost_usd_nanos
        combined.cost_usd = final.cost_usd + repaired.cost_usd
        meta.tally = AnswerTally()
        verdict = judge(meta, combined)
        meta.repair["succeeded"] = not verdict.has(IssueType.SCHEMA_VIOLATION)
        return combined

    async def _wait_final(
        self, reader: EventReader, meta: RequestMeta, headers: dict[str, str]
    ) -> inference_pb2.Final:
        while True:
            try:
                # Quiet for a heartbeat's time: the reader looks in the store, then waits on.
                event = await reader.next(self.settings.sse_heartbeat_seconds)
            except DeadlineExceeded:
                raise timeout_error(headers, meta.elapsed_ms(), meta.deadline_ms) from None
            finally:
                self.relay.count_backfilled(reader)
            if event is None:
                continue
            if event.HasField("final"):
                final = event.final
                if final.deployment:
                    headers[DEPLOYMENT_HEADER] = final.deployment
                if final.degraded_reason:
                    headers[STATUS_HEADER] = "degraded"
                return final
            if event.HasField("failure"):
                raise failure_error(event.failure, headers)


async def _then(
    stream: AsyncIterator[bytes], done: Callable[[], Awaitable[None]]
) -> AsyncIterator[bytes]:
    """``stream``, then ``done`` (also when the client leaves early)."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        await done()
