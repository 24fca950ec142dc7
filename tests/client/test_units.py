"""The client's pure parts, without a stack: the SSE parser, the exactly-once
bookkeeping of a resumed stream, the Messages replay and the webhook signature (checked
against the ``standardwebhooks`` package the gateway signs with)."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from sluice_client import WebhookVerificationError, sign_webhook, verify_webhook
from sluice_client._messages import MessageTracker, ResumeMismatch
from sluice_client._sse import ExactlyOnce, SseParser, is_plain_delta, split_id
from standardwebhooks import Webhook


def test_sse_parser_handles_split_lines_crlf_comments_and_cut_events() -> None:
    parser = SseParser()
    assert parser.feed(b"retry: 2000\nid: req_1:1\nda") == []
    assert parser.feed(b'ta: {"a": 1}\r\n\r\n: keep-alive\n\n') == [
        parser_event('{"a": 1}', "req_1:1", retry=2000)
    ]
    events = parser.feed(b"id: req_1:2\nevent: error\ndata: x\ndata: y\n\nid: req_1:3\ndata: cut")
    assert [(e.id, e.event, e.data) for e in events] == [("req_1:2", "error", "x\ny")]
    # The event cut off by the connection never comes out.
    assert SseParser().feed(b"id: req_1:3\ndata: cut") == []


def parser_event(data: str, event_id: str, retry: int | None = None) -> Any:
    from sluice_client._sse import SseEvent

    return SseEvent(data, None, event_id, retry)


def test_split_id() -> None:
    assert split_id("req_ab:12") == ("req_ab", 12)
    assert split_id("nope") is None
    assert split_id(None) is None


DELTA = json.dumps({"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]})
FINISH = json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
USAGE = json.dumps({"choices": [], "usage": {"completion_tokens": 3}})


def test_plain_deltas_are_told_from_the_end_of_a_stream() -> None:
    assert is_plain_delta(DELTA)
    assert not is_plain_delta(FINISH)
    assert not is_plain_delta(USAGE)
    assert not is_plain_delta("not json")


def test_a_cut_between_two_events_of_the_final_sequence_loses_and_repeats_nothing() -> None:
    state = ExactlyOnce()
    state.new_connection()
    for seq in (1, 2, 3):
        assert state.accept(seq)
        state.mark(single=True)
    # The end: three events under sequence 4; the connection breaks after two.
    assert state.accept(4)
    state.mark(single=False)
    assert state.accept(4)
    assert state.resume_after == 3
    # The resume replays sequence 4 whole: only its third event is new.
    state.new_connection()
    assert [state.accept(4) for _ in range(3)] == [False, False, True]


def test_a_cut_after_a_delta_resumes_after_it_and_a_replay_from_the_start_is_filtered() -> None:
    state = ExactlyOnce()
    state.new_connection()
    for seq in (1, 2, 5):  # 5: a batched event carrying deltas 3 to 5
        assert state.accept(seq)
        state.mark(single=True)
    assert state.resume_after == 5
    # A re-sent POST attaching to the first run replays from the start.
    state.new_connection()
    assert [state.accept(s) for s in (1, 2, 3, 4, 5, 6)] == [False] * 5 + [True]


def live(tracker: MessageTracker, events: list[dict[str, Any]]) -> None:
    for event in events:
        tracker.observe(event)


def chunk(**delta: Any) -> dict[str, Any]:
    finish = delta.pop("finish_reason", None)
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_a_messages_replay_passes_on_only_what_was_not_yielded() -> None:
    tracker = MessageTracker()
    live(
        tracker,
        [
            {"type": "message_start", "message": {}},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Hel"},
            },
        ],
    )
    tracker.restart()
    out = []
    for c in (
        chunk(role="assistant", content="He"),
        chunk(content="llo"),
        chunk(
            tool_calls=[{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{}"}}]
        ),
        chunk(finish_reason="tool_calls"),
        {"choices": [], "sluice": {"usage": {"input_tokens": 9, "output_tokens": 4}}},
    ):
        out.extend(tracker.replay_chunk(c))
    out.extend(tracker.replay_end())
    events = [json.loads(e.data) for e in out]
    assert [e["type"] for e in events] == [
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0]["delta"]["text"] == "lo"
    assert events[2]["content_block"] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "f",
        "input": {},
    }
    assert events[3]["delta"] == {"type": "input_json_delta", "partial_json": "{}"}
    assert events[5]["delta"]["stop_reason"] == "tool_use"
    assert events[5]["usage"]["output_tokens"] == 4


def test_a_messages_replay_that_differs_is_refused() -> None:
    tracker = MessageTracker()
    live(
        tracker,
        [
            {"type": "message_start", "message": {}},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "abc"},
            },
        ],
    )
    tracker.restart()
    with pytest.raises(ResumeMismatch):
        tracker.replay_chunk(chunk(content="xyz"))


SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def test_the_signature_is_the_standard_webhooks_one() -> None:
    body = b'{"type": "job.completed", "data": {"id": "job_1"}}'
    now = int(time.time())
    theirs = Webhook(SECRET).sign("msg_1", datetime.fromtimestamp(now, tz=UTC), body.decode())
    assert sign_webhook(SECRET, "msg_1", now, body) == theirs
    headers = {"Webhook-Id": "msg_1", "Webhook-Timestamp": str(now), "Webhook-Signature": theirs}
    event = verify_webhook(SECRET, body, headers)
    assert (event.type, event.webhook_id, event.data["id"]) == ("job.completed", "msg_1", "job_1")
    # Several signatures during a secret's rotation: any one may match.
    headers["Webhook-Signature"] = "v1,AAAA " + theirs
    assert verify_webhook(SECRET, body, headers).webhook_id == "msg_1"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(SECRET, body, {**headers, "Webhook-Signature": "v1,AAAA"})
    with pytest.raises(WebhookVerificationError):
        verify_webhook(SECRET, body, {"Webhook-Id": "msg_1"})


def test_an_unreachable_gateway_is_an_api_connection_error_after_the_retries() -> None:
    from sluice.devtools.embedded import free_port
    from sluice_client import APIConnectionError, RetryPolicy, Sluice

    retry = RetryPolicy(max_retries=2, backoff_base=0.01, backoff_max=0.02)
    client = Sluice("sk-any", base_url=f"http://127.0.0.1:{free_port()}", retry=retry)
    with client, pytest.raises(APIConnectionError) as caught:
        client.jobs.list()
    assert "after 3 attempt(s)" in caught.value.detail
