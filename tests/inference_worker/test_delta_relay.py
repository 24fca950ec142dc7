"""Deltas that reach the worker together leave as one stream event; the first never
waits, and nothing is held past the next turn of the event loop or a terminal event."""

from __future__ import annotations

import asyncio

from sluice.common.v1 import chat_pb2
from sluice.inference.v1 import inference_pb2

from services.inference_worker.domain.engine import _DeltaRelay, _Request


class Published:
    """An ``EventSink`` that keeps the stream events (the relay uses no other method)."""

    def __init__(self) -> None:
        self.events: list[inference_pb2.StreamEvent] = []

    async def stream_event(self, subject: str, event: inference_pb2.StreamEvent) -> None:
        self.events.append(event)


def text(content: str, **fields: object) -> inference_pb2.Delta:
    return inference_pb2.Delta(content=content, **fields)  # type: ignore[arg-type]


def relay_for() -> tuple[_DeltaRelay, _Request, Published]:
    req = _Request(
        work=inference_pb2.InferenceWork(request_id="req-1"),
        subject="sluice.v1.stream.req-1",
        picked_up=0.0,
        queue_wait_us=0,
        deadline=None,
    )
    sink = Published()
    return _DeltaRelay(req, sink), req, sink  # type: ignore[arg-type]


async def test_a_burst_leaves_as_one_event_after_the_first() -> None:
    relay, req, sink = relay_for()
    await relay(text("Hel", role="assistant"))
    assert [e.delta.content for e in sink.events] == ["Hel"], "the first token goes at once"
    for part in ("lo", ",", " world"):
        await relay(text(part))
    await asyncio.sleep(0)  # the loop turns: the held delta leaves
    await asyncio.sleep(0)
    assert [(e.sequence, e.delta.content) for e in sink.events] == [(1, "Hel"), (2, "lo, world")]
    assert req.sequence == 2


async def test_a_boundary_flushes_what_is_held_and_keeps_the_order() -> None:
    relay, req, sink = relay_for()
    await relay(text("a", role="assistant"))
    await relay(text("b"))
    await relay(text("c"))
    await relay(inference_pb2.Delta(finish_reason="stop"))
    await relay(text("x", choice_index=1))
    await relay(text("y", choice_index=0))
    await relay.flush()
    got = [
        (e.sequence, e.delta.choice_index, e.delta.content, e.delta.finish_reason)
        for e in sink.events
    ]
    assert got == [
        (1, 0, "a", ""),
        (2, 0, "bc", ""),
        (3, 0, "", "stop"),
        (4, 1, "x", ""),
        (5, 0, "y", ""),
    ]
    assert req.relayed.choices()[0].content == "abcy"


async def test_tokens_that_arrive_apart_leave_apart() -> None:
    relay, _, sink = relay_for()
    for part in ("one", " two", " three"):
        await relay(text(part))
        await asyncio.sleep(0.001)
    assert [e.delta.content for e in sink.events] == ["one", " two", " three"]


async def test_the_caller_keeps_its_delta() -> None:
    relay, _, sink = relay_for()
    await relay(text("a"))
    second = text("b")
    await relay(second)
    await relay(text("c"))
    await relay.flush()
    assert second.content == "b"
    assert [e.delta.content for e in sink.events] == ["a", "bc"]


async def test_joined_deltas_keep_every_tokens_logprobs() -> None:
    def lp(token: str, value: float) -> chat_pb2.Logprobs:
        return chat_pb2.Logprobs(content=[chat_pb2.TokenLogprob(token=token, logprob=value)])

    relay, _req, sink = relay_for()
    await relay(text("A", role="assistant", logprobs=lp("A", -0.1)))
    await relay(text("B", logprobs=lp("B", -0.2)))
    await relay(text("C", logprobs=lp("C", -0.3)))
    await relay.flush()
    assert [e.delta.content for e in sink.events] == ["A", "BC"]
    joined = sink.events[1].delta.logprobs.content
    assert [(t.token, t.logprob) for t in joined] == [("B", -0.2), ("C", -0.3)]
