"""The SSE body of a streamed answer: the worker's events relayed as they arrive, in the
request's dialect, with heartbeats while idle and an ``event: error`` when it fails
mid-way; shared by live requests, resumes and idempotent replays."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from sluice.deltas import can_join, join, mergeable
from sluice.errors import SluiceError
from sluice.inference.v1 import inference_pb2
from sluice.metrics import Instruments

from services.gateway.domain.admission import DisconnectPolicy
from services.gateway.domain.dialects.common import (
    ErrorRenderer,
    RequestMeta,
    StreamRenderer,
    final_sluice,
    interrupted_sluice,
    sse_retry,
)
from services.gateway.domain.ports import LiveEvents, StreamStore
from services.gateway.domain.problems import (
    failure_error,
    insufficient_confidence,
    render_problem,
    timeout_error,
    with_member,
)
from services.gateway.domain.relay.reader import Backfill, DeadlineExceeded, EventReader
from services.gateway.settings import GatewaySettings

SERVICE = "gateway"
# At most this many events already waiting are written to the client in one send.
_COALESCE_MAX_EVENTS = 64


class StreamRelay:
    def __init__(
        self, settings: GatewaySettings, streams: StreamStore, instruments: Instruments
    ) -> None:
        self.settings = settings
        self.streams = streams
        self.instruments = instruments
        self.open_streams = 0

    def reader(
        self, request_id: str, live: LiveEvents, deadline: float, last_sequence: int = 0
    ) -> EventReader:
        """A reader of ``live`` that fills gaps from the stored stream."""
        return EventReader(
            live, deadline, last_sequence=last_sequence, backfill=self._backfill(request_id)
        )

    async def relay(
        self,
        *,
        reader: EventReader,
        relay: StreamRenderer,
        meta: RequestMeta,
        first: inference_pb2.StreamEvent | None,
        instance: str,
        prelude: bytes = b"",
        on_disconnect: DisconnectPolicy = DisconnectPolicy.CONTINUE,
        wait_first: bool = False,
        render_error: ErrorRenderer = render_problem,
    ) -> AsyncIterator[bytes]:
        """The SSE body: the ``retry:`` hint, ``prelude`` (events replayed to a resuming
        client), then the live events until the terminal one, with heartbeats while idle.
        A client that leaves early under the ``cancel`` policy cancels the generation.
        ``render_error`` writes the body of a mid-stream ``error`` event."""
        self.open_streams += 1
        self.instruments.open_streams.add(1)
        heartbeat = self.settings.sse_heartbeat_seconds
        ended = False
        try:
            # The retry hint rides on the first event that carries data.
            hint = sse_retry(self.settings.sse_retry_ms)
            if prelude:
                yield hint + prelude
                hint = b""
            event = first
            # With wait_first (a resumed stream) the first wait is for an event, and a
            # heartbeat only follows if none comes.
            read = first is None and wait_first
            while True:
                if read:
                    try:
                        event = await reader.next(heartbeat)
                    except DeadlineExceeded:
                        ended = True
                        problem = self.problem(timeout_error({}), meta, instance, render_error)
                        yield hint + relay.failure(reader.last_sequence + 1, problem)
                        return
                read = True
                if event is None:
                    yield relay.heartbeat()
                    continue
                # The events already here go out in one write: nothing waits for them,
                # and a burst costs one send instead of one per event.
                out = [hint]
                hint = b""
                while True:
                    pending: inference_pb2.StreamEvent | None = None
                    if event.HasField("delta"):
                        if meta.ttft_ms is None:
                            meta.ttft_ms = (time.perf_counter() - meta.started) * 1000
                        event, pending = await self._batch(reader, event)
                        meta.tally.add_delta(event.delta)
                        out.append(relay.delta(event.sequence, event.delta))
                    elif event.HasField("final") or event.HasField("failure"):
                        ended = True
                        out.append(self.ending(relay, meta, event, instance, render_error))
                        break
                    if pending is not None:
                        event = pending
                        continue
                    if len(out) > _COALESCE_MAX_EVENTS or not reader.has_ready():
                        break
                    ready = await reader.next(0.0, look_in_store=False)
                    if ready is None:
                        break
                    event = ready
                yield b"".join(out)
                if ended:
                    return
        finally:
            self.count_backfilled(reader)
            self.open_streams -= 1
            self.instruments.open_streams.add(-1)
            await reader.live.close()
            if not ended and on_disconnect is DisconnectPolicy.CANCEL:
                await self.streams.cancel(meta.request_id, "client_disconnected")

    async def _batch(
        self, reader: EventReader, event: inference_pb2.StreamEvent
    ) -> tuple[inference_pb2.StreamEvent, inference_pb2.StreamEvent | None]:
        """Token batching: merges the text deltas that follow ``event`` (same choice) up
        to ``sse_batch_max_deltas`` or ``sse_batch_max_ms``. Returns the event to send
        and the first event read that could not be merged."""
        limit = self.settings.sse_batch_max_deltas
        if limit <= 1 or not mergeable(event.delta):
            return event, None
        until = time.monotonic() + self.settings.sse_batch_max_ms / 1000
        merged: inference_pb2.StreamEvent | None = None
        count = 1
        while count < limit:
            try:
                nxt = await reader.next(max(0.0, until - time.monotonic()), look_in_store=False)
            except DeadlineExceeded:
                break
            if nxt is None:
                break
            if not (nxt.HasField("delta") and can_join(event.delta, nxt.delta)):
                return merged or event, nxt
            if merged is None:
                merged = inference_pb2.StreamEvent()
                merged.CopyFrom(event)
            join(merged.delta, nxt.delta)
            merged.sequence = nxt.sequence
            count += 1
        return merged or event, None

    def _backfill(self, request_id: str) -> Backfill:
        """Reads the events ``SLUICE_STREAMS`` holds for ``request_id`` after a sequence."""
        streams = self.streams
        wait = self.settings.resume_read_timeout_seconds

        async def stored_after(sequence: int) -> list[inference_pb2.StreamEvent]:
            events = await streams.stored(request_id, wait_seconds=wait)
            return [e for e in events or () if e.sequence > sequence]

        return stored_after

    def count_backfilled(self, reader: EventReader) -> None:
        if reader.backfilled:
            self.instruments.stream_backfilled.add(reader.backfilled)
            reader.backfilled = 0

    def ending(
        self,
        relay: StreamRenderer,
        meta: RequestMeta,
        event: inference_pb2.StreamEvent,
        instance: str,
        render_error: ErrorRenderer = render_problem,
    ) -> bytes:
        """The last event of a stream, with the answer's ``sluice`` status: the final
        chunk, or an error event. A stream that broke after output says, in the error
        event's ``sluice``, that what the client holds is a prefix; an answer below the
        caller's minimum confidence ends with ``insufficient_confidence`` instead."""
        if event.HasField("final"):
            sluice = final_sluice(meta, event.final, cache_hit=False)
            verdict = meta.verdict
            if verdict is None or not verdict.insufficient:
                return relay.final(event.sequence, event.final, sluice)
            err: SluiceError = insufficient_confidence(verdict, meta.checks, {})
            problem = self.problem(err, meta, instance, render_error)
            return relay.failure(event.sequence, with_member(problem, "sluice", sluice))
        err = failure_error(event.failure, {})
        problem = self.problem(err, meta, instance, render_error)
        if meta.tally.has_output:
            problem = with_member(problem, "sluice", interrupted_sluice(meta))
        return relay.failure(event.sequence, problem)

    def problem(
        self,
        err: SluiceError,
        meta: RequestMeta,
        instance: str,
        render_error: ErrorRenderer = render_problem,
    ) -> bytes:
        self.instruments.errors.add(1, {"code": str(err.code), "service": SERVICE})
        return render_error(
            err, instance=instance, request_id=meta.request_id, trace_id=meta.trace_id
        )
