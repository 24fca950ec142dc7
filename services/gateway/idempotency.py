"""``Idempotency-Key`` on the POSTs that cost money (IETF httpapi idempotency draft).

The first request with a key wins an atomic ``kv.create`` in the ``sluice_idempotency``
bucket (key: sha256 of team and key) and runs; the record keeps the request's
fingerprint and, once finished, its response. A duplicate:

- with another body: 422 ``idempotency_key_reused``;
- while the first runs: 409 ``idempotency_key_in_use`` with its progress, or, for a
  streamed request asked with ``Accept: text/event-stream``, the same stream (replayed
  from SLUICE_STREAMS, then live);
- after it finished: the stored response again, with ``Idempotent-Replayed: true``
  (a stream is replayed from its stored events).

What is kept, and what frees the key again:

- a response the first request got, success or error, once work reached the worker
  (an upstream 4xx/5xx, a failure mid-stream) is stored and replayed: the money may
  have been spent;
- a request refused before any work ran (bad body, unknown model, rate limit, the bus
  down before the work was queued) releases the key, so a corrected retry runs;
- a request whose client went away (or timed out at the gateway) after its work was
  queued stays in flight: the worker's lifecycle ``finished`` event completes the record
  (also when the gateway that ran it died), and a retry gets that outcome instead of a
  second run. A run the worker reports ``cancelled`` (``x-sluice-on-disconnect:
  cancel``) releases the key;
- a job (``POST /v1/jobs``, ``Prefer``) is stored as soon as it exists, its 202 or its
  inline answer; a job refused before it was created releases the key.

A streamed response is stored as the bytes sent (without heartbeats) when it is small
enough, and otherwise replayed from its events in ``SLUICE_STREAMS``.

Keys expire ``idempotency_ttl_seconds`` after the first request (the record says so, and
the bucket's TTL follows the setting).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import orjson
from google.protobuf.message import DecodeError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from sluice.bus import Bus
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2, lifecycle_pb2
from sluice.jobs.v1 import jobs_pb2
from sluice.keys.v1 import keys_pb2
from sluice.topology import Streams, Subjects

from services.gateway.adapters import NATS_FAILURES
from services.gateway.chat import failure_error
from services.gateway.edge import RequestContext
from services.gateway.problems import (
    PROBLEM_CONTENT_TYPE,
    GatewayError,
    problem_headers,
    render_problem,
)
from services.gateway.render import SSE_HEARTBEAT, RequestMeta, completion_body
from services.gateway.settings import GatewaySettings
from services.gateway.streams import StreamResumer

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255
JSON = "application/json"
SSE = "text/event-stream"
REPLAYED = "idempotent-replayed"
# Headers worth replaying; rate-limit figures of the first answer would be stale.
_STORED_HEADERS = frozenset(
    {
        "content-type",
        "location",
        "preference-applied",
        "x-sluice-cache",
        "x-sluice-job-id",
        "cache-control",
        "x-accel-buffering",
        "x-should-retry",
    }
)
IS = jobs_pb2.IdempotencyState
# A streamed answer up to this size is stored as sent; a longer one is replayed from
# SLUICE_STREAMS (KV values must fit in one NATS message).
MAX_STORED_STREAM_BYTES = 256 * 1024
# How long a duplicate asking for the stream waits for the first request's stream to
# open in SLUICE_STREAMS (admission runs before it does) before answering 409.
ATTACH_WAIT_SECONDS = 2.0
JOB_ID_HEADER = "x-sluice-job-id"


@dataclass
class HttpAnswer:
    """A response before it becomes a Litestar one: a body or an SSE byte stream."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = JSON
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None


def _bad_key(detail: str) -> SluiceError:
    return SluiceError(ErrorCode.INVALID_REQUEST, detail, param="Idempotency-Key")


def parse_key(value: str) -> str:
    """The key from an ``Idempotency-Key`` header: a structured-field string
    (``"abc"``) or, as many clients send it, the bare value."""
    text = value.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        inner = text[1:-1]
        out: list[str] = []
        escaped = False
        for ch in inner:
            if escaped:
                if ch not in '"\\':
                    raise _bad_key("Idempotency-Key is not a valid structured-field string.")
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                raise _bad_key("Idempotency-Key is not a valid structured-field string.")
            else:
                out.append(ch)
        if escaped:
            raise _bad_key("Idempotency-Key is not a valid structured-field string.")
        text = "".join(out)
    if not text:
        raise _bad_key("Idempotency-Key must not be empty.")
    if len(text) > MAX_KEY_LENGTH:
        raise _bad_key(f"Idempotency-Key must be at most {MAX_KEY_LENGTH} characters.")
    if any(not (0x20 <= ord(ch) < 0x7F) for ch in text):
        raise _bad_key("Idempotency-Key must be printable ASCII.")
    return text


def record_key(team_id: str, key: str) -> str:
    return hashlib.sha256(f"{team_id}:{key}".encode()).hexdigest()


