"""Reading one request's stream events in order, exactly once each."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from sluice.inference.v1 import inference_pb2

from services.gateway.domain.ports import LiveEvents

log = logging.getLogger(__name__)


class DeadlineExceeded(Exception):
    pass


# Reads what ``SLUICE_STREAMS`` holds for the request after a sequence.
Backfill = Callable[[int], Awaitable[list[inference_pb2.StreamEvent]]]


# A gap may be a publish the stream has not stored yet: look again this often.
_BACKFILL_ATTEMPTS = 3


_BACKFILL_PAUSE_SECONDS = 0.05


@dataclass
class EventReader:
    """Reads one request's stream events: skips the opening record, drops duplicate and
    stale deltas (sequence at or below the last one relayed), accepts the first terminal
    event whatever its sequence.

    The live subscription is a core NATS subscription: a connection that was cut, or
    one the server dropped as a slow consumer, misses events that ``SLUICE_STREAMS``
    still holds. With ``backfill`` the reader fills such gaps from the stream before
    going on (an event numbered past the next one expected), and looks there when the
    subject has been quiet for a whole wait, so a lost terminal event cannot leave the
    request hanging until its deadline. Every event then reaches the client once, in
    order."""

    live: LiveEvents
    deadline: float
    last_sequence: int = 0
    backfill: Backfill | None = None
    backfilled: int = 0
    _seen_terminal: bool = field(default=False)
    _ready: deque[inference_pb2.StreamEvent] = field(default_factory=deque)

    async def next(
        self, max_wait: float, *, look_in_store: bool = True
    ) -> inference_pb2.StreamEvent | None:
        """The next event, or None after ``max_wait`` without one. ``look_in_store``
        False skips the store after a quiet wait (short waits, such as token batching)."""
        while True:
            while self._ready:
                event = self._ready.popleft()
                if self._accept(event):
                    return event
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded
            data = await self.live.get(min(remaining, max_wait))
            if data is None:
                if time.monotonic() >= self.deadline:
                    raise DeadlineExceeded
                if look_in_store and self.backfill is not None and await self._fill_idle():
                    continue
                return None
            event = inference_pb2.StreamEvent()
            try:
                event.ParseFromString(data)
            except DecodeError:
                log.warning("undecodable stream event dropped")
                continue
            if self.backfill is not None and self._skips_ahead(event):
                await self._fill_gap(event)
                continue
            if self._accept(event):
                return event

    def has_ready(self) -> bool:
        """True when an event can be read without waiting."""
        return bool(self._ready) or self.live.ready()

    def _accept(self, event: inference_pb2.StreamEvent) -> bool:
        kind = event.WhichOneof("body")
        if kind == "delta":
            if event.sequence <= self.last_sequence:
                return False
            self.last_sequence = event.sequence
            return True
        if kind not in ("final", "failure") or self._seen_terminal:
            # The opening record (sequence 0) or a second terminal event.
            return False
        self._seen_terminal = True
        return True

    def _skips_ahead(self, event: inference_pb2.StreamEvent) -> bool:
        if self._seen_terminal or event.WhichOneof("body") not in ("delta", "final", "failure"):
            return False
        return event.sequence > self.last_sequence + 1

    async def _fill_gap(self, event: inference_pb2.StreamEvent) -> None:
        """Queue the stored events between the last one relayed and ``event``, then it."""
        wanted = event.sequence - self.last_sequence - 1
        found: dict[int, inference_pb2.StreamEvent] = {}
        for attempt in range(_BACKFILL_ATTEMPTS):
            stored = await self._read_store()
            if stored is None:
                break  # the live event still goes out; the gap is logged below
            for e in stored:
                if self.last_sequence < e.sequence < event.sequence and e.HasField("delta"):
                    found.setdefault(e.sequence, e)
            if len(found) >= wanted or attempt == _BACKFILL_ATTEMPTS - 1:
                break
            await asyncio.sleep(_BACKFILL_PAUSE_SECONDS)
        if len(found) < wanted:
            log.warning("stream gap: %d of %d events not in the store", wanted - len(found), wanted)
        self.backfilled += len(found)
        self._ready.extend(found[s] for s in sorted(found))
        self._ready.append(event)

    async def _read_store(self) -> list[inference_pb2.StreamEvent] | None:
        """The stored events after the last one relayed; None when the store failed."""
        assert self.backfill is not None
        try:
            return await self.backfill(self.last_sequence)
        except Exception as exc:
            log.warning("stream backfill failed: %s", type(exc).__name__)
            return None

    async def _fill_idle(self) -> bool:
        """After a quiet wait: queue whatever the store holds past the last event."""
        stored = await self._read_store()
        if stored is None:
            return False
        fresh = sorted(
            (e for e in stored if e.WhichOneof("body") in ("delta", "final", "failure")),
            key=lambda e: e.sequence,
        )
        self.backfilled += len(fresh)
        self._ready.extend(fresh)
        return bool(fresh)
