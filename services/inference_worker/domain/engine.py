"""The worker's domain logic: one work item from pickup to its last event.

Resolve the model, walk its chain (the model, then its fallbacks), retry each provider
on retryable errors that happen before any output reached the client, relay deltas,
then report exactly one ``Final`` or ``Failure``, the usage event (billing and the
limiter's reconciliation) and, for a cacheable answer, a cache store. Messaging is
behind ``EventSink`` and providers behind ``Providers``: this module imports neither
NATS, gRPC nor an HTTP client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from sluice import telemetry, tokens
from sluice.cache.v1 import cache_pb2
from sluice.catalog import (
    LAST_RESORT_CACHE,
    LAST_RESORT_TEMPLATE,
    Catalog,
    Deployment,
    ModelConfig,
)
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.deltas import can_join, join, mergeable
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2, lifecycle_pb2
from sluice.metrics import Instruments
from sluice.pricing import NANOS_PER_USD, PriceTable
from sluice.replay import History
from sluice.topology import ServiceName, Subjects

from services.inference_worker.domain.balance import Balancer
from services.inference_worker.domain.circuit import CircuitRegistry, TripReason
from services.inference_worker.domain.resume import (
    CancelRegistry,
    Takeover,
    can_continue,
    continuation,
    whole_usage,
)
from services.inference_worker.domain.upstream import (
    ChoiceAssembler,
    Providers,
    UpstreamAnswer,
    UpstreamFailure,
)

log = logging.getLogger(__name__)

SERVICE = str(ServiceName.INFERENCE_WORKER)

# What a last-resort answer tells the client it is (sluice.errors[] "degraded"): safe to
# show, naming neither deployments nor upstream errors.
DEGRADED_REASONS = {
    LAST_RESORT_CACHE: "Every deployment of the model failed; this is a stored answer to the "
    "same request.",
    LAST_RESORT_TEMPLATE: "Every deployment of the model failed; this is the route's "
    "configured fallback answer, not the model's.",
}


class Outcome(StrEnum):
    COMPLETED = "completed"
    # Every deployment failed; the route's last resort (a cached or template answer) served.
    DEGRADED = "degraded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"


class EventSink(Protocol):
    """Where a work item's results go (NATS in the service, lists in unit tests)."""

    async def stream_event(self, subject: str, event: inference_pb2.StreamEvent) -> None: ...

    async def usage(self, event: cost_pb2.UsageEvent) -> None:
        """Durably record usage (awaits the store's acknowledgement)."""
        ...

    async def cache_store(self, store: cache_pb2.StoreRequest) -> None: ...

    async def lifecycle(self, event: lifecycle_pb2.LifecycleEvent) -> None:
        """Durably record a request's lifecycle (started per delivery, finished once)."""
        ...

    async def history(self, request_id: str) -> History | None:
        """What ``SLUICE_STREAMS`` already holds for the request (for a takeover)."""
        ...

    async def cached_answer(self, cache_key: str, request_id: str) -> inference_pb2.Final | None:
        """The exact cache's stored answer under ``cache_key`` (None: none, or the cache
        did not answer in time): a route's last resort."""
        ...


class RetryPolicy(Protocol):
    """Retries of one provider before its fallbacks (``WorkerSettings.retry``)."""

    @property
    def attempts(self) -> int:
        """Calls per model, the first included."""

    @property
    def base_delay_ms(self) -> int: ...

    @property
    def max_delay_ms(self) -> int: ...

    @property
    def retry_after_cap_ms(self) -> int:
        """A provider's Retry-After is honoured up to this; longer waits go to the fallback."""


@dataclass(frozen=True)
class _Target:
    """One deployment as a route uses it: ``served`` is the model name the answer is
    reported (and priced) under: the route's, or a legacy fallback model's."""

    route: ModelConfig
    served: str
    deployment: Deployment


@dataclass
class _Request:
    """Per-work-item state shared by the attempts."""

    work: inference_pb2.InferenceWork
    subject: str
    picked_up: float
    queue_wait_us: int
    deadline: float | None
    sequence: int = 0
    delivery: int = 1
    # Set when this delivery continues a partial answer published by a dead worker.
    takeover: Takeover | None = None
    # What this delivery relayed (partial usage of a cancel) and where it got to.
    relayed: ChoiceAssembler = field(default_factory=ChoiceAssembler)
    # The route served, and the deployment of the last call.
    route: ModelConfig | None = None
    target: _Target | None = None
    called: bool = False
    # Provider calls made, when the first failed, and what retries may have cost.
    attempts: int = 0
    first_failure_at: float | None = None
    retry_spend_nanos: int = 0
    # Seconds from arrival to the deadline when the route's deadline is the binding one.
    deadline_budget_s: float | None = None
    # Cancel requested (and honoured); finishing: the terminal event is being published.
    cancelled: bool = False
    finishing: bool = False
    # A spend ceiling (a key that cuts on a spent budget): the prompt's tokens and the
    # output tokens relayed so far, counted as they leave, and whether it was passed.
    prompt_tokens: int = 0
    output_tokens: int = 0
    cut: bool = False
    # The output tokens the ceiling leaves room for at the prices of ``allowance_for``,
    # the model being called (None: output is free there).
    output_allowance: int | None = None
    allowance_for: str | None = None
    # The task serving this delivery (what a cut cancels).
    task: asyncio.Task[Outcome] | None = None


