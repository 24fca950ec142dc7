"""Asynchronous jobs: a chat completion that runs on the work queue while the client
polls, streams events or waits for a webhook.

The job record (``JobRecord`` in the ``sluice_jobs`` bucket) is written at submission
and then follows the worker's lifecycle events (``SLUICE_LIFECYCLE``) through the
``JobTracker``, a durable pull consumer shared by every gateway replica: a job's status
advances whichever gateway accepted it, and after any of them restarts. Every record
change is a KV update with a revision check, so concurrent writers never lose one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
import orjson
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sluice import canonical
from sluice.bus import Bus, pull_batches
from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2, lifecycle_pb2
from sluice.jobs.v1 import jobs_pb2
from sluice.keys.v1 import keys_pb2
from sluice.pricing import PriceTable
from sluice.topology import Buckets, Consumers, PriorityClass, Streams, Subjects

from services.gateway.adapters import NATS_FAILURES
from services.gateway.chat import ChatService, admitted_headers, cache_policy, reserve_request
from services.gateway.models import ChatCompletionRequest
from services.gateway.normalize import to_chat_request, validation_problem
from services.gateway.problems import problem_body, unavailable
from services.gateway.render import RequestMeta, completion_body, openai_usage
from services.gateway.settings import GatewaySettings
from services.gateway.webhooks import (
    AllowList,
    WebhookRefused,
    WebhookSecrets,
    check_url,
    enqueue,
    payload,
    refused_error,
    team_token,
)

log = logging.getLogger(__name__)

S = jobs_pb2.JobStatus
STATUS_NAMES: dict[int, str] = {
    S.JOB_STATUS_QUEUED: "queued",
    S.JOB_STATUS_IN_PROGRESS: "in_progress",
    S.JOB_STATUS_COMPLETED: "completed",
    S.JOB_STATUS_FAILED: "failed",
    S.JOB_STATUS_CANCELLED: "cancelled",
}
TERMINAL = frozenset({S.JOB_STATUS_COMPLETED, S.JOB_STATUS_FAILED, S.JOB_STATUS_CANCELLED})
EVENT_TYPES: dict[int, str] = {
    S.JOB_STATUS_COMPLETED: "job.completed",
    S.JOB_STATUS_FAILED: "job.failed",
    S.JOB_STATUS_CANCELLED: "job.cancelled",
}
PRIORITY_PROTO = {
    PriorityClass.INTERACTIVE: chat_pb2.PRIORITY_INTERACTIVE,
    PriorityClass.BATCH: chat_pb2.PRIORITY_BATCH,
    PriorityClass.SYSTEM: chat_pb2.PRIORITY_SYSTEM,
}
JOB_PREFIX = "job_"
SYSTEM_SCOPE = "priority:system"


def new_job_id() -> str:
    """Time-ordered (microseconds, hex) then random: key order is submission order."""
    return f"{JOB_PREFIX}{time.time_ns() // 1000:014x}{secrets.token_hex(6)}"


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- request parsing ----------------------------------------------------------------------


class JobCreateRequest(BaseModel):
    """``POST /v1/jobs`` body: the chat completion request, and where to report."""

    model_config = ConfigDict(extra="forbid")

    request: ChatCompletionRequest
    webhook_url: str | None = Field(default=None, max_length=2048)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


def parse_job_body(raw: bytes) -> JobCreateRequest:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SluiceError(
            ErrorCode.INVALID_JSON, f"The body is not valid JSON (error at byte {exc.pos})."
        ) from None
    if not isinstance(data, dict):
        raise SluiceError(ErrorCode.INVALID_REQUEST, "The body must be a JSON object.")
    try:
        return JobCreateRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_problem(exc) from None


@dataclass(frozen=True)
class Prefer:
    respond_async: bool = False
    wait: float | None = None


def parse_prefer(values: list[str]) -> Prefer:
    """RFC 7240 ``Prefer``: ``respond-async`` and ``wait=N`` (others are ignored)."""
    respond_async = False
    wait: float | None = None
    for value in values:
        for item in value.split(","):
            token = item.split(";", 1)[0].strip()
            name, _, arg = token.partition("=")
            name = name.strip().lower()
            arg = arg.strip().strip('"')
            if name == "respond-async":
                respond_async = True
            elif name == "wait" and arg:
                with contextlib.suppress(ValueError):
                    wait = max(0.0, float(arg))
    return Prefer(respond_async, wait)


def resolve_priority(
    key: keys_pb2.ApiKeyRecord, header: str | None, default: PriorityClass
) -> PriorityClass:
    """The class of one request: the ``x-sluice-priority`` header if sent (``system``
    needs the ``priority:system`` scope), else a batch or system key tier, else the
    route's default."""
    if header is not None:
        value = header.strip().lower()
        try:
            chosen = PriorityClass(value)
        except ValueError:
            raise SluiceError(
                ErrorCode.INVALID_REQUEST,
                "x-sluice-priority must be one of interactive, batch, system.",
                param="x-sluice-priority",
            ) from None
        if chosen is PriorityClass.SYSTEM and not (SYSTEM_SCOPE in key.scopes or "*" in key.scopes):
            raise SluiceError(
                ErrorCode.FORBIDDEN,
                "The system priority class needs a key with the 'priority:system' scope.",
                param="x-sluice-priority",
            )
        return chosen
    if key.tier in (PriorityClass.BATCH, PriorityClass.SYSTEM):
        return PriorityClass(key.tier)
    return default


