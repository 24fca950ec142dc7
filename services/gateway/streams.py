"""Resumable streams: ``GET /v1/streams/{request_id}`` with ``Last-Event-ID`` or
``?after=N`` replays what a client missed from ``SLUICE_STREAMS``, then the live tail.

No state lives in the gateway, so any replica (or a restarted one) can serve a resume:

1. subscribe to the request's live subject first, into a buffer;
2. read the stored history (an ephemeral ordered consumer over the request's subject);
3. check ownership against the ``StreamOpened`` record at sequence 0 (same team as the
   API key, else 404 like an unknown id);
4. render the stored events after N (the ones up to N only feed the renderer's state,
   so roles and finish chunks come out as in the original stream);
5. relay the buffered and later live events, dropping every sequence already replayed.

The live subscription exists before the history is read, so an event published in
between is in the buffer or in the history (or both, and then dropped as a duplicate):
no gap, no duplicate.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable

from nats.aio.subscription import Subscription
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2
from sluice.keys.v1 import keys_pb2
from sluice.replay import History, read_history
from sluice.topology import Subjects

from services.gateway.adapters import NATS_FAILURES
from services.gateway.chat import (
    SSE_HEADERS,
    ChatResult,
    ChatService,
    EventReader,
    failure_error,
)
from services.gateway.inbox import Inbox
from services.gateway.problems import unavailable
from services.gateway.render import RequestMeta, SseRelay, final_sluice, sse_retry

# Request ids are one NATS subject token: no dots, wildcards or spaces.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


def parse_resume_point(last_event_id: str | None, after: int | None, request_id: str) -> int:
    """The last sequence the client saw: ``Last-Event-ID`` (``<request_id>:<n>``, what
    EventSource sends on reconnect) wins over ``?after=N``; neither means from the start.
    """
    if last_event_id is not None and last_event_id.strip():
        rid, sep, seq = last_event_id.strip().rpartition(":")
        if not sep or rid != request_id or not seq.isdigit():
            raise SluiceError(
                ErrorCode.INVALID_REQUEST,
                "Last-Event-ID must be '<request_id>:<sequence>' for this stream.",
                param="Last-Event-ID",
            )
        return int(seq)
    if after is not None:
        if after < 0:
            raise SluiceError(ErrorCode.INVALID_REQUEST, "after must be 0 or more.", param="after")
        return after
    return 0


def _not_found() -> SluiceError:
    return SluiceError(
        ErrorCode.NOT_FOUND,
        "No stream with this request id is known to this key (unknown, expired, or "
        "another team's).",
    )


def render_replay(
    history: History,
    after: int,
    relay: SseRelay,
    meta: RequestMeta,
    problem: Callable[[inference_pb2.Failure], bytes],
) -> tuple[bytes, bool]:
    """SSE bytes for the stored events after ``after``, and whether the stream ended."""
    out: list[bytes] = []
    for event in history.events:
        if event.HasField("delta"):
            rendered = relay.delta(event.sequence, event.delta)
            if event.sequence > after:
                out.append(rendered)
        elif event.sequence > after:
            if event.HasField("final"):
                sluice = final_sluice(meta, event.final, cache_hit=False)
                out.append(relay.final(event.sequence, event.final, sluice))
            else:
                out.append(relay.failure(event.sequence, problem(event.failure)))
    return b"".join(out), history.terminal is not None


class ChatServiceProblem:
    """Renders a stored ``Failure`` as the problem JSON of an ``event: error``."""

    def __init__(self, chat: ChatService, meta: RequestMeta, instance: str) -> None:
        self._chat = chat
        self._meta = meta
        self._instance = instance

    def __call__(self, failure: inference_pb2.Failure) -> bytes:
        err = failure_error(failure, {})
        return self._chat.stream_problem(err, self._meta, self._instance)


class StreamResumer:
    def __init__(self, chat: ChatService) -> None:
        self.chat = chat
        self.settings = chat.settings

    async def resume(
        self,
        key: keys_pb2.ApiKeyRecord,
        request_id: str,
        after: int,
        *,
        trace_id: str,
        instance: str,
    ) -> ChatResult:
        if not _REQUEST_ID.match(request_id):
            raise _not_found()
        nc = self.chat.bus.nc
        inbox = Inbox()
        try:
            sub = await nc.subscribe(Subjects.stream(request_id), cb=inbox.push)
        except NATS_FAILURES:
            raise unavailable("The message bus is not connected.") from None
        try:
            history = await read_history(
                self.chat.bus, request_id, wait_seconds=self.settings.resume_read_timeout_seconds
            )
        except BaseException as exc:
            await _unsubscribe(sub)
            if isinstance(exc, NATS_FAILURES):
                raise unavailable("The stream store did not answer.") from None
            raise
        opened = history.opened if history is not None else None
        if history is None or opened is None or opened.team_id != key.team_id:
            await _unsubscribe(sub)
            raise _not_found()

        meta = RequestMeta(request_id, trace_id, opened.model_requested)
        if opened.created_unix:
            meta.created = opened.created_unix
        relay = SseRelay(meta, include_usage=opened.include_usage)
        problem = ChatServiceProblem(self.chat, meta, instance)
        prelude, ended = render_replay(history, after, relay, meta, problem)
        headers = dict(SSE_HEADERS)
        headers["x-sluice-resumed-after"] = str(after)
        if ended:
            await _unsubscribe(sub)
            body = sse_retry(self.settings.sse_retry_ms) + prelude if prelude else b""

            async def finished() -> AsyncIterator[bytes]:
                yield body

            return ChatResult(headers, stream=finished())
        deadline = time.monotonic() + self.settings.request_timeout_seconds
        reader = EventReader(
            inbox,
            deadline,
            last_sequence=max(after, history.last_sequence),
            backfill=self.chat.backfill(request_id),
        )
        return ChatResult(
            headers,
            stream=self.chat.relay(
                sub=sub,
                reader=reader,
                relay=relay,
                meta=meta,
                first=None,
                instance=instance,
                prelude=prelude,
                wait_first=True,
            ),
        )


async def _unsubscribe(sub: Subscription) -> None:
    with contextlib.suppress(*NATS_FAILURES):
        await sub.unsubscribe()
