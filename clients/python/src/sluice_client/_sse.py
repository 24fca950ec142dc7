"""Server-Sent Events: an incremental parser (WHATWG rules: ``id``, ``event``, ``data``,
``retry``, comments) and the bookkeeping that lets a resumed stream yield every event
exactly once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SseEvent:
    """One dispatched event. ``id`` is the raw ``id:`` field (``None`` when absent)."""

    data: str
    event: str | None = None
    id: str | None = None
    retry_ms: int | None = None


@dataclass
class SseParser:
    """Feed it bytes as they arrive; it returns the events completed by a blank line. An
    event cut off by a dropped connection is never returned."""

    _buffer: bytes = b""
    _data: list[str] = field(default_factory=list)
    _event: str | None = None
    _id: str | None = None
    _retry: int | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += chunk
        out: list[SseEvent] = []
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                return out
            raw, self._buffer = self._buffer[:newline], self._buffer[newline + 1 :]
            line = raw.removesuffix(b"\r").decode("utf-8", "replace")
            if not line:
                if self._data or self._event is not None:
                    out.append(SseEvent("\n".join(self._data), self._event, self._id, self._retry))
                self._data, self._event, self._retry = [], None, None
                # The id sticks until changed (the spec's "last event id"); events here
                # carry their own, so forget it to tell an id-less event apart.
                self._id = None
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
            elif name == "id":
                self._id = value
            elif name == "retry" and value.isdigit():
                self._retry = int(value)


def split_id(event_id: str | None) -> tuple[str, int] | None:
    """``<request_id>:<sequence>`` into its parts (``None`` for another shape)."""
    if not event_id:
        return None
    stream, sep, seq = event_id.rpartition(":")
    if not sep or not seq.isdigit():
        return None
    return stream, int(seq)


def is_plain_delta(data: str) -> bool:
    """Whether a chunk is a delta the gateway sends as one event of its own: choices,
    none finishing, no usage, no ``sluice`` (the end of a stream is several events
    under one sequence, each with one of these)."""
    try:
        chunk = json.loads(data)
    except ValueError:
        return False
    if not isinstance(chunk, dict) or chunk.get("usage") or chunk.get("sluice"):
        return False
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    return all(isinstance(c, dict) and not c.get("finish_reason") for c in choices)


@dataclass
class ExactlyOnce:
    """Which events of a resumed stream are new.

    The gateway numbers a stream's events (``id: <request_id>:<sequence>``). A delta is
    one event; the end of a stream may be several events under one sequence (finish
    chunks, the usage chunk, the ``sluice`` chunk). So when the last event seen was a
    delta (``mark(single=True)``) a resume starts after it; otherwise one sequence
    before it, and of the events under the last sequence the first ``count`` (those
    already yielded) are dropped again: nothing is lost when a connection broke between
    two events of one sequence, and nothing comes twice. Starting after a delta matters
    with token batching on the gateway (several deltas in one event, carrying the id of
    the last): a live tail merged from before the resume point could otherwise repeat
    text. Any replay from the start (a re-sent POST attaching to its first run) is
    filtered the same way.
    """

    last: int = 0
    count: int = 0
    single: bool = False
    _conn_seq: int = -1
    _conn_count: int = 0

    def new_connection(self) -> None:
        self._conn_seq, self._conn_count = -1, 0

    def accept(self, sequence: int) -> bool:
        """Whether the event numbered ``sequence`` on this connection is new."""
        if sequence != self._conn_seq:
            self._conn_seq, self._conn_count = sequence, 0
        self._conn_count += 1
        if sequence < self.last:
            return False
        if sequence > self.last:
            self.last, self.count, self.single = sequence, 1, False
            return True
        if self._conn_count > self.count:
            self.count += 1
            self.single = False
            return True
        return False

    def mark(self, *, single: bool) -> None:
        """Says whether the event just accepted is the whole of its sequence."""
        self.single = single and self.count == 1

    @property
    def resume_after(self) -> int:
        return self.last if self.single else max(0, self.last - 1)