# --- the store ------------------------------------------------------------------------------


class JobStore:
    """Job records by id, and a per-team index (``team.<token>.<job id>``) for listing."""

    def __init__(self, kv: KeyValue, bus: Bus) -> None:
        self.kv = kv
        self.bus = bus

    @staticmethod
    def _key(job_id: str) -> str:
        return f"job.{job_id}"

    async def create(self, record: jobs_pb2.JobRecord) -> int:
        # Both writes in flight at once; an index entry whose record failed to be created
        # is skipped by listing.
        revision, _ = await asyncio.gather(
            self.kv.create(self._key(record.job_id), record.SerializeToString()),
            self.kv.put(f"team.{team_token(record.team_id)}.{record.job_id}", b""),
        )
        return int(revision)

    async def update_if(self, record: jobs_pb2.JobRecord, revision: int) -> bool:
        """Write ``record`` if nobody changed it since ``revision``."""
        try:
            await self.kv.update(
                self._key(record.job_id), record.SerializeToString(), last=revision
            )
        except KeyWrongLastSequenceError:
            return False
        return True

    async def get(self, job_id: str) -> tuple[jobs_pb2.JobRecord, int] | None:
        try:
            entry = await self.kv.get(self._key(job_id))
        except KeyNotFoundError:
            return None
        record = jobs_pb2.JobRecord()
        try:
            record.ParseFromString(entry.value or b"")
        except DecodeError:
            return None
        return record, int(entry.revision or 0)

    async def delete(self, job_id: str) -> None:
        with contextlib.suppress(KeyNotFoundError):
            await self.kv.delete(self._key(job_id))

    async def mutate(
        self, job_id: str, change: Callable[[jobs_pb2.JobRecord], bool]
    ) -> jobs_pb2.JobRecord | None:
        """Apply ``change`` (returns False for no write) with optimistic concurrency."""
        for _ in range(20):
            found = await self.get(job_id)
            if found is None:
                return None
            record, revision = found
            if not change(record):
                return record
            try:
                await self.kv.update(self._key(job_id), record.SerializeToString(), last=revision)
                return record
            except KeyWrongLastSequenceError:
                await asyncio.sleep(0.005)
        raise unavailable("The job record is changing too fast; retry.")

    async def team_job_ids(self, team_id: str) -> list[str]:
        """The team's job ids, newest first, from the server's subject index of the
        bucket. Not from a KV watcher: nats-py's can end its initial replay before every
        key arrived (nats-io/nats.py#842) and list a team's jobs short."""
        prefix = Buckets.JOBS.key_subject(f"team.{team_token(team_id)}.")
        subjects = await self.bus.stream_subjects(Buckets.JOBS.stream_name, prefix + ">")
        return sorted((s[len(prefix) :] for s in subjects if s.startswith(prefix)), reverse=True)


# --- applying lifecycle events --------------------------------------------------------------


@dataclass
class Applied:
    changed: bool
    webhook: bool = False


