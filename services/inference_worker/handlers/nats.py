"""Pulling work from SLUICE_INFER: one durable pull consumer per priority class, bounded
concurrency, and a scheduling policy (``domain/scheduling.py``) that decides which class
a free slot asks next. Also the cancel subscription (``sluice.v1.cancel.>``).

Each class keeps at most one pull request (batch 1) open at the server, and a pull only
opens on a free slot (open pulls count as taken), so the worker never holds more
messages than it can start; the rest stay available to other workers. With slack, every
class long-polls, and a long-poll answers as soon as a message is published: the pickup
latency is one server delivery. Near saturation a free slot goes to the highest class
with a backlog (found with probes the server answers at once), except that interactive
and batch each get a minimum share of the slots while they have a backlog
(``WorkerSettings.interactive_share``, ``batch_share``), so a saturated worker prefers
system over interactive over batch without starving any of them. scheduling.py explains
the rules and the trade-off. The pulls are raw requests (``Bus.request_next``) answered
on an inbox subscription per class: nats-py's ``fetch`` waits for its answer, and here a
pull stays open while the worker does other things.

Queue depth per class is the observable gauge ``sluice.jetstream.pending``
(``sluice_jetstream_pending`` in Prometheus) with attributes ``consumer``
(``worker-<class>``) and ``priority``: messages not yet delivered to any worker,
refreshed from JetStream every ``pending_poll_seconds`` and from every pull's answer.

Each message: CONSUMER span continued from its headers, progress acks while the work
runs, ack after every event about it is published, nak when the worker shuts down
before finishing (another worker restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode
from sluice import telemetry
from sluice.bus import Bus, PullStatus
from sluice.inference.v1 import inference_pb2
from sluice.topology import Consumers, ConsumerSpec, PriorityClass, Subjects

from services.inference_worker.domain.engine import InferenceEngine
from services.inference_worker.domain.scheduling import PRIORITY_ORDER, ClassScheduler
from services.inference_worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class _Pull:
    """The connection side of one class's pull requests (whether one is open, and the
    rest of the policy state, lives in the scheduler)."""

    def __init__(self, spec: ConsumerSpec) -> None:
        self.spec = spec
        self.opened_at = 0.0
        self.inbox = ""
        self.sub: Subscription | None = None


class WorkConsumer:
    def __init__(self, bus: Bus, engine: InferenceEngine, settings: WorkerSettings) -> None:
        self.bus = bus
        self.engine = engine
        self.settings = settings
        self.concurrency = max(1, settings.concurrency)
        self.pulls = {cls: _Pull(Consumers.WORKER[cls]) for cls in PRIORITY_ORDER}
        self.scheduler = ClassScheduler(
            shares={
                PriorityClass.INTERACTIVE: settings.interactive_share,
                PriorityClass.BATCH: settings.batch_share,
            },
            long_poll_seconds=settings.long_poll_seconds,
            short_poll_seconds=settings.short_poll_seconds,
            max_batch=settings.pull_batch,
            reserved=(
                settings.reserved_slots
                if settings.reserved_slots is not None
                else self.concurrency // 16
            ),
        )
        self.tasks: set[asyncio.Task[None]] = set()
        # Messages being worked on, with when their claim was last renewed: one keeper
        # renews them all (a task per message cost a create and a cancel per request).
        # (nats-py's Msg is not hashable: keyed by identity.)
        self.claims: dict[int, tuple[Msg, float]] = {}
        self._keeper: asyncio.Task[None] | None = None
        self.pending: dict[str, int] = {}
        self.stopping = False
        self.processed = 0
        self._wake = asyncio.Event()
        # Set whenever no pull is open (during shutdown: nothing can arrive any more).
        self._pulls_closed = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._cancel_sub: Subscription | None = None
        self._tracer = trace.get_tracer("sluice.inference_worker")
        self._gauge = metrics.get_meter("sluice").create_observable_gauge(
            "sluice.jetstream.pending",
            callbacks=[self._observe_pending],
            unit="{message}",
            description="Messages waiting in a JetStream consumer (work queue depth)",
        )

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        for cls, pull in self.pulls.items():
            await self.bus.ensure_consumer(pull.spec)
            pull.inbox = self.bus.new_inbox()
            pull.sub = await self.bus.subscribe(pull.inbox, self._callback(cls))
        await self._refresh_pending()
        self._dispatcher = asyncio.create_task(self._dispatch(), name="worker-dispatch")
        self._poller = asyncio.create_task(self._poll_pending(), name="worker-pending")
        self._keeper = asyncio.create_task(self._keep_claims(), name="worker-claims")
        # Every worker hears every cancel (no queue group): the one running the request
        # stops it, the others remember it in case the work is still queued.
        self._cancel_sub = await self.bus.subscribe(Subjects.CANCEL_ALL, self._on_cancel)

    async def _on_cancel(self, msg: Msg) -> None:
        request_id = msg.subject.rsplit(".", 1)[-1]
        if self.engine.cancel(request_id):
            log.info("request %s cancelled (%s)", request_id, msg.data.decode(errors="replace"))

    async def stop(self, grace: float) -> None:
        """Stop pulling, let in-flight work finish within ``grace`` seconds, nak the rest."""
        self.stopping = True
        deadline = time.monotonic() + grace
        for task in (self._dispatcher, self._poller, self._keeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.tasks:
            log.info("waiting for %d in-flight requests", len(self.tasks))
            await asyncio.wait(set(self.tasks), timeout=max(0.0, deadline - time.monotonic()))
        unfinished = list(self.tasks)
        for task in unfinished:
            task.cancel()  # the handler naks its message
        if unfinished:
            log.warning("handing back %d unfinished requests", len(unfinished))
            await asyncio.gather(*unfinished, return_exceptions=True)
        # Open pulls can still deliver a message (naked on arrival while stopping); wait
        # for them to expire so nothing sits claimed by a process about to exit.
        if self.scheduler.open_count():
            self._pulls_closed.clear()
            limit = min(deadline - time.monotonic(), self.settings.long_poll_seconds + 0.5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pulls_closed.wait(), timeout=max(0.0, limit))
        for pull in self.pulls.values():
            if pull.sub is not None:
                await self.bus.unsubscribe(pull.sub)
        if self._cancel_sub is not None:
            await self.bus.unsubscribe(self._cancel_sub)

    # --- pulling --------------------------------------------------------------------

    def _credits(self) -> int:
        return self.concurrency - len(self.tasks) - self.scheduler.open_count()

    async def _dispatch(self) -> None:
        stale_after = self.settings.long_poll_seconds + 2.0
        while not self.stopping:
            self._wake.clear()
            now = time.monotonic()
            for cls, pull in self.pulls.items():
                if self.scheduler.is_open(cls) and now - pull.opened_at > stale_after:
                    # Its answer was lost (a reconnect): the server forgot it too.
                    self.scheduler.lost(cls)
            for poll in self.scheduler.plan(self._credits(), now):
                pull = self.pulls[poll.cls]
                pull.opened_at = now
                try:
                    # A probe is answered at once; a poll is held open up to its expiry.
                    await self.bus.request_next(
                        pull.spec,
                        pull.inbox,
                        batch=1 if poll.probe else poll.batch,
                        expires=None if poll.probe else poll.expires,
                    )
                except Exception:
                    self.scheduler.lost(poll.cls)
                    log.warning("pull request for %s failed", pull.spec.durable, exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)

    def _callback(self, cls: PriorityClass) -> Callable[[Msg], Awaitable[None]]:
        durable = self.pulls[cls].spec.durable

        async def on_message(msg: Msg) -> None:
            status = Bus.pull_status(msg)
            if status is not None:
                if status is not PullStatus.HEARTBEAT:
                    # No messages, expired, or limits: this pull is over.
                    if status is PullStatus.EMPTY:
                        self.pending[durable] = 0
                    self.scheduler.answered(cls, message=False, now=time.monotonic())
                    self._closed()
                return
            self.scheduler.answered(cls, message=True, now=time.monotonic())
            self._closed()
            with contextlib.suppress(Exception):
                # Fresher than the periodic consumer_info: what is left behind this one.
                self.pending[durable] = int(msg.metadata.num_pending or 0)
            if self.stopping:
                await msg.nak()
                self._wake.set()
                return
            task = asyncio.create_task(self._handle(msg, cls))
            self.tasks.add(task)
            task.add_done_callback(self._done)
            self._wake.set()

        return on_message

    def _closed(self) -> None:
        self._wake.set()
        if not self.scheduler.open_count():
            self._pulls_closed.set()

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.scheduler.slot_freed()
        self._wake.set()

    # --- one message ----------------------------------------------------------------

    async def _handle(self, msg: Msg, cls: PriorityClass) -> None:
        work = inference_pb2.InferenceWork()
        try:
            work.ParseFromString(msg.data)
        except DecodeError:
            log.error("undecodable work message on %s; terminating it", msg.subject)
            await msg.term()
            return
        delivery = msg.metadata.num_delivered or 1
        subject = Subjects.infer(cls)
        self.claims[id(msg)] = (msg, time.monotonic())
        finished = False
        with self._tracer.start_as_current_span(
            f"{subject} process",
            context=telemetry.extract(msg.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                **telemetry.messaging_attributes(subject, "process"),
                "messaging.message.id": work.request_id,
                "sluice.request_id": work.request_id,
                "sluice.delivery": delivery,
            },
        ) as span:
            try:
                await self.engine.process(work, priority=str(cls), delivery=delivery)
                finished = True
            except asyncio.CancelledError:
                span.set_status(Status(StatusCode.ERROR, "worker stopping"))
                raise
            except Exception as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                log.exception("request %s could not be processed", work.request_id)
            finally:
                self.claims.pop(id(msg), None)
                if finished:
                    await msg.ack()
                    self.processed += 1
                else:
                    # Shutdown or a transport failure: hand the work to another worker.
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=None if self.stopping else 1.0)

    async def _keep_claims(self) -> None:
        """Renews the claim of every message held longer than the interval, so that
        JetStream does not redeliver work that is still running (its ack wait is longer
        than the interval; a claim is renewed between one and one and a half intervals
        after the last)."""
        interval = self.settings.in_progress_interval_seconds
        while True:
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            for key, (msg, renewed) in list(self.claims.items()):
                if now - renewed < interval or key not in self.claims:
                    continue
                self.claims[key] = (msg, now)
                try:
                    await msg.in_progress()
                except Exception:
                    log.warning("in-progress ack failed", exc_info=True)

    # --- queue depth ----------------------------------------------------------------

    async def _refresh_pending(self) -> None:
        for pull in self.pulls.values():
            try:
                self.pending[pull.spec.durable] = await self.bus.consumer_pending(pull.spec)
            except Exception:
                log.debug("consumer info of %s failed", pull.spec.durable, exc_info=True)

    async def _poll_pending(self) -> None:
        while True:
            await asyncio.sleep(self.settings.pending_poll_seconds)
            await self._refresh_pending()

    def _observe_pending(self, _options: CallbackOptions) -> Iterable[Observation]:
        # Reads the cached figures: a metrics scrape never waits on JetStream.
        return [
            Observation(
                self.pending[pull.spec.durable],
                {"consumer": pull.spec.durable, "priority": str(cls)},
            )
            for cls, pull in self.pulls.items()
            if pull.spec.durable in self.pending
        ]
