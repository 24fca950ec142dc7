"""What one request's token stream already holds in ``SLUICE_STREAMS``.

Stream events are core publishes captured by the ``SLUICE_STREAMS`` JetStream stream,
one subject per request (``Subjects.stream(request_id)``). Three readers need them back:
the gateway resuming a client (``Last-Event-ID`` / ``?after=N``), the gateway checking
who owns a stream (the ``StreamOpened`` event at sequence 0), and a worker taking over
a request from a worker that died (what was already published, to continue after it).

``read_history`` reads a subject once with an ephemeral ordered consumer (no ack, no
state left behind); ``History`` is the pure part: events by sequence, deduplicated,
with the partial answer per choice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from sluice.bus import Bus
from sluice.inference.v1 import inference_pb2
from sluice.topology import Streams, Subjects


@dataclass
class History:
    """The stored events of one request: the opening record and the numbered events
    (deltas and at most one terminal ``Final``/``Failure``), sorted and deduplicated."""

    opened: inference_pb2.StreamOpened | None = None
    events: list[inference_pb2.StreamEvent] = field(default_factory=list)

    @classmethod
    def build(cls, events: Iterable[inference_pb2.StreamEvent]) -> History:
        opened: inference_pb2.StreamOpened | None = None
        by_sequence: dict[int, inference_pb2.StreamEvent] = {}
        terminal: inference_pb2.StreamEvent | None = None
        for event in events:
            kind = event.WhichOneof("body")
            if kind == "opened":
                if opened is None:
                    opened = event.opened
                continue
            if kind is None or event.sequence == 0:
                continue
            if kind in ("final", "failure"):
                # The first terminal event wins; anything numbered after it is noise.
                if terminal is None or event.sequence < terminal.sequence:
                    terminal = event
                continue
            by_sequence.setdefault(event.sequence, event)
        ordered = [by_sequence[s] for s in sorted(by_sequence)]
        if terminal is not None:
            ordered = [e for e in ordered if e.sequence < terminal.sequence]
            ordered.append(terminal)
        return cls(opened=opened, events=ordered)

    @property
    def last_sequence(self) -> int:
        return self.events[-1].sequence if self.events else 0

    @property
    def terminal(self) -> inference_pb2.StreamEvent | None:
        if self.events and self.events[-1].WhichOneof("body") in ("final", "failure"):
            return self.events[-1]
        return None

    def after(self, sequence: int) -> list[inference_pb2.StreamEvent]:
        """The events a client that saw ``sequence`` has missed."""
        return [e for e in self.events if e.sequence > sequence]

    def deltas(self) -> list[inference_pb2.Delta]:
        return [e.delta for e in self.events if e.HasField("delta")]

    def partial_content(self) -> dict[int, str]:
        """The text already published, per choice index."""
        parts: dict[int, list[str]] = {}
        for delta in self.deltas():
            if delta.content:
                parts.setdefault(delta.choice_index, []).append(delta.content)
        return {index: "".join(texts) for index, texts in parts.items()}

    def continuable(self) -> bool:
        """True when the published output is plain text of one unfinished choice, which
        a provider can continue from an assistant prefill."""
        for delta in self.deltas():
            if delta.choice_index != 0 or delta.tool_calls or delta.refusal:
                return False
            if delta.finish_reason:
                return False
        return True


def decode_event(data: bytes) -> inference_pb2.StreamEvent | None:
    event = inference_pb2.StreamEvent()
    try:
        event.ParseFromString(data)
    except DecodeError:
        return None
    return event


async def read_events(
    bus: Bus, request_id: str, *, wait_seconds: float = 5.0
) -> list[inference_pb2.StreamEvent] | None:
    """Every stored event of ``request_id`` in stream order; None when the stream holds
    nothing for it (an unknown request, or one older than the stream's retention)."""
    subject = Subjects.stream(request_id)
    stream = Streams.STREAMS.name
    last_seq = await bus.last_sequence(stream, subject)
    if last_seq is None:
        return None
    events: list[inference_pb2.StreamEvent] = []
    done = asyncio.Event()

    # A callback, not next_msg(): next_msg costs a task and a wait_for per message.
    async def collect(msg: Msg) -> None:
        event = decode_event(msg.data)
        if event is not None:
            events.append(event)
        if msg.metadata.sequence.stream >= last_seq:
            done.set()

    sub = await bus.follow(subject, stream, collect)
    try:
        await asyncio.wait_for(done.wait(), wait_seconds)
    finally:
        await bus.unsubscribe(sub)
    return events


async def read_history(bus: Bus, request_id: str, *, wait_seconds: float = 5.0) -> History | None:
    events = await read_events(bus, request_id, wait_seconds=wait_seconds)
    return None if events is None else History.build(events)