class JobRenderer:
    """Turns records into the API's job objects and lifecycle events into record changes."""

    def __init__(self, prices: PriceTable | None) -> None:
        self.prices = prices

    def apply(self, record: jobs_pb2.JobRecord, event: lifecycle_pb2.LifecycleEvent) -> Applied:
        at_ms = event.at_unix_nanos // 1_000_000 or _now_ms()
        if event.HasField("started"):
            started = event.started
            if record.status in TERMINAL:
                return Applied(False)
            changed = record.status != S.JOB_STATUS_IN_PROGRESS or started.attempt > record.attempts
            record.status = S.JOB_STATUS_IN_PROGRESS
            record.attempts = max(record.attempts, started.attempt)
            record.worker = started.worker
            if not record.started_unix_ms:
                record.started_unix_ms = at_ms
            return Applied(changed)
        if not event.HasField("finished") or record.status in TERMINAL:
            return Applied(False)
        finished = event.finished
        record.finished_unix_ms = at_ms
        record.attempts = max(record.attempts, finished.attempt)
        if finished.HasField("final"):
            final = finished.final
            record.status = S.JOB_STATUS_COMPLETED
            meta = RequestMeta(record.job_id, record.trace_id, record.request.model)
            meta.created = record.created_unix_ms // 1000
            record.result_json = completion_body(meta, final, cache_hit=False)
            record.usage.CopyFrom(final.usage)
            record.cost_usd = final.cost_usd
        else:
            failure = finished.failure
            cancelled = failure.problem.code == ErrorCode.CANCELLED
            record.status = S.JOB_STATUS_CANCELLED if cancelled else S.JOB_STATUS_FAILED
            record.error.CopyFrom(failure.problem)
            record.usage.CopyFrom(failure.partial_usage)
            record.cost_usd = self._partial_cost(
                failure.model_served or record.request.model, failure.partial_usage
            )
        webhook = bool(record.webhook_url)
        if webhook:
            record.webhook_status = "pending"
            record.webhook_id = f"msg_{record.job_id}"
        return Applied(True, webhook)

    def _partial_cost(self, model: str, usage: chat_pb2.Usage) -> float:
        if self.prices is None or not (usage.input_tokens or usage.output_tokens):
            return 0.0
        try:
            return float(self.prices.price(model, usage).total_usd)
        except Exception:
            return 0.0

    def view(self, record: jobs_pb2.JobRecord, tokens: int = 0) -> dict[str, Any]:
        status = STATUS_NAMES.get(record.status, "queued")
        sampling = record.request.sampling
        max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else None
        if record.status in TERMINAL:
            tokens = int(record.usage.output_tokens) or tokens
        fraction: float | None = None
        if record.status == S.JOB_STATUS_COMPLETED:
            fraction = 1.0
        elif max_tokens:
            fraction = round(min(1.0, tokens / max_tokens), 4)
        error = None
        if record.HasField("error") and record.error.code:
            err = SluiceError.from_proto(record.error)
            error = problem_body(
                err,
                instance=f"/v1/jobs/{record.job_id}",
                request_id=record.job_id,
                trace_id=record.trace_id,
            )
        webhook = None
        if record.webhook_url:
            webhook = {
                "url": record.webhook_url,
                "status": record.webhook_status or "waiting",
                "id": record.webhook_id or None,
                "deliveries": [
                    {
                        "attempt": a.attempt,
                        "at": a.at_unix_ms / 1000,
                        "event": a.event_type,
                        "status_code": a.status_code or None,
                        "error": a.error or None,
                    }
                    for a in record.webhook_deliveries
                ],
            }
        return {
            "id": record.job_id,
            "object": "job",
            "status": status,
            "model": record.request.model,
            "priority": record.priority,
            "created_at": record.created_unix_ms // 1000,
            "started_at": record.started_unix_ms // 1000 or None,
            "finished_at": record.finished_unix_ms // 1000 or None,
            "expires_at": record.expires_unix_ms // 1000,
            "attempts": record.attempts,
            "cancel_requested": record.cancel_requested,
            "progress": {"tokens": tokens, "max_tokens": max_tokens, "fraction": fraction},
            "result": orjson.Fragment(record.result_json) if record.result_json else None,
            "usage": openai_usage(record.usage) if record.status in TERMINAL else None,
            "cost_usd": record.cost_usd if record.status in TERMINAL else None,
            "error": error,
            "metadata": dict(record.metadata),
            "webhook": webhook,
            "trace_id": record.trace_id or None,
        }


