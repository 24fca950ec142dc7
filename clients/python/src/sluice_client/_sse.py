"""Server-Sent Events: an incremental parser (WHATWG rules: ``id``, ``event``, ``data``,
``retry``, comments) and the bookkeeping that lets a resumed stream yield every event
exactly once."""

from __future__ import annotations

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


@dataclass
class ExactlyOnce:
    """Which events of a resumed stream are new.

    The gateway numbers a stream's events (``id: <request_id>:<sequence>``); a delta is
    one event, the end of the stream several events under one sequence (finish chunks,
    the usage chunk, the ``sluice`` chunk). So a resume starts one sequence before the
    last one seen (``resume_after``), and of the events under that last sequence the
    first ``count`` (those already yielded) are dropped again: nothing is lost when a
    connection broke between two events of one sequence, and nothing comes twice. Token
    batching on the gateway (several deltas in one event, carrying the id of the last)
    keeps this exact: a replay renders that last sequence as one event.
    """

    last: int = 0
    count: int = 0
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
            self.last, self.count = sequence, 1
            return True
        if self._conn_count > self.count:
            self.count += 1
            return True
        return False

    @property
    def resume_after(self) -> int:
        return max(0, self.last - 1)