def fingerprint(route: str, raw: bytes) -> str:
    """sha256 of the route and the canonical body (JSON with sorted keys)."""
    try:
        canonical = orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        canonical = raw
    return hashlib.sha256(route.encode() + b"\n" + canonical).hexdigest()


def _now_ms() -> int:
    return int(time.time() * 1000)


Handler = Callable[[], Awaitable[HttpAnswer]]


@dataclass(frozen=True)
class IdempotentRequest:
    key: keys_pb2.ApiKeyRecord
    raw_key: str
    route: str
    body: bytes
    ctx: RequestContext
    accept: str = ""
    stream: bool = False
    model: str = ""
    include_usage: bool = False
    # True for routes whose response is known at once (job submission).
    quick: bool = False


class Idempotency:
    def __init__(
        self, bus: Bus, kv: KeyValue, settings: GatewaySettings, resumer: StreamResumer
    ) -> None:
        self.bus = bus
        self.kv = kv
        self.settings = settings
        self.resumer = resumer

    async def run(self, req: IdempotentRequest, handler: Handler) -> HttpAnswer:
        key = parse_key(req.raw_key)
        kv_key = record_key(req.key.team_id, key)
        fp = fingerprint(req.route, req.body)
        now = _now_ms()
        record = jobs_pb2.IdempotencyRecord(
            fingerprint=fp,
            request_id=req.ctx.request_id,
            state=IS.IDEMPOTENCY_STATE_IN_FLIGHT,
            route=req.route,
            stream=req.stream,
            created_unix_ms=now,
            expires_unix_ms=now + int(self.settings.idempotency_ttl_seconds * 1000),
            model=req.model,
            include_usage=req.include_usage,
        )
        revision = 0
        for _ in range(5):
            try:
                revision = await self.kv.create(kv_key, record.SerializeToString())
                break
            except KeyWrongLastSequenceError:
                pass
            except NATS_FAILURES:
                raise _store_unavailable() from None
            answer = await self._existing(kv_key, fp, req)
            if answer is not None:
                return answer
        else:
            raise self._in_use(record, 0)
        return await self._run_first(req, kv_key, revision, record, handler)

    # --- the first request ----------------------------------------------------------

    async def _run_first(
        self,
        req: IdempotentRequest,
        kv_key: str,
        revision: int,
        record: jobs_pb2.IdempotencyRecord,
        handler: Handler,
    ) -> HttpAnswer:
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
        answer: HttpAnswer,
        *,
        stream_body: bytes = b"",
    ) -> None:
        done = jobs_pb2.IdempotencyRecord()
        done.CopyFrom(record)
        done.state = IS.IDEMPOTENCY_STATE_COMPLETED
        done.status = answer.status
        headers = dict(answer.headers)
        headers.setdefault("content-type", answer.media_type)
        for name, value in headers.items():
            if name.lower() in _STORED_HEADERS:
                done.headers.append(jobs_pb2.Header(name=name.lower(), value=value))
        done.stream = answer.stream is not None
        done.body = stream_body if done.stream else answer.body
        job_id = answer.headers.get(JOB_ID_HEADER)
        if job_id:
            done.job_id = job_id
        try:
            await self.kv.update(kv_key, done.SerializeToString(), last=revision)
        except KeyWrongLastSequenceError:
            # A duplicate completed it from the lifecycle event first: same outcome.
            pass
        except NATS_FAILURES:
            # Left in flight: the lifecycle event completes it for the next duplicate.
            log.warning("idempotency record %s not completed", kv_key[:12])

    async def _release(self, kv_key: str, revision: int) -> None:
        """Deletes the record if it is still at ``revision``. A delete with a stale
        revision fails as a plain BadRequestError (err_code 10071), not as
        KeyWrongLastSequenceError, so every NATS failure is swallowed here."""
        with contextlib.suppress(*NATS_FAILURES):
            await self.kv.delete(kv_key, last=revision)

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
        answer = HttpAnswer(
            status=err.status,
            headers=problem_headers(err),
            media_type=PROBLEM_CONTENT_TYPE,
            body=render_problem(
                err, instance=ctx.instance, request_id=ctx.request_id, trace_id=ctx.trace_id
            ),
        )
        await self._store(kv_key, revision, record, answer)

    # --- duplicates -----------------------------------------------------------------

    async def _existing(self, kv_key: str, fp: str, req: IdempotentRequest) -> HttpAnswer | None:
        """The answer for a duplicate, or None when the key is free again."""
        try:
            entry = await self.kv.get(kv_key)
        except KeyNotFoundError:
            return None
        except NATS_FAILURES:
            raise _store_unavailable() from None
        existing = jobs_pb2.IdempotencyRecord()
        try:
            existing.ParseFromString(entry.value or b"")
        except DecodeError:
            existing = jobs_pb2.IdempotencyRecord()
        revision = int(entry.revision or 0)
        now = _now_ms()
        if not existing.fingerprint or existing.expires_unix_ms < now:
            await self._release(kv_key, revision)
            return None
        if existing.fingerprint != fp:
            raise SluiceError(
                ErrorCode.IDEMPOTENCY_KEY_REUSED,
                "This Idempotency-Key was used with a different request body.",
                details={"request_id": existing.request_id},
            )
        if existing.state == IS.IDEMPOTENCY_STATE_COMPLETED:
            return await self._replay(existing, req)
        lifecycle: lifecycle_pb2.LifecycleEvent | None = None
        if not req.quick:
            lifecycle = await self._lifecycle_event(existing.request_id)
            if lifecycle is not None and lifecycle.HasField("finished"):
                finished = lifecycle
                if finished.finished.outcome == "cancelled":
                    # Stopped because its client left (x-sluice-on-disconnect: cancel):
                    # nothing to replay, the retry runs.
                    await self._release(kv_key, revision)
                    return None
                completed = self._from_lifecycle(existing, finished.finished, req.ctx)
                with contextlib.suppress(*NATS_FAILURES):
                    await self.kv.update(kv_key, completed.SerializeToString(), last=revision)
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
                return HttpAnswer(
                    status=200,
                    headers={
                        "cache-control": "no-cache",
                        "x-accel-buffering": "no",
                        REPLAYED: "true",
                        "x-sluice-request-id": existing.request_id,
                    },
                    media_type=SSE,
                    stream=stream,
                )
        raise self._in_use(existing, await self._tokens(existing.request_id), lifecycle)

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
                    "elapsed_ms": max(0, _now_ms() - record.created_unix_ms),
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

    async def _replay(
        self, record: jobs_pb2.IdempotencyRecord, req: IdempotentRequest
    ) -> HttpAnswer:
        headers = {h.name: h.value for h in record.headers}
        media_type = headers.pop("content-type", JSON)
        headers[REPLAYED] = "true"
        if record.stream and not record.body:
            return HttpAnswer(
                status=record.status or 200,
                headers=headers,
                media_type=SSE,
                stream=await self._stream(record, req),
            )
        return HttpAnswer(
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
        done.state = IS.IDEMPOTENCY_STATE_COMPLETED
        if record.stream:
            done.status = 200
            done.headers.append(jobs_pb2.Header(name="content-type", value=SSE))
            return done
        if finished.HasField("final"):
            meta = RequestMeta(record.request_id, "", record.model)
            done.status = 200
            done.body = completion_body(meta, finished.final, cache_hit=False)
            done.headers.append(jobs_pb2.Header(name="content-type", value=JSON))
            return done
        err = failure_error(finished.failure, {})
        done.status = err.status
        done.body = render_problem(
            err, instance=ctx.instance, request_id=record.request_id, trace_id=""
        )
        done.headers.append(jobs_pb2.Header(name="content-type", value=PROBLEM_CONTENT_TYPE))
        return done

    # --- lookups on the streams -------------------------------------------------------

    async def _lifecycle_event(self, request_id: str) -> lifecycle_pb2.LifecycleEvent | None:
        """The request's last lifecycle event (``started`` or ``finished``), if any."""
        try:
            raw = await self.bus.js.get_last_msg(
                Streams.LIFECYCLE.name, Subjects.lifecycle(request_id)
            )
        except (NotFoundError, *NATS_FAILURES):
            return None
        event = lifecycle_pb2.LifecycleEvent()
        try:
            event.ParseFromString(raw.data or b"")
        except DecodeError:
            return None
        return event

    async def _last_stream_event(self, request_id: str) -> inference_pb2.StreamEvent | None:
        try:
            raw = await self.bus.js.get_last_msg(Streams.STREAMS.name, Subjects.stream(request_id))
        except (NotFoundError, *NATS_FAILURES):
            return None
        event = inference_pb2.StreamEvent()
        try:
            event.ParseFromString(raw.data or b"")
        except DecodeError:
            return None
        return event

    async def _queued(self, request_id: str) -> bool:
        """True once the request's stream is open (its work is queued or about to be)."""
        return await self._last_stream_event(request_id) is not None

    async def _started(self, request_id: str) -> bool:
        """True once the worker published anything for the request: a token or its
        outcome. The opening record alone (sequence 0) is the gateway's own."""
        event = await self._last_stream_event(request_id)
        return event is not None and not event.HasField("opened")

    async def _tokens(self, request_id: str) -> int:
        event = await self._last_stream_event(request_id)
        if event is None:
            return 0
        if event.HasField("delta"):
            return int(event.sequence)
        if event.HasField("final"):
            return int(event.final.usage.output_tokens)
        return int(event.failure.partial_usage.output_tokens)


def _store_unavailable() -> GatewayError:
    return GatewayError(
        ErrorCode.SERVICE_UNAVAILABLE,
        "The idempotency store did not answer.",
        retry_after_ms=1000,
    )
