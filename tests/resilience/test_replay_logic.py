"""Unit tests of the replay and dedupe logic: stored history, resume points, the live
reader after a replay, continuation of a partial answer, and cancel memory."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from sluice import tokens
from sluice.common.v1 import chat_pb2
from sluice.errors import SluiceError
from sluice.inference.v1 import inference_pb2
from sluice.replay import History

from services.gateway.domain.dialects.common import RequestMeta, final_sluice
from services.gateway.domain.dialects.openai.response import SseRelay
from services.gateway.domain.relay.inbox import Inbox
from services.gateway.domain.relay.reader import EventReader
from services.gateway.domain.relay.resume import parse_resume_point, render_replay
from services.gateway.handlers.http.headers import disconnect_policy
from services.inference_worker.domain.resume import (
    CancelRegistry,
    can_continue,
    continuation,
    whole_usage,
)

RID = "req_abc"


def delta(seq: int, text: str, **kw: Any) -> inference_pb2.StreamEvent:
    return inference_pb2.StreamEvent(
        request_id=RID, sequence=seq, delta=inference_pb2.Delta(content=text, **kw)
    )


def opened(team: str = "team-a") -> inference_pb2.StreamEvent:
    return inference_pb2.StreamEvent(
        request_id=RID, opened=inference_pb2.StreamOpened(team_id=team, model_requested="m")
    )


def final(seq: int) -> inference_pb2.StreamEvent:
    return inference_pb2.StreamEvent(
        request_id=RID,
        sequence=seq,
        final=inference_pb2.Final(usage=chat_pb2.Usage(input_tokens=5, output_tokens=3)),
    )


def test_history_sorts_dedupes_and_cuts_after_the_terminal() -> None:
    events = [
        opened(),
        delta(2, " b"),
        delta(1, " a"),
        delta(2, " b"),  # a duplicate (e.g. replay and live overlap)
        delta(3, " c"),
        final(4),
        delta(5, " stray"),
        final(6),
    ]
    history = History.build(events)
    assert history.opened is not None and history.opened.team_id == "team-a"
    assert [e.sequence for e in history.events] == [1, 2, 3, 4]
    assert history.terminal is not None and history.terminal.sequence == 4
    assert history.partial_content() == {0: " a b c"}
    assert [e.sequence for e in history.after(2)] == [3, 4]


def test_history_continuable_only_for_one_plain_text_choice() -> None:
    assert History.build([delta(1, " a"), delta(2, " b")]).continuable()
    call = chat_pb2.ToolCall(index=0, name="f", arguments="{")
    assert not History.build([delta(1, "", tool_calls=[call])]).continuable()
    assert not History.build([delta(1, " a", choice_index=1)]).continuable()
    assert not History.build([delta(1, " a", finish_reason="stop")]).continuable()
    request = chat_pb2.ChatRequest()
    request.sampling.n = 2
    assert not can_continue(request, History.build([delta(1, " a")]))


@pytest.mark.parametrize(
    ("header", "after", "expected"),
    [(None, None, 0), (None, 7, 7), (f"{RID}:4", 9, 4), ("", 3, 3)],
)
def test_resume_point(header: str | None, after: int | None, expected: int) -> None:
    assert parse_resume_point(header, after, RID) == expected


@pytest.mark.parametrize("header", ["req_other:4", f"{RID}:x", "4"])
def test_resume_point_rejects_foreign_or_malformed_ids(header: str) -> None:
    with pytest.raises(SluiceError):
        parse_resume_point(header, None, RID)


def test_disconnect_policy_header() -> None:
    assert disconnect_policy(None) == "continue"
    assert disconnect_policy("Cancel") == "cancel"
    with pytest.raises(SluiceError):
        disconnect_policy("abort")


async def test_live_reader_after_replay_drops_what_was_replayed() -> None:
    """Live subscription first, replay second: buffered live events at or below the
    replayed sequence are dropped, the rest pass once, in order."""
    inbox = Inbox()

    live = (opened(), delta(3, " c"), delta(4, " d"), delta(4, " d"), delta(5, " e"), final(6))
    for sent in live:
        inbox.put(sent.SerializeToString())
    reader = EventReader(inbox, time.monotonic() + 60, last_sequence=4)
    got = []
    while True:
        event = await reader.next(0.05)
        if event is None:
            break
        got.append(event.sequence)
    assert got == [5, 6]


def test_render_replay_keeps_role_and_ids_of_the_original_stream() -> None:
    history = History.build([opened(), delta(1, " a"), delta(2, " b"), final(3)])
    meta = RequestMeta(RID, "trace", "m")

    def ending(relay: SseRelay) -> Callable[[inference_pb2.StreamEvent], bytes]:
        def render(event: inference_pb2.StreamEvent) -> bytes:
            sluice = final_sluice(meta, event.final, cache_hit=False)
            return relay.final(event.sequence, event.final, sluice)

        return render

    first = SseRelay(meta, include_usage=True)
    whole, ended = render_replay(history, 0, first, meta, ending(first))
    second = SseRelay(meta, include_usage=True)
    tail, _ = render_replay(history, 2, second, meta, ending(second))
    assert ended
    assert whole.count(b'"role":"assistant"') == 1
    assert b"id: req_abc:1\n" in whole and b"id: req_abc:1\n" not in tail
    assert b"id: req_abc:3\n" in tail and tail.endswith(b"data: [DONE]\n\n")
    assert b'"role"' not in tail, "the skipped events fed the renderer's state"


def test_continuation_prefills_and_bills_the_whole_answer() -> None:
    request = chat_pb2.ChatRequest(
        model="m", messages=[chat_pb2.Message(role="user", text="hello there")]
    )
    request.sampling.max_tokens = 50
    history = History.build([delta(1, " the quick"), delta(2, " brown fox")])
    takeover = continuation(request, history)
    assert takeover.last_sequence == 2
    assert takeover.request.messages[-1].role == "assistant"
    assert takeover.request.messages[-1].text == " the quick brown fox"
    prior = tokens.count_text(" the quick brown fox")
    assert takeover.request.sampling.max_tokens == 50 - prior
    provider = chat_pb2.Usage(input_tokens=tokens.count_chat(takeover.request), output_tokens=10)
    usage = whole_usage(takeover, request, provider)
    assert usage.input_tokens == tokens.count_chat(request)
    assert usage.output_tokens == 10 + prior
    assert whole_usage(None, request, provider) is provider


def test_cancel_registry_forgets_after_its_window() -> None:
    registry = CancelRegistry(remember_seconds=0.0)
    registry.add("a")
    assert "a" not in registry
    registry = CancelRegistry(remember_seconds=60, max_entries=2)
    for rid in ("a", "b", "c"):
        registry.add(rid)
    assert "a" not in registry and "b" in registry and "c" in registry


async def _drain(reader: EventReader, wait: float = 0.05) -> list[int]:
    got: list[int] = []
    while True:
        event = await reader.next(wait)
        if event is None:
            return got
        got.append(event.sequence)
        if event.HasField("final"):
            return got


def _store(events: list[inference_pb2.StreamEvent]) -> Any:
    reads: list[int] = []

    async def stored_after(sequence: int) -> list[inference_pb2.StreamEvent]:
        reads.append(sequence)
        return [e for e in events if e.sequence > sequence]

    stored_after.reads = reads  # type: ignore[attr-defined]
    return stored_after


async def test_reader_fills_a_gap_in_the_live_relay_from_the_store() -> None:
    """Events 2 and 3 never reached the live subscription: they come from the store,
    before 4, and nothing is sent twice."""
    stored = [opened(), delta(1, "a"), delta(2, "b"), delta(3, "c"), delta(4, "d"), final(5)]
    inbox = Inbox()
    for sent in (delta(1, "a"), delta(4, "d"), delta(3, "c"), final(5)):
        inbox.put(sent.SerializeToString())
    backfill = _store(stored)
    reader = EventReader(inbox, time.monotonic() + 60, backfill=backfill)
    assert await _drain(reader) == [1, 2, 3, 4, 5]
    assert reader.backfilled == 2
    assert backfill.reads == [1]


async def test_reader_finds_a_lost_terminal_event_after_a_quiet_wait() -> None:
    stored = [opened(), delta(1, "a"), delta(2, "b"), final(3)]
    inbox = Inbox()
    for sent in (delta(1, "a"), delta(2, "b")):
        inbox.put(sent.SerializeToString())
    reader = EventReader(inbox, time.monotonic() + 60, backfill=_store(stored))
    assert await _drain(reader) == [1, 2, 3]


async def test_reader_relays_what_it_has_when_the_store_lacks_the_gap() -> None:
    inbox = Inbox()
    for sent in (delta(1, "a"), delta(3, "c"), final(4)):
        inbox.put(sent.SerializeToString())
    reader = EventReader(inbox, time.monotonic() + 60, backfill=_store([]))
    assert await _drain(reader) == [1, 3, 4]
    assert reader.backfilled == 0


async def test_reader_skips_the_store_on_short_waits() -> None:
    backfill = _store([delta(1, "a")])
    reader = EventReader(Inbox(), time.monotonic() + 60, backfill=backfill)
    assert await reader.next(0.01, look_in_store=False) is None
    assert backfill.reads == []
