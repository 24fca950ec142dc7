"""The client's pure parts, without a stack: the SSE parser, the exactly-once
bookkeeping of a resumed stream, the grouping of a Messages stream and the webhook
signature (checked against the ``standardwebhooks`` package the gateway signs with)."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from sluice_client import WebhookVerificationError, sign_webhook, verify_webhook
from sluice_client._messages import MessageGroups, UnnumberedResume
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


def sse(name: str, data: str, event_id: str | None = None) -> bytes:
    tail = f"id: {event_id}\n" if event_id else ""
    return f"event: {name}\ndata: {data}\n{tail}\n".encode()


# A Messages stream as the gateway frames it: each run event a group of Anthropic
# events, only the group's last one numbered; the opening rides in the first group, a
# heartbeat ping in none.
GROUP_1 = (
    sse("message_start", '{"type":"message_start"}')
    + sse("content_block_start", '{"type":"content_block_start","index":0}')
    + sse("content_block_delta", '{"type":"content_block_delta","index":0}', "req_1:1")
)
PING = sse("ping", '{"type":"ping"}')
GROUP_2 = sse("content_block_delta", '{"type":"content_block_delta","index":0}', "req_1:2")
GROUP_3 = (
    sse("content_block_stop", '{"type":"content_block_stop","index":0}')
    + sse("message_delta", '{"type":"message_delta"}')
    + sse("message_stop", '{"type":"message_stop"}', "req_1:3")
)


def names(groups: MessageGroups, raw: bytes, parser: SseParser | None = None) -> list[str]:
    out: list[str] = []
    for event in (parser or SseParser()).feed(raw):
        out.extend(str(e.event) for e in groups.feed(event))
    return out


def test_messages_events_are_passed_on_by_whole_numbered_groups() -> None:
    groups = MessageGroups()
    parser = SseParser()
    # Nothing goes until the numbered event that closes the group.
    assert names(groups, GROUP_1[: GROUP_1.index(b"event: content_block_delta")], parser) == []
    rest = GROUP_1[GROUP_1.index(b"event: content_block_delta") :]
    assert names(groups, rest, parser) == [
        "message_start",
        "content_block_start",
        "content_block_delta",
    ]
    assert (groups.stream_id, groups.last, groups.ended) == ("req_1", 1, False)
    # A ping waits for the next group and goes with it.
    assert names(groups, PING + GROUP_2, parser) == ["ping", "content_block_delta"]
    assert names(groups, GROUP_3, parser) == ["content_block_stop", "message_delta", "message_stop"]
    assert groups.last == 3 and groups.ended


def test_a_group_cut_in_two_comes_again_whole_and_seen_groups_are_dropped_whole() -> None:
    groups = MessageGroups()
    assert len(names(groups, GROUP_1 + GROUP_2)) == 4
    # The connection breaks inside the last group: its first events are held back...
    assert names(groups, GROUP_3[: GROUP_3.index(b"event: message_stop")]) == []
    assert groups.last == 2 and not groups.ended
    # ...and forgotten; a re-sent POST attaching to the run replays it from the start:
    # groups 1 and 2 (and the ping between them) are dropped whole, group 3 comes whole.
    groups.new_connection()
    assert names(groups, GROUP_1 + PING + GROUP_2 + GROUP_3) == [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert groups.ended


def test_an_unnumbered_stream_goes_at_its_message_stop() -> None:
    cached = GROUP_1.replace(b"id: req_1:1\n", b"") + GROUP_3.replace(b"id: req_1:3\n", b"")
    groups = MessageGroups()
    parser = SseParser()
    head = cached.index(b"event: message_stop")
    assert names(groups, cached[:head], parser) == []
    assert len(names(groups, cached[head:], parser)) == 6
    assert groups.ended and groups.stream_id is None
    # Once part of a stream was passed on, an unnumbered one cannot continue it.
    groups = MessageGroups()
    names(groups, GROUP_1)
    groups.new_connection()
    with pytest.raises(UnnumberedResume):
        names(groups, cached)


def test_an_error_outside_a_group_ends_the_stream_with_only_itself() -> None:
    groups = MessageGroups()
    names(groups, GROUP_1)
    error = sse("error", '{"type":"error"}')
    assert names(groups, GROUP_2[: GROUP_2.index(b"id:")] + b"\n" + error) == ["error"]
    assert groups.ended


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
