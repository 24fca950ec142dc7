"""One chat completion through the data path: check the model and count tokens, reserve
and look up the cache concurrently, then answer from the cache or queue the work and
relay the worker's stream events, in the dialect of the door it came through."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sluice import canonical
from sluice.catalog import Catalog
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.errors import SluiceError
from sluice.inference.v1 import inference_pb2
from sluice.keys.v1 import keys_pb2
from sluice.limiter.v1 import limiter_pb2
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
from services.gateway.domain.dialects.common import Dialect, RequestMeta, final_sluice
from services.gateway.domain.dialects.openai.response import OPENAI
from services.gateway.domain.exchange import Answer
from services.gateway.domain.fail_open import FailOpenAllowance
from services.gateway.domain.labels import request_labels
from services.gateway.domain.ports import Admission, CacheLookup, StreamStore, WorkQueue
from services.gateway.domain.problems import failure_error, timeout_error
from services.gateway.domain.relay.reader import DeadlineExceeded, EventReader
from services.gateway.domain.relay.sse import StreamRelay
from services.gateway.domain.tenancy.policy import check_model_allowed
from services.gateway.domain.tenancy.resolve import Tenancy
from services.gateway.domain.tenancy.tiers import LimiterFailure
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
        fail_open: FailOpenAllowance | None = None,
    ) -> None:
        self.tenancy = tenancy
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
        budget = self.budget(request)
        end_user, tags = request_labels(request, options.tags, options.end_user)
        meta.prompt_tokens = budget.prompt_tokens
        policy = cache_policy(self.settings.cache_mode, request.sampling, options.cache_control)
        cacheable = policy.lookup or policy.store
        cache_key = canonical.cache_key(request, scope=key.team_id) if cacheable else ""
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
        headers = admitted_headers(reservation, options.dialect.limit_headers)
        headers["x-sluice-cache"] = meta.cache
        if cached is not None:
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
        return await self._run(key, work, meta, headers, options)

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
        event = cost_pb2.UsageEvent(
            request_id=meta.request_id,
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
            self.limiter.release(reservation.reservation_id, key.key_id, meta.request_id)
        if not request.stream:
            return Answer(headers=headers, body=dialect.body(meta, cached, cache_hit=True))
        renderer = dialect.stream(meta, include_usage=request.include_usage)
        payload = renderer.replay(cached, final_sluice(meta, cached, cache_hit=True))

        async def replay() -> AsyncIterator[bytes]:
            yield payload

        return Answer.sse(replay(), headers)

    async def _run(
        self,
        key: keys_pb2.ApiKeyRecord,
        work: inference_pb2.InferenceWork,
        meta: RequestMeta,
        headers: dict[str, str],
        options: ChatOptions,
    ) -> Answer:
        request = work.request
        deadline = time.monotonic() + self.settings.request_timeout_seconds
        opened = opened_event(meta.request_id, key, request, meta.created)
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

        reader = self.relay.reader(meta.request_id, live, deadline)
        if not request.stream:
            try:
                body = await self._wait_final(reader, meta, headers, options.dialect)
                return Answer(headers=headers, body=body)
            except asyncio.CancelledError:
                # The client went away while waiting for the whole answer.
                if options.on_disconnect is DisconnectPolicy.CANCEL:
                    await self.streams.cancel(meta.request_id, "client_disconnected")
                raise
            finally:
                await live.close()

        # Hold the status line until the first event so that a request failing before any
        # token gets a real HTTP error, not a 200 with an error event.
        try:
            first = await reader.next(self.settings.sse_heartbeat_seconds)
        except DeadlineExceeded:
            await live.close()
            raise timeout_error(headers) from None
        except BaseException:
            await live.close()
            if options.on_disconnect is DisconnectPolicy.CANCEL:
                await self.streams.cancel(meta.request_id, "client_disconnected")
            raise
        if first is not None and first.HasField("failure"):
            await live.close()
            raise failure_error(first.failure, headers)
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

    async def _wait_final(
        self, reader: EventReader, meta: RequestMeta, headers: dict[str, str], dialect: Dialect
    ) -> bytes:
        while True:
            try:
                # Quiet for a heartbeat's time: the reader looks in the store, then waits on.
                event = await reader.next(self.settings.sse_heartbeat_seconds)
            except DeadlineExceeded:
                raise timeout_error(headers) from None
            finally:
                self.relay.count_backfilled(reader)
            if event is None:
                continue
            if event.HasField("final"):
                return dialect.body(meta, event.final, cache_hit=False)
            if event.HasField("failure"):
                raise failure_error(event.failure, headers)