# --- the service ----------------------------------------------------------------------------


@dataclass
class Submitted:
    record: jobs_pb2.JobRecord
    # Set when Prefer: wait saw the job finish in time.
    finished: bool = False


def _terminal_event(job_id: str, failure: inference_pb2.Failure) -> lifecycle_pb2.LifecycleEvent:
    return lifecycle_pb2.LifecycleEvent(
        request_id=job_id,
        at_unix_nanos=time.time_ns(),
        finished=lifecycle_pb2.Finished(outcome="cancelled", failure=failure),
    )


class JobService:
    def __init__(
        self,
        *,
        settings: GatewaySettings,
        bus: Bus,
        chat: ChatService,
        store: JobStore,
        renderer: JobRenderer,
        webhook_secrets: WebhookSecrets,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.chat = chat
        self.store = store
        self.renderer = renderer
        self.webhook_secrets = webhook_secrets
        self.allow = AllowList(settings.webhook_allow_hosts)
        self.timeout = settings.publish_timeout_seconds
        self._background: set[asyncio.Task[None]] = set()

    # --- reading --------------------------------------------------------------------

    async def find(self, key: keys_pb2.ApiKeyRecord, job_id: str) -> jobs_pb2.JobRecord:
        """The caller's job, or 404 (for another team's job as for a missing one)."""
        found = await self.store.get(job_id) if job_id.startswith(JOB_PREFIX) else None
        if (
            found is None
            or found[0].team_id != key.team_id
            or (found[0].expires_unix_ms and found[0].expires_unix_ms < _now_ms())
        ):
            raise SluiceError(ErrorCode.NOT_FOUND, f"No job '{job_id[:64]}' exists for this key.")
        return found[0]

    async def progress_tokens(self, record: jobs_pb2.JobRecord) -> int:
        if record.status != S.JOB_STATUS_IN_PROGRESS:
            return 0
        try:
            raw = await self.bus.js.get_last_msg(
                Streams.STREAMS.name, Subjects.stream(record.job_id)
            )
        except (NotFoundError, *NATS_FAILURES):
            return 0
        event = inference_pb2.StreamEvent()
        try:
            event.ParseFromString(raw.data or b"")
        except DecodeError:
            return 0
        if event.HasField("delta"):
            return int(event.sequence)
        if event.HasField("failure"):
            return int(event.failure.partial_usage.output_tokens)
        return int(event.final.usage.output_tokens) if event.HasField("final") else 0

    async def view(self, record: jobs_pb2.JobRecord) -> dict[str, Any]:
        return self.renderer.view(record, await self.progress_tokens(record))

    async def list(
        self, key: keys_pb2.ApiKeyRecord, *, limit: int, after: str | None
    ) -> dict[str, Any]:
        ids = await self.store.team_job_ids(key.team_id)
        if after:
            ids = [i for i in ids if i < after]
        data: list[dict[str, Any]] = []
        now = _now_ms()
        index = 0
        while index < len(ids) and len(data) < limit:
            found = await self.store.get(ids[index])
            index += 1
            if found is None or found[0].team_id != key.team_id:
                continue
            if found[0].expires_unix_ms and found[0].expires_unix_ms < now:
                continue
            data.append(self.renderer.view(found[0]))
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": index < len(ids),
        }

    # --- submitting -----------------------------------------------------------------

    async def submit(
        self,
        key: keys_pb2.ApiKeyRecord,
        spec: JobCreateRequest,
        *,
        priority: PriorityClass,
        trace_id: str,
        wait: float | None = None,
    ) -> Submitted:
        settings = self.settings
        request = to_chat_request(spec.request)
        # Jobs run streamed at the worker: the token events are the job's progress.
        request.stream = True
        request.include_usage = True
        prompt_tokens, reserve_tokens = self.chat._check_model(request)
        url = spec.webhook_url
        if url:
            try:
                await check_url(url, self.allow)
            except WebhookRefused as exc:
                raise refused_error(exc) from None
            if await self.webhook_secrets.is_disabled(key.team_id, url):
                raise refused_error(WebhookRefused("this webhook endpoint answered 410 Gone"))

        job_id = new_job_id()
        reservation = await self.chat.limiter.reserve(
            reserve_request(key, request, job_id, prompt_tokens, reserve_tokens)
        )
        admitted_headers(reservation)
        now_ms = _now_ms()
        record = jobs_pb2.JobRecord(
            job_id=job_id,
            key_id=key.key_id,
            team_id=key.team_id,
            status=S.JOB_STATUS_QUEUED,
            request=request,
            priority=str(priority),
            webhook_url=url or "",
            metadata=spec.metadata or {},
            created_unix_ms=now_ms,
            expires_unix_ms=now_ms + int(settings.job_retention_seconds * 1000),
            reservation_id=reservation.reservation_id,
            trace_id=trace_id,
        )
        now_ns = time.time_ns()
        work = inference_pb2.InferenceWork(
            request_id=job_id,
            key_id=key.key_id,
            team_id=key.team_id,
            request=request,
            priority=PRIORITY_PROTO[priority],
            stream_subject=Subjects.stream(job_id),
            reservation_id=reservation.reservation_id,
            enqueued_unix_nanos=now_ns,
            deadline_unix_nanos=now_ns + int(settings.job_timeout_seconds * 1e9),
            lifecycle_events=True,
        )
        # A job's answer fills the exact cache as a chat completion's would, so the same
        # request later is answered from it. Jobs do not read the cache: a hit would
        # need a job that finishes without a worker, which the lifecycle does not have.
        if cache_policy(settings.cache_mode, request.sampling, "").store:
            work.cache_key = canonical.cache_key(request, scope=key.team_id)
            work.cache_ttl_seconds = settings.cache_ttl_seconds
        try:
            revision = await self.store.create(record)
        except NATS_FAILURES:
            self.chat.limiter.release(reservation.reservation_id, key.key_id, job_id)
            raise unavailable("The job store did not answer.") from None

        waiter: asyncio.Future[lifecycle_pb2.LifecycleEvent] | None = None
        sub = None
        if wait is not None:
            waiter = asyncio.get_running_loop().create_future()
            sub = await self.bus.nc.subscribe(
                Subjects.lifecycle(job_id), cb=_finished_callback(waiter)
            )
        try:
            try:
                ack = await self.bus.js.publish(
                    Subjects.infer(priority),
                    work.SerializeToString(),
                    timeout=self.timeout,
                    headers={"Nats-Msg-Id": job_id},
                )
            except NATS_FAILURES:
                await self.store.delete(job_id)
                self.chat.limiter.release(reservation.reservation_id, key.key_id, job_id)
                raise unavailable("The work queue did not accept the job.") from None

            if waiter is None or wait is None:
                # The sequence only speeds up cancelling a queued job (a cancel also
                # reaches every worker), so it is written after the 202, not before.
                task = asyncio.create_task(self._remember_sequence(record, revision, ack.seq))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                return Submitted(record)
            await self._remember_sequence(record, revision, ack.seq)
            try:
                event = await asyncio.wait_for(
                    waiter, timeout=min(wait, settings.max_prefer_wait_seconds)
                )
            except TimeoutError:
                found = await self.store.get(job_id)
                return Submitted(found[0] if found else record)
            return Submitted(await self.apply(job_id, event) or record, finished=True)
        finally:
            if sub is not None:
                with contextlib.suppress(*NATS_FAILURES):
                    await sub.unsubscribe()

    async def _remember_sequence(
        self, record: jobs_pb2.JobRecord, revision: int, sequence: int
    ) -> None:
        """Note the work message's stream sequence on the record (to delete it from the
        queue on cancel): one write when no lifecycle event got there first."""

        def remember(r: jobs_pb2.JobRecord) -> bool:
            r.work_sequence = sequence
            return True

        written = jobs_pb2.JobRecord()
        written.CopyFrom(record)
        remember(written)
        try:
            if not await self.store.update_if(written, revision):
                await self.store.mutate(record.job_id, remember)
        except NATS_FAILURES:
            log.warning("work sequence of %s not recorded", record.job_id)

    async def apply(
        self, job_id: str, event: lifecycle_pb2.LifecycleEvent
    ) -> jobs_pb2.JobRecord | None:
        """Apply one lifecycle event to the record (idempotent) and queue the webhook."""
        outcome = Applied(False)

        def change(record: jobs_pb2.JobRecord) -> bool:
            nonlocal outcome
            outcome = self.renderer.apply(record, event)
            return outcome.changed

        record = await self.store.mutate(job_id, change)
        if record is None:
            return None
        if record.status in TERMINAL and record.webhook_url and record.webhook_status == "pending":
            await self.enqueue_webhook(record)
        if event.HasField("started") and (
            record.cancel_requested or record.status == S.JOB_STATUS_CANCELLED
        ):
            # The work reached a worker after the cancel: stop it again.
            await self._publish_cancel(job_id)
        return record

    async def enqueue_webhook(self, record: jobs_pb2.JobRecord) -> None:
        event_type = EVENT_TYPES[record.status]
        delivery = jobs_pb2.WebhookDelivery(
            webhook_id=record.webhook_id or f"msg_{record.job_id}",
            job_id=record.job_id,
            team_id=record.team_id,
            url=record.webhook_url,
            event_type=event_type,
            payload=payload(event_type, self.renderer.view(record)),
            created_unix_ms=_now_ms(),
        )
        await enqueue(self.bus, delivery, self.timeout)

    async def record_webhook_attempt(
        self, job_id: str, status: str, attempt: jobs_pb2.WebhookAttempt
    ) -> None:
        def change(record: jobs_pb2.JobRecord) -> bool:
            if any(a.attempt == attempt.attempt for a in record.webhook_deliveries):
                return False
            record.webhook_deliveries.append(attempt)
            record.webhook_status = status
            return True

        await self.store.mutate(job_id, change)

    # --- cancelling -----------------------------------------------------------------

    async def _publish_cancel(self, job_id: str) -> None:
        with contextlib.suppress(*NATS_FAILURES):
            await self.bus.nc.publish(Subjects.cancel(job_id), b"")

    async def cancel(self, key: keys_pb2.ApiKeyRecord, job_id: str) -> jobs_pb2.JobRecord:
        record = await self.find(key, job_id)
        if record.status in TERMINAL:
            return record

        def request_cancel(r: jobs_pb2.JobRecord) -> bool:
            if r.cancel_requested or r.status in TERMINAL:
                return False
            r.cancel_requested = True
            return True

        record = await self.store.mutate(job_id, request_cancel) or record
        # The worker running it (if any) stops generating and reports a cancelled failure.
        await self._publish_cancel(job_id)
        if record.status == S.JOB_STATUS_QUEUED and record.work_sequence:
            try:
                removed = await self.bus.js.delete_msg(Streams.INFER.name, record.work_sequence)
            except (NotFoundError, *NATS_FAILURES):
                removed = False
            except nats.errors.Error:
                removed = False
            if removed:
                # Still queued: it will never run. Release its reservation and record the
                # end on the lifecycle stream, where every replica sees it.
                self.chat.limiter.release(record.reservation_id, record.key_id, job_id)
                failure = inference_pb2.Failure(
                    problem=SluiceError(
                        ErrorCode.CANCELLED, "The job was cancelled before it started."
                    ).to_proto()
                )
                event = _terminal_event(job_id, failure)
                with contextlib.suppress(*NATS_FAILURES):
                    await self.bus.js.publish(
                        Subjects.lifecycle(job_id),
                        event.SerializeToString(),
                        timeout=self.timeout,
                        headers={"Nats-Msg-Id": f"{job_id}:finished"},
                    )
                record = await self.apply(job_id, event) or record
        return record

    # --- events ---------------------------------------------------------------------

    async def events(self, record: jobs_pb2.JobRecord) -> AsyncIterator[bytes]:
        """SSE: ``status`` events (the job object) and ``token`` events, replayed from the
        streams then live, until the job ends."""
        job_id = record.job_id
        yield _sse("status", orjson.dumps(await self.view(record)))
        if record.status in TERMINAL:
            return
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def push(msg: Msg) -> None:
            await queue.put(msg)

        js = self.bus.js
        subs = []
        try:
            subs.append(
                await js.subscribe(
                    Subjects.lifecycle(job_id),
                    stream=Streams.LIFECYCLE.name,
                    cb=push,
                    ordered_consumer=True,
                )
            )
            subs.append(
                await js.subscribe(
                    Subjects.stream(job_id),
                    stream=Streams.STREAMS.name,
                    cb=push,
                    ordered_consumer=True,
                )
            )
            last_token = 0
            heartbeat = self.settings.sse_heartbeat_seconds
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), timeout=heartbeat)
                except TimeoutError:
                    current = await self.store.get(job_id)
                    if current is not None and current[0].status in TERMINAL:
                        yield _sse("status", orjson.dumps(self.renderer.view(current[0])))
                        return
                    yield b": keep-alive\n\n"
                    continue
                if msg.subject.startswith(Subjects.stream("")):
                    event = inference_pb2.StreamEvent()
                    with contextlib.suppress(DecodeError):
                        event.ParseFromString(msg.data)
                    if event.HasField("delta") and event.sequence > last_token:
                        last_token = int(event.sequence)
                        if not event.delta.content:
                            continue
                        token = {
                            "sequence": event.sequence,
                            "choice_index": event.delta.choice_index,
                            "content": event.delta.content,
                        }
                        yield _sse("token", orjson.dumps(token), event_id=str(event.sequence))
                    continue
                life = lifecycle_pb2.LifecycleEvent()
                try:
                    life.ParseFromString(msg.data)
                except DecodeError:
                    continue
                current_record = await self.apply(job_id, life)
                if current_record is None:
                    return
                view = self.renderer.view(current_record, last_token)
                yield _sse("status", orjson.dumps(view))
                if current_record.status in TERMINAL:
                    return
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


