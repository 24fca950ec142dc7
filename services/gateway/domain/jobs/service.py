"""Asynchronous jobs: a chat completion that runs on the work queue while the client
polls, streams events or waits for a webhook.

The job record (``JobRecord``) is written at submission and then follows the worker's
lifecycle events (``SLUICE_LIFECYCLE``), applied by the job tracker
(``handlers/nats/job_tracker.py``), one durable consumer shared by every gateway
replica: a job's status advances whichever gateway accepted it, and after any of them
restarts. Every record change is revision-checked, so concurrent writers never lose one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from sluice import canonical
from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2, lifecycle_pb2
from sluice.jobs.v1 import jobs_pb2
from sluice.keys.v1 import keys_pb2
from sluice.topology import PriorityClass

from services.gateway.domain.admission import (
    admitted_headers,
    cache_policy,
    reserve_request,
    spend_ceiling,
)
from services.gateway.domain.chat import ChatService, cache_scope
from services.gateway.domain.clock import now_ms
from services.gateway.domain.exchange import JOB_ID_HEADER, JSON, Answer
from services.gateway.domain.jobs.records import (
    EVENT_TYPES,
    JOB_PREFIX,
    TERMINAL,
    Applied,
    JobRenderer,
    Status,
    new_job_id,
)
from services.gateway.domain.jobs.request import JobSpec, Prefer
from services.gateway.domain.jobs.webhooks import (
    AllowList,
    WebhookRefused,
    check_url,
    payload,
    refused_error,
)
from services.gateway.domain.labels import request_labels
from services.gateway.domain.ports import (
    JobStore,
    LifecycleLog,
    StreamStore,
    WebhookSecretStore,
    WorkQueue,
)
from services.gateway.domain.problems import GatewayError
from services.gateway.domain.tenancy.policy import check_model_allowed
from services.gateway.domain.verdict import checks_for
from services.gateway.domain.work import CacheInstruction, build_work, tokens_so_far
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

# How long a job's event stream waits, once the job has ended, for the rest of its token
# events (see ``JobService.events``).
TOKEN_DRAIN_SECONDS = 2.0


@dataclass
class Submitted:
    record: jobs_pb2.JobRecord
    # Set when Prefer: wait saw the job finish in time.
    finished: bool = False


def _cancelled_event(job_id: str, failure: inference_pb2.Failure) -> lifecycle_pb2.LifecycleEvent:
    return lifecycle_pb2.LifecycleEvent(
        request_id=job_id,
        at_unix_nanos=time.time_ns(),
        finished=lifecycle_pb2.Finished(outcome="cancelled", failure=failure),
    )


def _sse(event: str, data: bytes, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n".encode() if event_id else b""
    return head + f"event: {event}\n".encode() + b"data: " + data + b"\n\n"


class JobService:
    def __init__(
        self,
        *,
        settings: GatewaySettings,
        chat: ChatService,
        store: JobStore,
        renderer: JobRenderer,
        queue: WorkQueue,
        streams: StreamStore,
        lifecycle: LifecycleLog,
        webhook_secrets: WebhookSecretStore,
    ) -> None:
        self.settings = settings
        self.chat = chat
        self.store = store
        self.renderer = renderer
        self.queue = queue
        self.streams = streams
        self.lifecycle = lifecycle
        self.webhook_secrets = webhook_secrets
        self.allow = AllowList(settings.webhook_allow_hosts)
        self._background: set[asyncio.Task[None]] = set()

    # --- reading --------------------------------------------------------------------

    async def find(self, key: keys_pb2.ApiKeyRecord, job_id: str) -> jobs_pb2.JobRecord:
        """The caller's job, or 404 (for another team's job as for a missing one)."""
        found = await self.store.get(job_id) if job_id.startswith(JOB_PREFIX) else None
        if (
            found is None
            or found[0].team_id != key.team_id
            or (found[0].expires_unix_ms and found[0].expires_unix_ms < now_ms())
        ):
            raise SluiceError(ErrorCode.NOT_FOUND, f"No job '{job_id[:64]}' exists for this key.")
        return found[0]

    async def progress_tokens(self, record: jobs_pb2.JobRecord) -> int:
        if record.status != Status.JOB_STATUS_IN_PROGRESS:
            return 0
        return tokens_so_far(await self.streams.last_event(record.job_id))

    async def view(self, record: jobs_pb2.JobRecord) -> dict[str, Any]:
        return self.renderer.view(record, await self.progress_tokens(record))

    async def list(
        self, key: keys_pb2.ApiKeyRecord, *, limit: int, after: str | None
    ) -> dict[str, Any]:
        ids = await self.store.team_job_ids(key.team_id)
        if after:
            ids = [i for i in ids if i < after]
        data: list[dict[str, Any]] = []
        now = now_ms()
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
        spec: JobSpec,
        *,
        priority: PriorityClass,
        trace_id: str,
        wait: float | None = None,
        tags: tuple[str, ...] = (),
        end_user: str = "",
    ) -> Submitted:
        settings = self.settings
        request = chat_pb2.ChatRequest()
        request.CopyFrom(spec.request)
        check_model_allowed(key, request.model)
        self.chat.guard.inspect(request, self.chat.catalog.model(request.model))
        # A job's answer is judged when it finishes (JobRenderer): no repair, since
        # nobody waits to see the first answer.
        checks = checks_for(
            request, spec.hints, review_threshold=settings.review_threshold, schema_repair=False
        )
        if checks.wants_confidence:
            request.sampling.logprobs = True
        end_user, all_tags = request_labels(request, tags, end_user)
        # Jobs run streamed at the worker: the token events are the job's progress.
        request.stream = True
        request.include_usage = True
        routed, budget = await self.chat.route(key, request, "")
        url = spec.webhook_url
        if url:
            try:
                await check_url(url, self.allow)
            except WebhookRefused as exc:
                raise refused_error(exc) from None
            if await self.webhook_secrets.is_disabled(key.team_id, url):
                raise refused_error(WebhookRefused("this webhook endpoint answered 410 Gone"))

        job_id = new_job_id()
        limiter = self.chat.limiter
        reserve = reserve_request(key, request, job_id, budget)
        entitled = await self.chat.tenancy.fill(
            reserve, key, end_user=end_user or request.user, priority=priority
        )
        reservation = await self.chat.reserve(reserve, entitled.limiter_failure)
        admitted_headers(reservation)
        created_ms = now_ms()
        record = jobs_pb2.JobRecord(
            job_id=job_id,
            key_id=key.key_id,
            team_id=key.team_id,
            status=Status.JOB_STATUS_QUEUED,
            request=request,
            priority=str(priority),
            webhook_url=url or "",
            metadata=spec.metadata or {},
            created_unix_ms=created_ms,
            expires_unix_ms=created_ms + int(settings.job_retention_seconds * 1000),
            reservation_id=reservation.reservation_id,
            trace_id=trace_id,
            dialect=spec.dialect,
            checks=checks.to_proto(),
        )
        # A job's answer fills the exact cache as a chat completion's would, so the same
        # request later is answered from it. Jobs do not read the cache: a hit would
        # need a job that finishes without a worker, which the lifecycle does not have.
        cache = None
        scope = cache_scope(key.team_id, request.model, routed.route.name)
        if cache_policy(settings.cache_mode, request.sampling, "").store:
            cache = CacheInstruction(
                canonical.cache_key(request, scope=scope), settings.cache_ttl_seconds
            )
        work = build_work(
            request_id=job_id,
            key=key,
            request=request,
            priority=priority,
            reservation_id=reservation.reservation_id,
            timeout_seconds=settings.job_timeout_seconds,
            lifecycle_events=True,
            cache=cache,
            end_user=end_user,
            tags=all_tags,
            spend_ceiling_usd_nanos=spend_ceiling(key, reservation),
        )
        self.chat.route_work(work, routed, key, request, cache.key if cache else "", queued=True)
        try:
            revision = await self.store.create(record)
        except SluiceError:
            limiter.release(reservation.reservation_id, key.key_id, job_id)
            raise

        watch = await self.lifecycle.watch_finished(job_id) if wait is not None else None
        try:
            try:
                sequence = await self.queue.enqueue(work, priority)
            except SluiceError:
                await self.store.delete(job_id)
                limiter.release(reservation.reservation_id, key.key_id, job_id)
                raise

            if watch is None or wait is None:
                # The sequence only speeds up cancelling a queued job (a cancel also
                # reaches every worker), so it is written after the 202, not before.
                task = asyncio.create_task(self._remember_sequence(record, revision, sequence))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                return Submitted(record)
            await self._remember_sequence(record, revision, sequence)
            event = await watch.wait(min(wait, settings.max_prefer_wait_seconds))
            if event is None:
                found = await self.store.get(job_id)
                return Submitted(found[0] if found else record)
            return Submitted(await self.apply(job_id, event) or record, finished=True)
        finally:
            if watch is not None:
                await watch.close()

    async def _remember_sequence(
        self, record: jobs_pb2.JobRecord, revision: int, sequence: int
    ) -> None:
        """Note the work message's stream sequence on the record (to take it off the
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
        except SluiceError:
            log.warning("work sequence of %s not recorded", record.job_id)

    # --- following the worker -------------------------------------------------------

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
            record.cancel_requested or record.status == Status.JOB_STATUS_CANCELLED
        ):
            # The work reached a worker after the cancel: stop it again.
            await self.streams.cancel(job_id, "job_cancelled")
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
            created_unix_ms=now_ms(),
        )
        await self.queue.enqueue_webhook(delivery)

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
        await self.streams.cancel(job_id, "job_cancelled")
        if (
            record.status == Status.JOB_STATUS_QUEUED
            and record.work_sequence
            and await self.queue.remove(record.work_sequence)
        ):
            # Still queued: it will never run. Release its reservation and record the
            # end on the lifecycle stream, where every replica sees it.
            self.chat.limiter.release(record.reservation_id, record.key_id, job_id)
            failure = inference_pb2.Failure(
                problem=SluiceError(
                    ErrorCode.CANCELLED, "The job was cancelled before it started."
                ).to_proto()
            )
            event = _cancelled_event(job_id, failure)
            with contextlib.suppress(SluiceError):
                await self.lifecycle.publish_finished(event)
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
        feed = await self.lifecycle.follow_job(job_id)
        try:
            last_token = 0
            heartbeat = self.settings.sse_heartbeat_seconds
            # The token events and the lifecycle events come from two streams, each in
            # order but not in order with each other: a job's end is told once its
            # token stream has ended too (or has been quiet for TOKEN_DRAIN_SECONDS:
            # a job cancelled in the queue never had one), so no token follows it.
            tokens_ended = False
            ended: jobs_pb2.JobRecord | None = None
            while True:
                item = await feed.get(TOKEN_DRAIN_SECONDS if ended is not None else heartbeat)
                if item is None:
                    if ended is not None:
                        yield _sse("status", orjson.dumps(self.renderer.view(ended, last_token)))
                        return
                    current = await self.store.get(job_id)
                    if current is not None and current[0].status in TERMINAL:
                        yield _sse("status", orjson.dumps(self.renderer.view(current[0])))
                        return
                    yield b": keep-alive\n\n"
                    continue
                if isinstance(item, inference_pb2.StreamEvent):
                    if item.HasField("delta") and item.sequence > last_token:
                        last_token = int(item.sequence)
                        if not item.delta.content:
                            continue
                        token = {
                            "sequence": item.sequence,
                            "choice_index": item.delta.choice_index,
                            "content": item.delta.content,
                        }
                        yield _sse("token", orjson.dumps(token), event_id=str(item.sequence))
                    elif item.WhichOneof("body") in ("final", "failure"):
                        tokens_ended = True
                        if ended is not None:
                            view = self.renderer.view(ended, last_token)
                            yield _sse("status", orjson.dumps(view))
                            return
                    continue
                current_record = await self.apply(job_id, item)
                if current_record is None:
                    return
                if current_record.status in TERMINAL and not tokens_ended:
                    ended = current_record
                    continue
                view = self.renderer.view(current_record, last_token)
                yield _sse("status", orjson.dumps(view))
                if current_record.status in TERMINAL:
                    return
        finally:
            await feed.close()

    async def respond(
        self,
        key: keys_pb2.ApiKeyRecord,
        spec: JobSpec,
        *,
        prefer: Prefer,
        priority: PriorityClass,
        trace_id: str,
        tags: tuple[str, ...] = (),
        end_user: str = "",
    ) -> Answer:
        """202 with the job and its ``Location``; with ``Prefer: wait=N`` and the job done
        in time, 200 with the completion itself (or its error)."""
        submitted = await self.submit(
            key,
            spec,
            priority=priority,
            trace_id=trace_id,
            wait=prefer.wait,
            tags=tags,
            end_user=end_user,
        )
        record = submitted.record
        headers = {
            "location": f"/v1/jobs/{record.job_id}",
            JOB_ID_HEADER: record.job_id,
        }
        applied = prefer.applied()
        if applied:
            headers["preference-applied"] = applied
        if submitted.finished and record.status == Status.JOB_STATUS_COMPLETED:
            return Answer(200, headers, JSON, body=record.result_json)
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
        return Answer(202, headers, JSON, body=orjson.dumps(await self.view(record)))
