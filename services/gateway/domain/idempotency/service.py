"""``Idempotency-Key`` applied: the first request with a key runs and its outcome is
kept; a duplicate gets that outcome, its progress, or its stream (``policy.py`` says
which and why)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import lifecycle_pb2
from sluice.jobs.v1 import jobs_pb2

from services.gateway.domain.clock import now_ms
from services.gateway.domain.dialects.common import SSE_HEARTBEAT, RequestMeta
from services.gateway.domain.dialects.registry import dialect_named
from services.gateway.domain.exchange import JOB_ID_HEADER, JSON, SSE, Answer, RequestContext
from services.gateway.domain.idempotency.policy import (
    ATTACH_WAIT_SECONDS,
    MAX_STORED_STREAM_BYTES,
    REPLAYED,
    STORED_HEADERS,
    IdempotentRequest,
    fingerprint,
    parse_key,
    record_key,
)
from services.gateway.domain.ports import IdempotencyStore, LifecycleLog, StreamStore
from services.gateway.domain.problems import (
    GatewayError,
    failure_error,
    problem_headers,
)
from services.gateway.domain.relay.resume import StreamResumer
from services.gateway.domain.work import tokens_so_far
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

State = jobs_pb2.IdempotencyState
Handler = Callable[[], Awaitable[Answer]]


class Idempotency:
    def __init__(
        self,
        *,
        settings: GatewaySettings,
        store: IdempotencyStore,
        streams: StreamStore,
        lifecycle: LifecycleLog,
        resumer: StreamResumer,
    ) -> None:
        self.settings = settings
        self.store = store
        self.streams = streams
        self.lifecycle = lifecycle
        self.resumer = resumer

    async def run(self, req: IdempotentRequest, handler: Handler) -> Answer:
        key = parse_key(req.raw_key)
        kv_key = record_key(req.key.team_id, key)
        fp = fingerprint(req.route, req.body)
        now = now_ms()
        record = jobs_pb2.IdempotencyRecord(
            fingerprint=fp,
            request_id=req.ctx.request_id,
            state=State.IDEMPOTENCY_STATE_IN_FLIGHT,
            route=req.route,
            stream=req.stream,
            created_unix_ms=now,
            expires_unix_ms=now + int(self.settings.idempotency_ttl_seconds * 1000),
            model=req.model,
            include_usage=req.include_usage,
            dialect=req.dialect,
        )
        for _ in range(5):
            revision = await self.store.create(kv_key, record)
            if revision is not None:
                return await self._run_first(req, kv_key, revision, record, handler)
            answer = await self._existing(kv_key, fp, req)
            if answer is not None:
                return answer
        raise self._in_use(record, 0)

    # --- the first request ----------------------------------------------------------

    async def _run_first(
        self,
        req: IdempotentRequest,
        kv_key: str,
        revision: int,
        record: jobs_pb2.IdempotencyRecord,
        handler: Handler,
    ) -> Answer:
        try:
            answer = await handler()
        except SluiceError as err:
            await self._after_error(req, kv_key, revision, record, err)
            raise
        except BaseException:
            # The client went away, or a bug. Work already queued runs on and its
            # lifecycle event completes the record; otherwise the key is free again.
            if req.quick or not await self._queued(req.ctx.request_id):
                await self._release(kv_key, revision)
            raise
        if answer.stream is None:
            await self._store(kv_key, revision, record, answer)
            return answer
        inner = answer.stream

        async def storing() -> AsyncIterator[bytes]:
            sent: list[bytes] = []
            size = 0
            async for chunk in inner:
                if chunk != SSE_HEARTBEAT and size <= MAX_STORED_STREAM_BYTES:
                    sent.append(chunk)
                    size += len(chunk)
                yield chunk
            # The stream ran to its end: replays send the same bytes, or (too long to
            # store) its events from SLUICE_STREAMS.
            body = b"".join(sent) if size <= MAX_STORED_STREAM_BYTES else b""
            await self._store(kv_key, revision, record, answer, stream_body=body)

        answer.stream = storing()
        return answer

    async def _store(
        self,
        kv_key: str,
        revision: int,
        record: jobs_pb2.IdempotencyRecord,
        answer: Answer,
        *,
        stream_body: bytes = b"",
    ) -> None:
        done = jobs_pb2.IdempotencyRecord()
        done.CopyFrom(record)
        done.state = State.IDEMPOTENCY_STATE_COMPLETED
        done.status = answer.status
        headers = dict(answer.headers)
        headers.setdefault("content-type", answer.media_type)
        for name, value in headers.items():
            if name.lower() in STORED_HEADERS:
                done.headers.append(jobs_pb2.Header(name=name.lower(), value=value))
        done.stream = answer.stream is not None
        done.body = stream_body if done.stream else answer.body
        job_id = answer.headers.get(JOB_ID_HEADER)
        if job_id:
            done.job_id = job_id
        try:
            # False: a duplicate completed it from the lifecycle event first (same outcome).
            await self.store.update(kv_key, done, revision)
        except SluiceError:
            # Left in flight: the lifecycle event completes it for the next duplicate.
            log.warning("idempotency record %s not completed", kv_key[:12])

    async def _release(self, kv_key: str, revision: int) -> None:
        """Frees the key if its record is still at ``revision``."""
        await self.store.delete(kv_key, revision)

    async def _after_error(
        self,
        req: IdempotentRequest,
        kv_key: str,
        revision: int,
        record: jobs_pb2.IdempotencyRecord,
        err: SluiceError,
    ) -> None:
        if err.code is ErrorCode.UPSTREAM_TIMEOUT and not req.quick:
            # The work may still be running: its outcome completes the record later.
            return
        if req.quick:
            # A job that exists (it ended in time for Prefer: wait, and failed) is the
            # answer; a job refused before it was created (body, limits) is not.
            headers = err.headers if isinstance(err, GatewayError) else {}
            if not headers.get(JOB_ID_HEADER):
                await self._release(kv_key, revision)
                return
        elif not await self._started(req.ctx.request_id):
            # Refused before anything ran: the key is free for a corrected retry.
            await self._release(kv_key, revision)
            return
        ctx = req.ctx
        dialect = dialect_named(req.dialect)
        answer = Answer(
            status=err.status,
            headers=problem_headers(err),
            media_type=dialect.error_media_type,
            body=dialect.error(
                err, instance=ctx.instance, request_id=ctx.request_id, trace_id=ctx.trace_id
            ),
        )
        await self._store(kv_key, revision, record, answer)

    # --- duplicates -----------------------------------------------------------------

    async def _existing(self, kv_key: str, fp: str, req: IdempotentRequest) -> Answer | None:
        """The answer for a duplicate, or None when the key is free again."""
        found = await self.store.get(kv_key)
        if found is None:
            return None
        existing, revision = found
        now = now_ms()
        if not existing.fingerprint or existing.expires_unix_ms < now:
            await self._release(kv_key, revision)
            return None
        if existing.fingerprint != fp:
            raise SluiceError(
                ErrorCode.IDEMPOTENCY_KEY_REUSED,
                "This Idempotency-Key was used with a different request body.",
                details={"request_id": existing.request_id},
            )
        if existing.state == State.IDEMPOTENCY_STATE_COMPLETED:
            return await self._replay(existing, req)
        lifecycle: lifecycle_pb2.LifecycleEvent | None = None
        if not req.quick:
            lifecycle = await self.lifecycle.last(existing.request_id)
            if lifecycle is not None and lifecycle.HasField("finished"):
                finished = lifecycle
                if finished.finished.outcome == "cancelled":
                    # Stopped because its client left (x-sluice-on-disconnect: cancel):
                    # nothing to replay, the retry runs.
                    await self._release(kv_key, revision)
                    return None
                completed = self._from_lifecycle(existing, finished.finished, req.ctx)
                try:
                    await self.store.update(kv_key, completed, revision)
                except SluiceError:
                    log.warning("idempotency record %s not completed", kv_key[:12])
                return await self._replay(completed, req)
        stale_after = self.settings.idempotency_stale_slack_seconds
        if req.quick:
            stale_after += self.settings.max_prefer_wait_seconds
        else:
            stale_after += self.settings.request_timeout_seconds
        if now - existing.created_unix_ms > stale_after * 1000:
            # Its gateway died before queueing anything: take the key over.
            await self._release(kv_key, revision)
            return None
        if existing.stream and SSE in req.accept:
            stream = await self._attach(existing, req)
            if stream is not None:
                headers = {REPLAYED: "true", "x-sluice-request-id": existing.request_id}
                return Answer.sse(stream, headers)
        tokens = tokens_so_far(await self.streams.last_event(existing.request_id))
        raise self._in_use(existing, tokens, lifecycle)

    async def _attach(
        self, record: jobs_pb2.IdempotencyRecord, req: IdempotentRequest
    ) -> AsyncIterator[bytes] | None:
        """The running first request's stream, once it is open in SLUICE_STREAMS (the
        first request may still be in admission); None if it does not open in time."""
        deadline = time.monotonic() + ATTACH_WAIT_SECONDS
        while True:
            try:
                return await self._stream(record, req)
            except SluiceError as err:
                if err.code is not ErrorCode.NOT_FOUND:
                    raise
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)

    def _in_use(
        self,
        record: jobs_pb2.IdempotencyRecord,
        tokens: int,
        lifecycle: lifecycle_pb2.LifecycleEvent | None = None,
    ) -> GatewayError:
        """409 with where the first request is: ``queued`` until a worker picked it up
        (its lifecycle ``started`` event), then ``in_progress``, with the tokens streamed
        so far (a request that is not streamed gets its tokens at the end)."""
        attempt = 0
        if lifecycle is not None and lifecycle.HasField("started"):
            attempt = int(lifecycle.started.attempt) or 1
        return GatewayError(
            ErrorCode.IDEMPOTENCY_KEY_IN_USE,
            "A request with this Idempotency-Key is still in progress.",
            details={
                "request_id": record.request_id,
                "status": "in_progress" if attempt or tokens else "queued",
                "started_at": record.created_unix_ms // 1000,
                "progress": {
                    "tokens": tokens,
                    "attempt": attempt,
                    "elapsed_ms": max(0, now_ms() - record.created_unix_ms),
                },
            },
            retry_after_ms=1000,
        )

    async def _stream(
        self, record: jobs_pb2.IdempotencyRecord, req: IdempotentRequest
    ) -> AsyncIterator[bytes]:
        """The first request's stream from its start: stored events, then live ones."""
        result = await self.resumer.resume(
            req.key, record.request_id, 0, trace_id=req.ctx.trace_id, instance=req.ctx.instance
        )
        assert result.stream is not None
        return result.stream

    async def _replay(self, record: jobs_pb2.IdempotencyRecord, req: IdempotentRequest) -> Answer:
        headers = {h.name: h.value for h in record.headers}
        media_type = headers.pop("content-type", JSON)
        headers[REPLAYED] = "true"
        if record.stream and not record.body:
            return Answer(
                status=record.status or 200,
                headers=headers,
                media_type=SSE,
                stream=await self._stream(record, req),
            )
        return Answer(
            status=record.status or 200,
            headers=headers,
            media_type=SSE if record.stream else media_type,
            body=record.body,
        )

    def _from_lifecycle(
        self,
        record: jobs_pb2.IdempotencyRecord,
        finished: lifecycle_pb2.Finished,
        ctx: RequestContext,
    ) -> jobs_pb2.IdempotencyRecord:
        done = jobs_pb2.IdempotencyRecord()
        done.CopyFrom(record)
        done.state = State.IDEMPOTENCY_STATE_COMPLETED
        if record.stream:
            done.status = 200
            done.headers.append(jobs_pb2.Header(name="content-type", value=SSE))
            return done
        dialect = dialect_named(record.dialect)
        if finished.HasField("final"):
            meta = RequestMeta(record.request_id, "", record.model)
            # Judged by what the answer itself says (finish reasons, refusals): the
            # request's schema and the caller's thresholds left with the first gateway.
            done.status = 200
            done.body = dialect.body(meta, finished.final, cache_hit=False)
            done.headers.append(jobs_pb2.Header(name="content-type", value=JSON))
            return done
        err = failure_error(finished.failure, {})
        done.status = err.status
        done.body = dialect.error(
            err, instance=ctx.instance, request_id=record.request_id, trace_id=""
        )
        done.headers.append(jobs_pb2.Header(name="content-type", value=dialect.error_media_type))
        return done

    async def _queued(self, request_id: str) -> bool:
        """True once the request's stream is open (its work is queued or about to be)."""
        return await self.streams.last_event(request_id) is not None

    async def _started(self, request_id: str) -> bool:
        """True once the worker published anything for the request: a token or its
        outcome. The opening record alone (sequence 0) is the gateway's own."""
        event = await self.streams.last_event(request_id)
        return event is not None and not event.HasField("opened")