class _DeltaRelay:
    """Publishes one request's deltas as stream events, joining those that arrive
    together.

    A provider that sends several tokens in one network read (a fast model, a burst after
    a pause) hands them over one after another without the event loop running in
    between. Text deltas behind a held one are appended to it, and the held delta leaves
    when the loop next runs (``call_soon``: no timer, so no token waits for one). That is
    one NATS message, one record in ``SLUICE_STREAMS`` and one parse in the gateway per
    read instead of per token; tokens that arrive apart still leave one by one. The
    first delta is never held, so the time to first token does not change, and
    ``flush`` publishes what is held before any terminal event."""

    def __init__(
        self, req: _Request, sink: EventSink, over_ceiling: Callable[[_Request], bool] | None = None
    ) -> None:
        self._req = req
        self._sink = sink
        self._held: inference_pb2.Delta | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        # Set for a request with a spend ceiling: checked after each delta leaves.
        self._over_ceiling = over_ceiling

    async def __call__(self, delta: inference_pb2.Delta) -> None:
        held = self._held
        if held is not None:
            if can_join(held, delta):
                join(held, delta)
                return
            await self.flush()
        if self._req.sequence > 0 and mergeable(delta):
            # A copy: the provider keeps the delta it handed over.
            self._held = inference_pb2.Delta()
            self._held.CopyFrom(delta)
            asyncio.get_running_loop().call_soon(self._flush_soon)
            return
        await self._publish(delta)
        if self._req.sequence == 1:
            # A publish is written when the loop next runs the client's flusher; a
            # provider that sends a burst would otherwise hold the first token back
            # until the whole burst is relayed.
            await asyncio.sleep(0)

    def _flush_soon(self) -> None:
        if self._held is None:
            return
        task = asyncio.create_task(self.flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            await self._publish(held)

    async def _publish(self, delta: inference_pb2.Delta) -> None:
        req = self._req
        if req.sequence == 0 and req.target is not None:
            # A copy: the provider keeps the delta it handed over.
            first = inference_pb2.Delta()
            first.CopyFrom(delta)
            first.deployment = req.target.deployment.name
            delta = first
        req.relayed.add(delta)
        req.sequence += 1
        await self._sink.stream_event(
            req.subject,
            inference_pb2.StreamEvent(
                request_id=req.work.request_id, sequence=req.sequence, delta=delta
            ),
        )
        if self._over_ceiling is not None and not req.cut:
            req.output_tokens += tokens.count_text(delta.content) if delta.content else 0
            if self._over_ceiling(req):
                # The budget ran out mid-answer: stop the upstream call as a cancel does;
                # ``process`` ends the request with budget_exceeded and its partial usage.
                req.cut = req.cancelled = True
                if req.task is not None:
                    req.task.cancel()


class InferenceEngine:
    def __init__(
        self,
        *,
        catalog: Catalog,
        prices: PriceTable,
        pool: Providers,
        circuits: CircuitRegistry,
        retry: RetryPolicy,
        max_deliveries: int,
        sink: EventSink,
        instruments: Instruments,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        worker_id: str = "",
        balancer: Balancer | None = None,
    ) -> None:
        self.catalog = catalog
        self.balancer = balancer or Balancer(circuits)
        self.prices = prices
        self.pool = pool
        self.circuits = circuits
        self.retry = retry
        self.max_deliveries = max_deliveries
        self.sink = sink
        self.metrics = instruments
        self._sleep = sleep
        self.worker_id = worker_id
        self._tracer = trace.get_tracer("sluice.inference_worker")
        # Requests in progress here, for cancel; ids cancelled recently, for work that
        # is still queued when its cancel arrives.
        self._running: dict[str, tuple[_Request, asyncio.Task[Outcome]]] = {}
        self.cancelled = CancelRegistry()

    # --- cancel ---------------------------------------------------------------------

    def cancel(self, request_id: str) -> bool:
        """Stop ``request_id``: True when it was running here and is being cancelled.

        Publishing on ``Subjects.cancel(request_id)`` is all a caller needs: every
        worker's consumer forwards it here. A request already publishing its terminal
        event is left to finish.
        """
        self.cancelled.add(request_id)
        running = self._running.get(request_id)
        if running is None:
            return False
        req, task = running
        if req.finishing or task.done():
            return False
        req.cancelled = True
        task.cancel()
        return True

    # --- entry point ----------------------------------------------------------------

    async def process(
        self, work: inference_pb2.InferenceWork, *, priority: str, delivery: int = 1
    ) -> Outcome:
        """Serve one work item; returns once every event about it is published."""
        picked_up = time.monotonic()
        now_ns = time.time_ns()
        queue_wait_us = (
            max(0, (now_ns - work.enqueued_unix_nanos) // 1000) if work.enqueued_unix_nanos else 0
        )
        self.metrics.queue_wait.record(queue_wait_us / 1e6, {"priority": priority})
        deadline = None
        if work.deadline_unix_nanos:
            deadline = picked_up + (work.deadline_unix_nanos - now_ns) / 1e9
        req = _Request(
            work=work,
            subject=work.stream_subject or Subjects.stream(work.request_id),
            picked_up=picked_up,
            queue_wait_us=queue_wait_us,
            deadline=deadline,
            delivery=delivery,
        )
        await self._started(req, priority)
        self.metrics.in_flight.add(1, {"service": SERVICE})
        # Its own task, so that a cancel stops the work (and the upstream call) without
        # cancelling the consumer's handler, which still acks.
        task = asyncio.create_task(self._process(req, delivery))
        req.task = task
        self._running[work.request_id] = (req, task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if req.cancelled and (current is None or not current.cancelling()):
                return await self._end_cancelled(req)
            raise
        finally:
            self._running.pop(work.request_id, None)
            self.metrics.in_flight.add(-1, {"service": SERVICE})

    async def _started(self, req: _Request, priority: str) -> None:
        if not req.work.lifecycle_events:
            return
        event = lifecycle_pb2.LifecycleEvent(
            request_id=req.work.request_id,
            at_unix_nanos=time.time_ns(),
            started=lifecycle_pb2.Started(
                attempt=req.delivery,
                worker=self.worker_id,
                priority=priority,
                queue_wait_us=req.queue_wait_us,
            ),
        )
        try:
            await self.sink.lifecycle(event)
        except Exception:
            # Informational: the finished event, published durably, is what counts.
            log.warning("started event for %s not recorded", req.work.request_id)

    async def _finished(
        self,
        req: _Request,
        outcome: Outcome,
        *,
        final: inference_pb2.Final | None = None,
        failure: inference_pb2.Failure | None = None,
    ) -> None:
        if not req.work.lifecycle_events:
            return
        event = lifecycle_pb2.LifecycleEvent(
            request_id=req.work.request_id,
            at_unix_nanos=time.time_ns(),
            finished=lifecycle_pb2.Finished(
                outcome=str(outcome), attempt=req.delivery, final=final, failure=failure
            ),
        )
        await self.sink.lifecycle(event)

    async def _process(self, req: _Request, delivery: int) -> Outcome:
        work = req.work
        if work.request_id in self.cancelled:
            # Cancelled while queued: never reaches a provider.
            req.cancelled = True
            return await self._end_cancelled(req)
        if delivery > 1:
            ended = await self._take_over(req)
            if ended is not None:
                return ended
        if delivery > self.max_deliveries:
            return await self._fail(
                req,
                UpstreamFailure(
                    SluiceError(
                        ErrorCode.SERVICE_UNAVAILABLE,
                        f"the work was delivered {delivery} times without completing",
                        {"deliveries": delivery},
                    )
                ),
                None,
            )
        route_name = work.route or work.request.model
        route = self.catalog.model(route_name)
        if route is None:
            return await self._fail(
                req,
                UpstreamFailure(
                    SluiceError(
                        ErrorCode.MODEL_NOT_FOUND,
                        f"unknown model {route_name!r}",
                        param="model",
                    ),
                    permanent=True,
                ),
                None,
            )
        req.route = route
        if route.deadline_seconds is not None:
            # The route's deadline counts from the request's arrival (its caller waits),
            # a batch job's from its pickup (it queues by design).
            began = req.picked_up - req.queue_wait_us / 1e6
            if work.priority == chat_pb2.PRIORITY_BATCH:
                began = req.picked_up
            route_deadline = began + route.deadline_seconds
            if req.deadline is None or route_deadline < req.deadline:
                req.deadline = route_deadline
                req.deadline_budget_s = route.deadline_seconds
        if req.deadline is not None and time.monotonic() >= req.deadline:
            return await self._fail(req, self._deadline_failure(req, "while queued"), None)

        last: UpstreamFailure | None = None
        last_target: _Target | None = None
        for target in self._targets(route):
            outcome, failure = await self._try_deployment(req, target)
            if outcome is not None:
                return outcome
            assert failure is not None
            last, last_target = failure, target
            if not failure.try_fallback or self._past_deadline(req) or _budget_spent(failure):
                return await self._exhausted(req, last, last_target)
        if last is None:
            last = UpstreamFailure(
                SluiceError(ErrorCode.UPSTREAM_UNAVAILABLE, "no deployment is available")
            )
        return await self._exhausted(req, last, last_target)

    def _targets(self, route: ModelConfig) -> list[_Target]:
        """The deployments to try, in order: each step's as balanced, a sunset one
        replaced, each once; those marked avoided (a stream of theirs broke lately)
        after all the others."""
        tried: set[str] = set()
        first: list[_Target] = []
        deferred: list[_Target] = []
        for served, step in self.catalog.chain(route):
            for deployment in self.balancer.order(step):
                live = self._live(deployment)
                if live is None or live.name in tried:
                    continue
                tried.add(live.name)
                target = _Target(route, served, live)
                (deferred if self.balancer.avoided(live) else first).append(target)
        return first + deferred

    def _deadline_failure(self, req: _Request, when: str) -> UpstreamFailure:
        """504 model_timeout: how long the request has run and what its deadline was."""
        began = req.picked_up - req.queue_wait_us / 1e6
        elapsed_ms = int((time.monotonic() - began) * 1000)
        if req.deadline_budget_s is not None:
            deadline_ms = round(req.deadline_budget_s * 1000)
        else:
            deadline_ms = round(((req.deadline or time.monotonic()) - began) * 1000)
        route = req.route.name if req.route is not None else req.work.request.model
        return UpstreamFailure(
            SluiceError(
                ErrorCode.MODEL_TIMEOUT,
                f"the deadline of model {route} ({deadline_ms} ms) passed {when}",
                {
                    "elapsed_ms": elapsed_ms,
                    "deadline_ms": deadline_ms,
                    "route": route,
                    "attempts": req.attempts,
                },
            ),
            permanent=True,
        )

    # --- when every deployment failed --------------------------------------------------

    async def _exhausted(
        self, req: _Request, last: UpstreamFailure, target: _Target | None
    ) -> Outcome:
        """No deployment answered: the deadline's 504, the client's own error, or the
        route's last resort: a stored answer for the same request, a template, or 503
        with Retry-After."""
        if self._past_deadline(req) and not last.relayed:
            return await self._fail(
                req, self._deadline_failure(req, "before any deployment answered"), target
            )
        route = req.route
        resort = route.last_resort if route is not None else None
        if resort is None or last.relayed or last.code not in _LAST_RESORT_FOR:
            return await self._fail(req, last, target)
        assert route is not None
        work = req.work
        if resort.cache and work.last_resort_cache_key:
            stored = await self.sink.cached_answer(work.last_resort_cache_key, work.request_id)
            if stored is not None and stored.choices:
                return await self._degraded(req, route, list(stored.choices), LAST_RESORT_CACHE)
        if resort.template:
            choice = chat_pb2.Choice(index=0, content=resort.template, finish_reason="stop")
            return await self._degraded(req, route, [choice], LAST_RESORT_TEMPLATE)
        retry_after_ms = int(resort.retry_after_seconds * 1000)
        return await self._fail(
            req,
            UpstreamFailure(
                SluiceError(
                    ErrorCode.UPSTREAM_UNAVAILABLE,
                    f"every deployment of model {route.name} failed",
                    {
                        "route": route.name,
                        "last_error": str(last.code),
                        "attempts": req.attempts,
                    },
                    retry_after_ms=retry_after_ms,
                ),
                usage=last.usage,
            ),
            target,
        )

    async def _degraded(
        self, req: _Request, route: ModelConfig, choices: list[chat_pb2.Choice], label: str
    ) -> Outcome:
        """A last-resort answer, marked degraded: streamed as deltas (each flagged) then a
        ``Final`` whose ``degraded_reason`` says what it is; nothing is billed, no provider
        answered."""
        work = req.work
        req.finishing = True
        self.metrics.errors.add(1, {"code": "degraded", "service": SERVICE})
        if work.request.stream:
            for choice in choices:
                req.sequence += 1
                await self.sink.stream_event(
                    req.subject,
                    inference_pb2.StreamEvent(
                        request_id=work.request_id,
                        sequence=req.sequence,
                        delta=inference_pb2.Delta(
                            choice_index=choice.index,
                            role="assistant",
                            content=choice.content,
                            tool_calls=choice.tool_calls,
                            refusal=choice.refusal,
                            finish_reason=choice.finish_reason or "stop",
                            degraded=True,
                            deployment=label if req.sequence == 1 else "",
                        ),
                    ),
                )
        final = inference_pb2.Final(
            usage=chat_pb2.Usage(),
            model_served=route.name,
            provider="",
            created_unix=int(time.time()),
            deployment=label,
            degraded_reason=DEGRADED_REASONS[label],
            attempts=req.attempts,
        )
        final.timing.queue_wait_us = req.queue_wait_us
        final.timing.worker_total_us = int((time.monotonic() - req.picked_up) * 1e6)
        whole = inference_pb2.Final()
        whole.CopyFrom(final)
        whole.choices.extend(choices)
        req.sequence += 1
        await self.sink.stream_event(
            req.subject,
            inference_pb2.StreamEvent(
                request_id=work.request_id,
                sequence=req.sequence,
                final=final if work.request.stream else whole,
            ),
        )
        await self.sink.usage(
            self._usage_event(
                req, route.name, "", chat_pb2.Usage(), Outcome.DEGRADED, deployment=label
            )
        )
        await self._finished(req, Outcome.DEGRADED, final=whole)
        log.warning("request %s answered by the last resort (%s)", work.request_id, label)
        return Outcome.DEGRADED

    def _live(self, deployment: Deployment) -> Deployment | None:
        """The deployment to call in ``deployment``'s place: itself, or after its sunset
        its replacement deployment (None: retired with none)."""
        seen = {deployment.name}
        while deployment.lifecycle.retired(datetime.now(UTC)):
            replacement = self.catalog.deployments.get(deployment.lifecycle.replacement)
            if replacement is None or replacement.name in seen:
                return None
            seen.add(replacement.name)
            deployment = replacement
        return deployment

    # --- one deployment of the chain ---------------------------------------------------

    async def _try_deployment(
        self, req: _Request, target: _Target
    ) -> tuple[Outcome | None, UpstreamFailure | None]:
        """Attempts against one deployment: (outcome, None) when finished (well or after
        output), (None, failure) when the next deployment should be tried."""
        deployment = target.deployment
        unusable = self._missing_key(deployment.provider)
        if unusable is not None:
            return None, unusable
        breaker = self.circuits.get(deployment.name, deployment.provider)
        failure: UpstreamFailure | None = None
        attempts = deployment.attempts or max(1, self.retry.attempts)
        for attempt in range(1, attempts + 1):
            if self._past_deadline(req):
                return None, self._deadline_failure(req, "before the provider answered")
            spent, cost = self._budget_check(req, target)
            if spent is not None:
                return None, spent
            if not breaker.allow():
                return None, UpstreamFailure(
                    SluiceError(
                        ErrorCode.UPSTREAM_UNAVAILABLE,
                        f"deployment {deployment.name} is failing; its circuit is open",
                        {
                            "deployment": deployment.name,
                            "provider": deployment.provider,
                            "circuit": "open",
                        },
                        retry_after_ms=max(1000, int(breaker.open_for() * 1000)),
                    )
                )
            req.retry_spend_nanos += cost
            req.attempts += 1
            try:
                answer = await self._call(req, target, attempt)
            except asyncio.CancelledError:
                # A cancelled call says nothing of the deployment; a probe it held is free.
                breaker.release()
                raise
            except UpstreamFailure as exc:
                failure = exc
                if req.first_failure_at is None:
                    req.first_failure_at = time.monotonic()
                if exc.relayed and exc.counts_against_circuit:
                    # Output reached the client: no retry can hide this any more, and
                    # the next requests try the route's other deployments first.
                    breaker.mark_interrupted()
                elif exc.latency:
                    breaker.record_failure(TripReason.LATENCY)
                elif exc.counts_against_circuit:
                    breaker.record_failure(TripReason.ERRORS)
                else:
                    breaker.record_neutral()
                if exc.relayed:
                    return await self._fail(req, exc, target), None
                if exc.latency and self._past_deadline(req):
                    return None, self._deadline_failure(req, "while a deployment was slow")
                delay = self._backoff(attempt, exc)
                if delay is None or attempt >= attempts:
                    return None, exc
                if req.deadline is not None and time.monotonic() + delay >= req.deadline:
                    return None, exc
                await self._sleep(delay)
                continue
            breaker.observe_latency(answer.ttft_s if answer.ttft_s is not None else answer.total_s)
            if _too_slow(deployment, answer, req.work.request.stream):
                breaker.record_failure(TripReason.LATENCY)
            else:
                breaker.record_success()
            return await self._complete(req, target, answer), None
        return None, failure

    def _budget_check(self, req: _Request, target: _Target) -> tuple[UpstreamFailure | None, int]:
        """A call after the first must fit the route's retry budget: started within its
        seconds of the first failure, and its cost (the prompt and the output asked for,
        at the route's prices) within its dollars with the retries before it. Returns
        the failure, or the call's cost to count once it is made."""
        route = req.route
        if req.attempts == 0 or route is None:
            return None, 0
        if route.retry_budget_seconds is not None and req.first_failure_at is not None:
            used = time.monotonic() - req.first_failure_at
            if used > route.retry_budget_seconds:
                details = {
                    "used_ms": int(used * 1000),
                    "budget_ms": int(route.retry_budget_seconds * 1000),
                }
                return _budget_failure("seconds", details), 0
        if route.retry_budget_usd is None:
            return None, 0
        request = req.work.request
        asked = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 0
        usage = chat_pb2.Usage(input_tokens=tokens.count_chat(request), output_tokens=asked)
        cost = self.prices.price(target.served, usage).total_nanos
        budget = int(route.retry_budget_usd * NANOS_PER_USD)
        if req.retry_spend_nanos + cost > budget:
            details = {
                "spent_usd_nanos": req.retry_spend_nanos,
                "next_call_usd_nanos": cost,
                "budget_usd_nanos": budget,
            }
            return _budget_failure("usd", details), 0
        return None, cost

    def _missing_key(self, provider: str) -> UpstreamFailure | None:
        """A deployment that needs a key this process was not given fails at once, by
        name: calling it would only earn a 401 (or a connect error offline), count
        against its circuit and hide the cause behind retries."""
        config = self.pool.get(provider).config
        if not config.api_key_env or config.api_key():
            return None
        return UpstreamFailure(
            SluiceError(
                ErrorCode.UPSTREAM_UNAVAILABLE,
                f"provider {provider} has no API key: {config.api_key_env} is not "
                "set where the inference worker runs",
                {"provider": provider, "cause": "no_api_key"},
            )
        )

    def _backoff(self, attempt: int, failure: UpstreamFailure) -> float | None:
        """Seconds before the next attempt, or None when retrying this provider is moot."""
        if not failure.retry_same:
            return None
        base = min(self.retry.max_delay_ms, self.retry.base_delay_ms * 2 ** (attempt - 1))
        # Equal jitter: spreads retries of a burst without ever retrying immediately.
        delay_ms = base / 2 + random.uniform(0, base / 2)
        hinted: int | None = failure.error.retry_after_ms
        if hinted:
            if hinted > self.retry.retry_after_cap_ms:
                return None
            delay_ms = max(delay_ms, hinted)
        return float(delay_ms) / 1000

    @staticmethod
    def _past_deadline(req: _Request) -> bool:
        return req.deadline is not None and time.monotonic() >= req.deadline

    async def _call(self, req: _Request, target: _Target, attempt: int) -> UpstreamAnswer:
        """One provider call inside a GenAI CLIENT span; deltas are relayed as they come.

        The deployment's bounds end the attempt: no first token within
        ``ttft_timeout_seconds`` (streams), no answer within ``timeout_seconds`` (before
        any output was relayed; a stream already reaching the client is not cut for
        slowness, only the request's deadline ends it)."""
        request = req.takeover.request if req.takeover is not None else req.work.request
        deployment = target.deployment
        if deployment.params_json:
            request = _with_params(request, deployment.params_json)
        req.target = target
        req.called = True
        provider = self.pool.get(deployment.provider)
        attrs: dict[str, str | int | float] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": deployment.provider,
            "gen_ai.request.model": deployment.upstream_model,
            "sluice.model": target.served,
            "sluice.route": target.route.name,
            "sluice.deployment": deployment.name,
            "sluice.attempt": attempt,
        }
        if request.sampling.HasField("max_tokens"):
            attrs["gen_ai.request.max_tokens"] = request.sampling.max_tokens
        if request.sampling.HasField("temperature"):
            attrs["gen_ai.request.temperature"] = request.sampling.temperature
        metric_attrs = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": deployment.provider,
            "gen_ai.request.model": deployment.upstream_model,
        }

        relay = _DeltaRelay(
            req, self.sink, self._over_ceiling if req.work.spend_ceiling_usd_nanos > 0 else None
        )
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        first_bound = deployment.timeout_seconds
        bound_kind = "total"
        if request.stream and deployment.ttft_timeout_seconds is not None:
            first_bound, bound_kind = deployment.ttft_timeout_seconds, "ttft"
        sequence_before = req.sequence
        with self._tracer.start_as_current_span(
            f"chat {deployment.upstream_model}", kind=SpanKind.CLIENT, attributes=attrs
        ) as span:
            try:
                try:
                    async with asyncio.timeout_at(
                        None if first_bound is None else loop.time() + first_bound
                    ) as bound:
                        on_delta: Callable[[inference_pb2.Delta], Awaitable[None]] | None = None
                        if request.stream:

                            async def on_delta(delta: inference_pb2.Delta) -> None:
                                if bound.when() is not None:
                                    # Output is on its way: slowness no longer cuts it.
                                    bound.reschedule(None)
                                await relay(delta)

                        try:
                            answer = await provider.chat(
                                request,
                                deployment.upstream_model,
                                on_delta=on_delta,
                                deadline=req.deadline,
                            )
                        finally:
                            # What was relayed goes out before whatever ends the request.
                            await relay.flush()
                except TimeoutError:
                    if not bound.expired():
                        raise
                    limit = first_bound or 0.0
                    what = "first token" if bound_kind == "ttft" else "answer"
                    raise UpstreamFailure(
                        SluiceError(
                            ErrorCode.UPSTREAM_TIMEOUT,
                            f"deployment {deployment.name} sent no {what} within "
                            f"its bound of {limit:g} s",
                            {
                                "deployment": deployment.name,
                                "bound": bound_kind,
                                "bound_ms": int(limit * 1000),
                            },
                        ),
                        relayed=req.sequence > sequence_before,
                        latency=True,
                    ) from None
            except UpstreamFailure as exc:
                span.set_attribute("error.type", str(exc.code))
                span.set_status(Status(StatusCode.ERROR, str(exc.code)))
                if exc.usage.output_tokens or exc.usage.input_tokens:
                    span.set_attribute("gen_ai.usage.input_tokens", exc.usage.input_tokens)
                    span.set_attribute("gen_ai.usage.output_tokens", exc.usage.output_tokens)
                self.metrics.operation_duration.record(
                    time.monotonic() - started, {**metric_attrs, "error.type": str(exc.code)}
                )
                raise
            span.set_attribute("gen_ai.response.model", answer.model or deployment.upstream_model)
            if answer.response_id:
                span.set_attribute("gen_ai.response.id", answer.response_id)
            span.set_attribute("gen_ai.response.finish_reasons", answer.finish_reasons)
            span.set_attribute("gen_ai.usage.input_tokens", answer.usage.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", answer.usage.output_tokens)
            if not answer.usage_reported:
                span.set_attribute("sluice.usage.counted_locally", True)
        self.metrics.operation_duration.record(answer.total_s, metric_attrs)
        if answer.ttft_s is not None:
            self.metrics.time_to_first_token.record(answer.ttft_s, metric_attrs)
        self.metrics.token_usage.record(
            answer.usage.input_tokens, {**metric_attrs, "gen_ai.token.type": "input"}
        )
        self.metrics.token_usage.record(
            answer.usage.output_tokens, {**metric_attrs, "gen_ai.token.type": "output"}
        )
        return answer

    # --- endings --------------------------------------------------------------------

    async def _complete(self, req: _Request, target: _Target, answer: UpstreamAnswer) -> Outcome:
        work = req.work
        req.finishing = True
        if req.takeover is not None:
            # One answer across workers: the relayed prefix and its tokens belong to it.
            answer.usage = whole_usage(req.takeover, work.request, answer.usage)
            for choice in answer.choices:
                if choice.index == 0:
                    choice.content = req.takeover.prefix + choice.content
        # In nano-USD as the ledger prices it, so that a cache hit of this answer can
        # record exactly what it saved.
        cost_nanos = self.prices.price(target.served, answer.usage).total_nanos
        final = inference_pb2.Final(
            usage=answer.usage,
            model_served=target.served,
            provider=target.deployment.provider,
            deployment=target.deployment.name,
            attempts=req.attempts,
            response_id=answer.response_id,
            created_unix=answer.created_unix,
            cost_usd=cost_nanos / NANOS_PER_USD,
            cost_usd_nanos=cost_nanos,
            system_fingerprint=answer.system_fingerprint,
        )
        if not work.request.stream:
            final.choices.extend(answer.choices)
        final.timing.queue_wait_us = req.queue_wait_us
        final.timing.upstream_ttft_us = int((answer.ttft_s or answer.total_s) * 1e6)
        final.timing.upstream_total_us = int(answer.total_s * 1e6)
        final.timing.worker_total_us = int((time.monotonic() - req.picked_up) * 1e6)
        req.sequence += 1
        await self.sink.stream_event(
            req.subject,
            inference_pb2.StreamEvent(
                request_id=work.request_id, sequence=req.sequence, final=final
            ),
        )
        # Let the answer leave before the usage event is built and published.
        await asyncio.sleep(0)
        await self.sink.usage(
            self._usage_event(
                req,
                target.served,
                target.deployment.provider,
                answer.usage,
                Outcome.COMPLETED,
                deployment=target.deployment.name,
            )
        )
        whole = inference_pb2.Final()
        whole.CopyFrom(final)
        if work.request.stream:
            whole.choices.extend(answer.choices)
        await self._finished(req, Outcome.COMPLETED, final=whole)
        if work.cache_key:
            stored = inference_pb2.Final()
            stored.CopyFrom(final)
            if work.request.stream:
                stored.choices.extend(answer.choices)
            await self.sink.cache_store(
                cache_pb2.StoreRequest(
                    cache_key=work.cache_key,
                    answer=stored,
                    ttl_seconds=work.cache_ttl_seconds,
                    semantic_text=work.semantic_text,
                    semantic_scope=work.semantic_scope,
                )
            )
        return Outcome.COMPLETED

    async def _fail(
        self,
        req: _Request,
        failure: UpstreamFailure,
        target: _Target | None,
        outcome: Outcome | None = None,
    ) -> Outcome:
        work = req.work
        req.finishing = True
        if req.takeover is not None:
            # Output of an earlier delivery reached the client: bill it, report it.
            failure.usage = whole_usage(req.takeover, work.request, failure.usage)
            failure.relayed = True
            target = target or req.target
        if outcome is None:
            outcome = Outcome.INTERRUPTED if failure.relayed else Outcome.FAILED
        self.metrics.errors.add(1, {"code": str(failure.code), "service": SERVICE})
        served = target.served if target is not None and failure.relayed else ""
        provider = target.deployment.provider if target is not None else ""
        deployment = target.deployment.name if target is not None else ""
        req.sequence += 1
        failed = inference_pb2.Failure(
            problem=failure.error.to_proto(),
            partial_usage=failure.usage,
            model_served=served,
            provider=provider,
        )
        await self.sink.stream_event(
            req.subject,
            inference_pb2.StreamEvent(
                request_id=work.request_id, sequence=req.sequence, failure=failed
            ),
        )
        # Published even with zero usage: the limiter releases the reservation on it.
        await self.sink.usage(
            self._usage_event(req, served, provider, failure.usage, outcome, deployment=deployment)
        )
        await self._finished(req, outcome, failure=failed)
        log.info("request %s failed: %s (%s)", work.request_id, failure.code, failure.error.detail)
        return outcome

    def _over_ceiling(self, req: _Request) -> bool:
        """Whether the prompt and the output relayed so far cost more than the request's
        spend ceiling, at the price table's prices for the model being called."""
        if req.target is None:
            return False
        served = req.target.served
        if req.allowance_for != served:
            # Priced once per model called (a fallback may call another): from then on a
            # delta costs a count and a comparison, not a pricing.
            if not req.prompt_tokens:
                req.prompt_tokens = tokens.count_chat(req.work.request)
            req.output_allowance = self.prices.output_tokens_within(
                served, req.prompt_tokens, req.work.spend_ceiling_usd_nanos
            )
            req.allowance_for = served
        return req.output_allowance is not None and req.output_tokens > req.output_allowance

    async def _end_cancelled(self, req: _Request) -> Outcome:
        """The terminal event of a cancelled request, billing only what was produced."""
        work = req.work
        produced = req.relayed.output_text_tokens()
        usage = chat_pb2.Usage()
        if req.called:
            # The provider read the prompt; its output so far is what the client got.
            usage.input_tokens = tokens.count_chat(work.request)
            usage.output_tokens = produced
        if req.takeover is not None:
            usage = whole_usage(req.takeover, work.request, usage)
        if req.cut:
            error = SluiceError(
                ErrorCode.BUDGET_EXCEEDED,
                "the budget ran out during the answer, which was cut there",
                {
                    "reason": "budget exhausted",
                    "output_tokens": usage.output_tokens,
                    "spend_ceiling_usd_nanos": work.spend_ceiling_usd_nanos,
                },
            )
            failure = UpstreamFailure(error, usage=usage, relayed=bool(usage.output_tokens))
            return await self._fail(req, failure, req.target, Outcome.CANCELLED)
        error = SluiceError(
            ErrorCode.CANCELLED,
            "the request was cancelled before it finished",
            {"reason": "cancel requested", "output_tokens": usage.output_tokens},
        )
        failure = UpstreamFailure(error, usage=usage, relayed=bool(usage.output_tokens))
        return await self._fail(req, failure, req.target, Outcome.CANCELLED)

    async def _take_over(self, req: _Request) -> Outcome | None:
        """On a redelivery, continue after what an earlier delivery published; returns
        an outcome when nothing is left to generate."""
        work = req.work
        history = await self.sink.history(work.request_id)
        if history is None or not history.events:
            return None
        req.sequence = history.last_sequence
        terminal = history.terminal
        if terminal is not None:
            # The answer ended; only the (deduplicated) usage and record may be missing.
            req.finishing = True
            if terminal.HasField("final"):
                final = terminal.final
                await self.sink.usage(
                    self._usage_event(
                        req, final.model_served, final.provider, final.usage, Outcome.COMPLETED
                    )
                )
                await self._finished(req, Outcome.COMPLETED, final=final)
                return Outcome.COMPLETED
            failed = terminal.failure
            outcome = Outcome.INTERRUPTED if failed.model_served else Outcome.FAILED
            if failed.problem.code == ErrorCode.CANCELLED:
                outcome = Outcome.CANCELLED
            await self.sink.usage(
                self._usage_event(
                    req, failed.model_served, failed.provider, failed.partial_usage, outcome
                )
            )
            await self._finished(req, outcome, failure=failed)
            return outcome
        if not history.deltas():
            return None
        if not can_continue(work.request, history):
            partial = chat_pb2.Usage(
                input_tokens=tokens.count_chat(work.request),
                output_tokens=sum(tokens.count_text(t) for t in history.partial_content().values()),
            )
            return await self._fail(
                req,
                UpstreamFailure(
                    SluiceError(
                        ErrorCode.UPSTREAM_STREAM_INTERRUPTED,
                        "the worker serving this request stopped mid-answer and the partial "
                        "answer cannot be continued (tool calls, refusal or several choices)",
                        {"cause": "worker_failover", "last_sequence": history.last_sequence},
                    ),
                    usage=partial,
                    relayed=True,
                    permanent=True,
                ),
                None,
            )
        req.takeover = continuation(work.request, history)
        log.info(
            "request %s taken over after sequence %d (%d output tokens already relayed)",
            work.request_id,
            req.takeover.last_sequence,
            req.takeover.prior_output_tokens,
        )
        return None

    def _usage_event(
        self,
        req: _Request,
        served: str,
        provider: str,
        usage: chat_pb2.Usage,
        outcome: Outcome,
        *,
        deployment: str = "",
    ) -> cost_pb2.UsageEvent:
        work = req.work
        return cost_pb2.UsageEvent(
            route=req.route.name if req.route is not None else work.route,
            route_rule=work.route_rule,
            deployment=deployment,
            attempts=req.attempts,
            request_id=work.request_id,
            key_id=work.key_id,
            team_id=work.team_id,
            model_requested=work.request.model,
            model_served=served,
            provider=provider,
            usage=usage,
            occurred_unix_nanos=time.time_ns(),
            reservation_id=work.reservation_id,
            cache_hit=False,
            outcome=str(outcome),
            trace_id=telemetry.trace_id_hex(),
            end_user=work.end_user,
            tags=work.tags,
        )


# Failures a last resort may stand in for (the providers', not the client's).
_LAST_RESORT_FOR = frozenset(
    {
        ErrorCode.UPSTREAM_ERROR,
        ErrorCode.UPSTREAM_UNAVAILABLE,
        ErrorCode.UPSTREAM_TIMEOUT,
        ErrorCode.UPSTREAM_RATE_LIMITED,
        ErrorCode.UPSTREAM_STREAM_INTERRUPTED,
    }
)


def _budget_spent(failure: UpstreamFailure) -> bool:
    return failure.error.details.get("cause") == "retry_budget_exhausted"


def _too_slow(deployment: Deployment, answer: UpstreamAnswer, stream: bool) -> bool:
    """A successful answer slower than the deployment's bounds (a breaker failure)."""
    ttft = deployment.ttft_timeout_seconds
    if stream and ttft is not None and answer.ttft_s is not None and answer.ttft_s > ttft:
        return True
    total = deployment.timeout_seconds
    return total is not None and answer.total_s > total


def _budget_failure(kind: str, details: dict[str, int]) -> UpstreamFailure:
    return UpstreamFailure(
        SluiceError(
            ErrorCode.UPSTREAM_UNAVAILABLE,
            f"the route's retry budget ({kind}) is spent; no further call is made",
            {"cause": "retry_budget_exhausted", "budget": kind, **details},
        ),
        permanent=True,
    )


def _with_params(request: chat_pb2.ChatRequest, params_json: str) -> chat_pb2.ChatRequest:
    """``request`` with a deployment's extra body members (they win over the client's)."""
    merged: dict[str, object] = {}
    if request.extra_json:
        try:
            loaded = json.loads(request.extra_json)
        except ValueError:
            loaded = None
        if isinstance(loaded, dict):
            merged.update(loaded)
    merged.update(json.loads(params_json))
    out = chat_pb2.ChatRequest()
    out.CopyFrom(request)
    out.extra_json = json.dumps(merged)
    return out