def _sse(event: str, data: bytes, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n".encode() if event_id else b""
    return head + f"event: {event}\n".encode() + b"data: " + data + b"\n\n"


def _finished_callback(
    waiter: asyncio.Future[lifecycle_pb2.LifecycleEvent],
) -> Callable[[Msg], Any]:
    async def on_msg(msg: Msg) -> None:
        event = lifecycle_pb2.LifecycleEvent()
        try:
            event.ParseFromString(msg.data)
        except DecodeError:
            return
        if event.HasField("finished") and not waiter.done():
            waiter.set_result(event)

    return on_msg


# --- the tracker ----------------------------------------------------------------------------


class JobTracker:
    """Applies lifecycle events to job records: one durable pull consumer for all
    gateway replicas, so each event is applied once (and again, harmlessly, after a
    redelivery)."""

    def __init__(self, bus: Bus, jobs: JobService) -> None:
        self.bus = bus
        self.jobs = jobs
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.applied = 0

    async def start(self) -> None:
        spec = Consumers.JOB_TRACKER
        await self.bus.ensure_consumer(spec)
        self._sub = await self.bus.js.pull_subscribe(
            spec.filter_subject, durable=spec.durable, stream=spec.stream
        )
        self._task = asyncio.create_task(self._run(), name="job-tracker")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        running = lambda: not self._stopping  # noqa: E731
        async for msgs in pull_batches(self._sub, batch=128, running=running, what="lifecycle"):
            for msg in msgs:
                await self._handle(msg)

    async def _handle(self, msg: Msg) -> None:
        request_id = msg.subject.rsplit(".", 1)[-1]
        if not request_id.startswith(JOB_PREFIX):
            await msg.ack()
            return
        event = lifecycle_pb2.LifecycleEvent()
        try:
            event.ParseFromString(msg.data)
        except DecodeError:
            await msg.term()
            return
        try:
            await self.jobs.apply(request_id, event)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("lifecycle event for %s not applied; retrying", request_id, exc_info=True)
            with contextlib.suppress(Exception):
                await msg.nak(delay=1.0)
            return
        self.applied += 1
        await msg.ack()


async def ensure_bucket_ttl(bus: Bus, bucket: str, seconds: float) -> None:
    """Make a KV bucket's TTL follow the setting (the bucket may predate it)."""
    stream = f"KV_{bucket}"
    try:
        info = await bus.js.stream_info(stream)
    except (NotFoundError, *NATS_FAILURES):
        return
    wanted = float(seconds)
    if info.config.max_age is not None and abs(float(info.config.max_age) - wanted) < 1e-3:
        return
    info.config.max_age = wanted
    # JetStream refuses a duplicate window longer than max_age (the KV default is 2 min).
    window = info.config.duplicate_window
    if wanted > 0 and (window is None or window > wanted):
        info.config.duplicate_window = wanted
    try:
        await bus.js.update_stream(info.config)
    except Exception:
        log.warning("could not set the TTL of bucket %s", bucket, exc_info=True)
