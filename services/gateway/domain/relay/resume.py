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

import re
import time
from collections.abc import AsyncIterator, Callable

from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2
from sluice.keys.v1 import keys_pb2
from sluice.replay import History

from services.gateway.domain.dialects.common import RequestMeta, StreamRenderer, sse_retry
from services.gateway.domain.dialects.registry import dialect_named
from services.gateway.domain.exchange import SSE_HEADERS, Answer
from services.gateway.domain.ports import StreamStore
from services.gateway.domain.relay.sse import StreamRelay
from services.gateway.domain.verdict import Checks
from services.gateway.settings import GatewaySettings

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
    relay: StreamRenderer,
    meta: RequestMeta,
    ending: Callable[[inference_pb2.StreamEvent], bytes],
) -> tuple[bytes, bool]:
    """SSE bytes for the stored events after ``after``, and whether the stream ended.
    ``ending`` renders the final or failure event (with the answer's status)."""
    out: list[bytes] = []
    for event in history.events:
        if event.HasField("delta"):
            meta.tally.add_delta(event.delta)
            rendered = relay.delta(event.sequence, event.delta)
            if event.sequence > after:
                out.append(rendered)
        elif event.sequence > after and (event.HasField("final") or event.HasField("failure")):
            out.append(ending(event))
    return b"".join(out), history.terminal is not None


class StreamResumer:
    def __init__(self, settings: GatewaySettings, streams: StreamStore, relay: StreamRelay) -> None:
        self.settings = settings
        self.streams = streams
        self.relay = relay

    async def resume(
        self,
        key: keys_pb2.ApiKeyRecord,
        request_id: str,
        after: int,
        *,
        trace_id: str,
        instance: str,
    ) -> Answer:
        if not _REQUEST_ID.match(request_id):
            raise _not_found()
        live = await self.streams.watch(request_id)
        try:
            events = await self.streams.stored(
                request_id, wait_seconds=self.settings.resume_read_timeout_seconds
            )
        except BaseException:
            await live.close()
            raise
        history = None if events is None else History.build(events)
        opened = history.opened if history is not None else None
        if history is None or opened is None or opened.team_id != key.team_id:
            await live.close()
            raise _not_found()

        meta = RequestMeta(request_id, trace_id, opened.model_requested)
        if opened.created_unix:
            meta.created = opened.created_unix
        meta.checks = Checks.from_proto(opened.checks)
        meta.prompt_tokens = opened.prompt_tokens
        # In the dialect the stream was opened in (an Anthropic stream resumes as one).
        dialect = dialect_named(opened.dialect)
        renderer = dialect.stream(meta, include_usage=opened.include_usage)

        def ending(event: inference_pb2.StreamEvent) -> bytes:
            return self.relay.ending(renderer, meta, event, instance, dialect.error)

        prelude, ended = render_replay(history, after, renderer, meta, ending)
        headers = dict(SSE_HEADERS)
        headers["x-sluice-resumed-after"] = str(after)
        if ended:
            await live.close()
            body = sse_retry(self.settings.sse_retry_ms) + prelude if prelude else b""

            async def finished() -> AsyncIterator[bytes]:
                yield body

            return Answer.sse(finished(), headers)
        deadline = time.monotonic() + self.settings.request_timeout_seconds
        reader = self.relay.reader(
            request_id, live, deadline, last_sequence=max(after, history.last_sequence)
        )
        stream = self.relay.relay(
            reader=reader,
            relay=renderer,
            meta=meta,
            first=None,
            instance=instance,
            prelude=prelude,
            wait_first=True,
            render_error=dialect.error,
        )
        return Answer.sse(stream, headers)
