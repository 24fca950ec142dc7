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
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from sluice import telemetry, tokens
from sluice.cache.v1 import cache_pb2
from sluice.catalog import Catalog, ModelConfig
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.deltas import can_join, mergeable
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2, lifecycle_pb2
from sluice.metrics import Instruments
from sluice.pricing import NANOS_PER_USD, PriceTable
from sluice.replay import History
from sluice.topology import ServiceName, Subjects

from services.inference_worker.domain.circuit import CircuitRegistry
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


class Outcome(StrEnum):
    COMPLETED = "completed"
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
    model: ModelConfig | None = None
    called: bool = False
    # Cancel requested (and honoured); finishing: the terminal event is being published.
    cancelled: bool = False
    finishing: bool = False
    # A spend ceiling (a key that cuts on a spent budget): the prompt's tokens and the
    # output tokens relayed so far, counted as they leave, and whether it was passed.
    prompt_tokens: int = 0
    output_tokens: int = 0
    cut: bool = False
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
                held.content += delta.content
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
    ) -> None:
        self.catalog = catalog
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
        if req.deadline is not None and time.monotonic() >= req.deadline:
            return await self._fail(req, _deadline_failure("while queued"), None)
        model = self.catalog.model(work.request.model)
        if model is None:
            return await self._fail(
                req,
                UpstreamFailure(
                    SluiceError(
                        ErrorCode.MODEL_NOT_FOUND,
                        f"unknown model {work.request.model!r}",
                        param="model",
                    ),
                    permanent=True,
                ),
                None,
            )

        chain = [model, *(m for name in model.fallbacks if (m := self.catalog.model(name)))]
        last: UpstreamFailure | None = None
        last_model: ModelConfig | None = None
        for candidate in chain:
            outcome, failure = await self._try_model(req, candidate)
            if outcome is not None:
                return outcome
            assert failure is not None
            last, last_model = failure, candidate
            if not failure.try_fallback or self._past_deadline(req):
                break
        if last is None:
            last = UpstreamFailure(
                SluiceError(ErrorCode.UPSTREAM_UNAVAILABLE, "no provider is available")
            )
        return await self._fail(req, last, last_model)

    # --- one model of the chain -------------------------------------------------------

    async def _try_model(
        self, req: _Request, model: ModelConfig
    ) -> tuple[Outcome | None, UpstreamFailure | None]:
        """Attempts against one model: (outcome, None) when finished (well or after
        output), (None, failure) when the next fallback should be tried."""
        unusable = self._missing_key(model)
        if unusable is not None:
            return None, unusable
        breaker = self.circuits.get(model.provider)
        failure: UpstreamFailure | None = None
        for attempt in range(1, max(1, self.retry.attempts) + 1):
            if not breaker.allow():
                return None, UpstreamFailure(
                    SluiceError(
                        ErrorCode.UPSTREAM_UNAVAILABLE,
                        f"provider {model.provider} is failing; its circuit is open",
                        {"provider": model.provider, "circuit": "open"},
                    )
                )
            if self._past_deadline(req):
                return None, _deadline_failure("before the provider answered")
            try:
                answer = await self._call(req, model, attempt)
            except UpstreamFailure as exc:
                failure = exc
                if exc.counts_against_circuit:
                    breaker.record_failure()
                else:
                    breaker.record_neutral()
                if exc.relayed:
                    # Output reached the client: no retry can hide this any more.
                    return await self._fail(req, exc, model), None
                delay = self._backoff(attempt, exc)
                if delay is None or attempt >= self.retry.attempts:
                    return None, exc
                if req.deadline is not None and time.monotonic() + delay >= req.deadline:
                    return None, exc
                await self._sleep(delay)
                continue
            breaker.record_success()
            return await self._complete(req, model, answer), None
        return None, failure

    def _missing_key(self, model: ModelConfig) -> UpstreamFailure | None:
        """A deployment that needs a key this process was not given fails at once, by
        name: calling it would only earn a 401 (or a connect error offline), count
        against its circuit and hide the cause behind retries."""
        config = self.pool.get(model.provider).config
        if not config.api_key_env or config.api_key():
            return None
        return UpstreamFailure(
            SluiceError(
                ErrorCode.UPSTREAM_UNAVAILABLE,
                f"provider {model.provider} has no API key: {config.api_key_env} is not "
                "set where the inference worker runs",
                {"provider": model.provider, "cause": "no_api_key"},
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

    async def _call(self, req: _Request, model: ModelConfig, attempt: int) -> UpstreamAnswer:
        """One provider call inside a GenAI CLIENT span; deltas are relayed as they come."""
        request = req.takeover.request if req.takeover is not None else req.work.request
        req.model = model
        req.called = True
        provider = self.pool.get(model.provider)
        attrs: dict[str, str | int | float] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": model.provider,
            "gen_ai.request.model": model.upstream_model,
            "sluice.model": model.name,
            "sluice.attempt": attempt,
        }
        if request.sampling.HasField("max_tokens"):
            attrs["gen_ai.request.max_tokens"] = request.sampling.max_tokens
        if request.sampling.HasField("temperature"):
            attrs["gen_ai.request.temperature"] = request.sampling.temperature
        metric_attrs = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": model.provider,
            "gen_ai.request.model": model.upstream_model,
        }

        relay = _DeltaRelay(
            req, self.sink, self._over_ceiling if req.work.spend_ceiling_usd_nanos > 0 else None
        )
        started = time.monotonic()
        with self._tracer.start_as_current_span(
            f"chat {model.upstream_model}", kind=SpanKind.CLIENT, attributes=attrs
        ) as span:
            try:
                try:
                    answer = await provider.chat(
                        request,
                        model.upstream_model,
                        on_delta=relay if request.stream else None,
                        deadline=req.deadline,
                    )
                finally:
                    # What was relayed goes out before whatever ends the request.
                    await relay.flush()
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
            span.set_attribute("gen_ai.response.model", answer.model or model.upstream_model)
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

    async def _complete(self, req: _Request, model: ModelConfig, answer: UpstreamAnswer) -> Outcome:
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
        cost_nanos = self.prices.price(model.name, answer.usage).total_nanos
        final = inference_pb2.Final(
            usage=answer.usage,
            model_served=model.name,
            provider=model.provider,
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
            self._usage_event(req, model.name, model.provider, answer.usage, Outcome.COMPLETED)
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
        model: ModelConfig | None,
        outcome: Outcome | None = None,
    ) -> Outcome:
        work = req.work
        req.finishing = True
        if req.takeover is not None:
            # Output of an earlier delivery reached the client: bill it, report it.
            failure.usage = whole_usage(req.takeover, work.request, failure.usage)
            failure.relayed = True
            model = model or req.model
        if outcome is None:
            outcome = Outcome.INTERRUPTED if failure.relayed else Outcome.FAILED
        self.metrics.errors.add(1, {"code": str(failure.code), "service": SERVICE})
        served = model.name if model is not None and failure.relayed else ""
        provider = model.provider if model is not None else ""
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
        await self.sink.usage(self._usage_event(req, served, provider, failure.usage, outcome))
        await self._finished(req, outcome, failure=failed)
        log.info("request %s failed: %s (%s)", work.request_id, failure.code, failure.error.detail)
        return outcome

    def _over_ceiling(self, req: _Request) -> bool:
        """Whether the prompt and the output relayed so far cost more than the request's
        spend ceiling, at the price table's prices for the model being called."""
        if req.model is None:
            return False
        if not req.prompt_tokens:
            req.prompt_tokens = tokens.count_chat(req.work.request)
        usage = chat_pb2.Usage(input_tokens=req.prompt_tokens, output_tokens=req.output_tokens)
        cost = self.prices.price(req.model.name, usage).total_nanos
        return cost > req.work.spend_ceiling_usd_nanos

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
            return await self._fail(req, failure, req.model, Outcome.CANCELLED)
        error = SluiceError(
            ErrorCode.CANCELLED,
            "the request was cancelled before it finished",
            {"reason": "cancel requested", "output_tokens": usage.output_tokens},
        )
        failure = UpstreamFailure(error, usage=usage, relayed=bool(usage.output_tokens))
        return await self._fail(req, failure, req.model, Outcome.CANCELLED)

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
        self, req: _Request, served: str, provider: str, usage: chat_pb2.Usage, outcome: Outcome
    ) -> cost_pb2.UsageEvent:
        work = req.work
        return cost_pb2.UsageEvent(
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


def _deadline_failure(when: str) -> UpstreamFailure:
    return UpstreamFailure(
        SluiceError(ErrorCode.UPSTREAM_TIMEOUT, f"the request deadline passed {when}"),
        permanent=True,
    )
