"""Streams through a connection that breaks: the caller's iterator yields every event
(so every token) exactly once and in order, compared with the stream the gateway stored;
and a stream that cannot be resumed ends in a typed error, not a hang."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
from sluice_client import (
    AsyncSluice,
    ChatCompletionChunk,
    IdempotencyKeyReused,
    MessageStreamEvent,
    RetryPolicy,
    Sluice,
    StreamInterrupted,
)
from sluice_client._sse import SseParser

from tests.client.conftest import CutProxy
from tests.support.full_stack import DEV_KEY, FullStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = [{"role": "user", "content": "Tell me a long story about a fox."}]


def slow(tokens: int, rate: float = 40.0) -> dict[str, Any]:
    """Simulator settings: ``tokens`` tokens at ``rate`` per second, one id per call."""
    return {
        "id": f"client-{uuid.uuid4().hex[:12]}",
        "ttft_ms": 50,
        "tokens_per_second": rate,
        "output_tokens": tokens,
    }


async def stored_stream(stack: FullStack, stream_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Every event of the finished stream, replayed by the gateway from the start:
    (id, chunk without its ``sluice`` object, which the replay computes anew)."""
    out: list[tuple[str, dict[str, Any]]] = []
    async with (
        stack.client() as http,
        http.stream("GET", f"/v1/streams/{stream_id}") as response,
    ):
        assert response.status_code == 200
        event_id = None
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                chunk.pop("sluice", None)
                assert event_id is not None
                out.append((event_id, chunk))
    return out


def seen(chunks: list[ChatCompletionChunk]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for chunk in chunks:
        body = chunk.model_dump(mode="json", exclude={"event_id", "sluice"}, exclude_none=False)
        assert chunk.event_id is not None
        out.append((chunk.event_id, body))
    return out


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def normalised(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, str]]:
    """(id, canonical JSON): null members dropped (the client's model has optional
    members the gateway leaves out)."""
    return [(eid, json.dumps(_without_nulls(body), sort_keys=True)) for eid, body in events]


async def test_async_stream_cut_three_times_yields_every_token_exactly_once(
    stack: FullStack, proxy: CutProxy
) -> None:
    sim = slow(60)
    async with AsyncSluice(DEV_KEY, base_url=proxy.url, max_retries=5) as client:
        stream = await client.chat.completions.stream(
            model="sim-fast",
            messages=PROMPT,
            max_tokens=60,
            stream_options={"include_usage": True},
            sim=sim,
        )
        chunks: list[ChatCompletionChunk] = []
        targets = [5, 20, 40]
        cuts = 0
        async for chunk in stream:
            chunks.append(chunk)
            # Cut the live connection only: once the previous cut was resumed.
            if cuts < 3 and len(chunks) >= targets[cuts] and stream.resumes == cuts:
                cuts += await asyncio.to_thread(proxy.cut) > 0
    assert stream.resumes == 3
    assert stream.stream_id is not None
    stored = await stored_stream(stack, stream.stream_id)
    assert normalised(seen(chunks)) == normalised(stored)
    text = "".join(c.text for c in chunks)
    assert text == stream.text
    assert len(text.split()) == 60
    usage = [c.usage for c in chunks if c.usage]
    assert usage and usage[-1]["completion_tokens"] == 60
    assert stream.final is not None and stream.final.sluice is not None
    # One run upstream, whatever the number of reconnects.
    assert await stack.sim_count(sim["id"]) == 1


def test_sync_stream_cut_mid_way_yields_every_token_exactly_once(
    stack: FullStack, proxy: CutProxy
) -> None:
    sim = slow(40)
    with Sluice(DEV_KEY, base_url=proxy.url) as client:
        stream = client.chat.completions.stream(
            model="sim-fast", messages=PROMPT, max_tokens=40, sim=sim
        )
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 10:
                assert proxy.cut() > 0
    assert stream.resumes == 1
    assert stream.stream_id is not None
    stored = asyncio.run(stored_stream(stack, stream.stream_id))
    assert normalised(seen(chunks)) == normalised(stored)
    assert len(stream.text.split()) == 40
    assert asyncio.run(stack.sim_count(sim["id"])) == 1


async def test_a_cut_before_the_first_event_attaches_to_the_same_run(
    stack: FullStack, proxy: CutProxy
) -> None:
    """The connection breaks after the request left but before any event came back:
    the POST goes again with the same Idempotency-Key and attaches to the first run."""
    sim = slow(20)
    sim["ttft_ms"] = 1500
    proxy.cut_after(0.5)
    async with AsyncSluice(DEV_KEY, base_url=proxy.url) as client:
        stream = await client.chat.completions.stream(
            model="sim-fast", messages=PROMPT, max_tokens=20, sim=sim
        )
        chunks = [chunk async for chunk in stream]
    assert proxy.cuts > 0
    assert len("".join(c.text for c in chunks).split()) == 20
    assert stream.stream_id is not None
    assert normalised(seen(chunks)) == normalised(await stored_stream(stack, stream.stream_id))
    assert await stack.sim_count(sim["id"]) == 1


async def test_a_stream_that_cannot_resume_ends_in_stream_interrupted(
    stack: FullStack, proxy: CutProxy
) -> None:
    retry = RetryPolicy(max_retries=2, backoff_base=0.05, backoff_max=0.1)
    async with AsyncSluice(DEV_KEY, base_url=proxy.url, retry=retry) as client:
        stream = await client.chat.completions.stream(
            model="sim-fast", messages=PROMPT, max_tokens=40, sim=slow(40)
        )
        got = 0
        with pytest.raises(StreamInterrupted) as caught:
            async for _chunk in stream:
                got += 1
                if got == 3:
                    proxy.refuse = True
                    await asyncio.to_thread(proxy.cut)
    assert caught.value.request_id == stream.stream_id
    assert proxy.connections >= 3  # the first, then both refused reconnects


async def test_messages_plain_and_streamed(stack: FullStack) -> None:
    async with AsyncSluice(DEV_KEY, base_url=stack.gateway_url) as client:
        message = await client.messages.create(
            model="sim-fast", max_tokens=12, messages=PROMPT, sim=slow(12, 0)
        )
        assert message.type == "message"
        assert len(message.text.split()) == 12
        assert message.usage is not None and message.usage["output_tokens"] == 12
        assert message.response_info.request_id

        stream = await client.messages.stream(
            model="sim-fast", max_tokens=12, messages=PROMPT, sim=slow(12, 0)
        )
        kinds = [event.type async for event in stream]
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert "message_delta" in kinds
    assert len(stream.text.split()) == 12


def test_sync_plain_chat_reports_ids(stack: FullStack) -> None:
    with Sluice(DEV_KEY, base_url=stack.gateway_url) as client:
        assert "sim-fast" in [m.id for m in client.models()]
        answer = client.chat.completions.create(
            model="sim-fast", messages=PROMPT, max_tokens=8, sim=slow(8, 0)
        )
    assert len(answer.text.split()) == 8
    info = answer.response_info
    assert info.request_id and info.request_id.startswith("req_")
    assert info.trace_id and len(info.trace_id) == 32
    assert info.idempotency_key
    assert not info.idempotent_replayed
    assert answer.sluice is not None


async def test_streams_are_not_resumable_by_another_team(stack: FullStack) -> None:
    """The resume route the client uses keeps streams to their team (a 404 for others)."""
    async with AsyncSluice(DEV_KEY, base_url=stack.gateway_url) as client:
        stream = await client.chat.completions.stream(
            model="sim-fast", messages=PROMPT, max_tokens=4, sim=slow(4, 0)
        )
        _ = [c async for c in stream]
    from tests.client.conftest import CHAT_ONLY_KEY

    async with httpx.AsyncClient(
        base_url=stack.gateway_url, headers={"Authorization": f"Bearer {CHAT_ONLY_KEY}"}
    ) as http:
        response = await http.get(f"/v1/streams/{stream.stream_id}")
    assert response.status_code == 404


async def stored_message_stream(stack: FullStack, stream_id: str) -> list[dict[str, Any]]:
    """Every event of the finished Messages stream, replayed by the gateway from the
    start in Anthropic's events (pings left out)."""
    out: list[dict[str, Any]] = []
    parser = SseParser()
    async with (
        stack.client() as http,
        http.stream("GET", f"/v1/streams/{stream_id}") as response,
    ):
        assert response.status_code == 200
        async for raw in response.aiter_bytes():
            out.extend(json.loads(e.data) for e in parser.feed(raw) if e.event != "ping")
    return out


def message_events(events: list[dict[str, Any]]) -> list[str]:
    """Canonical JSON of each event but pings, without the ``sluice`` object (which a
    replay computes anew)."""
    out = []
    for event in events:
        if event.get("type") == "ping":
            continue
        body = {k: v for k, v in _without_nulls(event).items() if k != "sluice"}
        out.append(json.dumps(body, sort_keys=True))
    return out


def recording_client(sent: list[httpx.Request]) -> httpx.AsyncClient:
    async def record(request: httpx.Request) -> None:
        sent.append(request)

    return httpx.AsyncClient(timeout=60, event_hooks={"request": [record]})


def yielded(events: list[MessageStreamEvent]) -> list[dict[str, Any]]:
    return [e.model_dump(mode="json") for e in events]


async def test_a_messages_stream_cut_mid_way_yields_every_token_exactly_once(
    stack: FullStack, proxy: CutProxy
) -> None:
    """The gateway numbers a Messages stream by groups of events; the client passes on
    whole groups and resumes after the last one (``Last-Event-ID``). The route takes no
    simulator settings, so the proxy cuts by content: right after the first text delta
    (the end of the first group) reached the client."""
    proxy.cut_after_event(b"event: content_block_delta")
    sent: list[httpx.Request] = []
    http = recording_client(sent)
    async with http, AsyncSluice(DEV_KEY, base_url=proxy.url, http_client=http) as client:
        stream = await client.messages.stream(model="sim-fast", max_tokens=50, messages=PROMPT)
        events = [event async for event in stream]
    assert proxy.cuts > 0 and proxy.connections == 2
    assert stream.resumes == 1
    assert stream.stream_id is not None and stream.idempotency_key
    # Named by its first group, the stream resumes after it.
    assert sent[0].headers["idempotency-key"] == stream.idempotency_key
    assert (sent[1].method, sent[1].url.path) == ("GET", f"/v1/streams/{stream.stream_id}")
    assert sent[1].headers["last-event-id"] == f"{stream.stream_id}:1"
    stored = await stored_message_stream(stack, stream.stream_id)
    assert message_events(yielded(events)) == message_events(stored)
    kinds = [e.type for e in events]
    assert kinds.count("message_start") == 1 and kinds[0] == "message_start"
    assert kinds.count("message_delta") == 1 and kinds.count("message_stop") == 1
    assert kinds[-1] == "message_stop"
    extra = [e.model_extra or {} for e in events]
    starts = [
        x["index"] for e, x in zip(events, extra, strict=True) if e.type == "content_block_start"
    ]
    stops = [
        x["index"] for e, x in zip(events, extra, strict=True) if e.type == "content_block_stop"
    ]
    assert starts == stops == [0]
    assert extra[0]["message"]["usage"]["input_tokens"] > 0
    delta = next(x for e, x in zip(events, extra, strict=True) if e.type == "message_delta")
    assert stream.text and delta["usage"]["output_tokens"] == len(stream.text.split())


def test_sync_messages_stream_cut_mid_way(stack: FullStack, proxy: CutProxy) -> None:
    proxy.cut_after_event(b"event: content_block_delta")
    with Sluice(DEV_KEY, base_url=proxy.url) as client:
        stream = client.messages.stream(model="sim-fast", max_tokens=50, messages=PROMPT)
        events = list(stream)
    assert proxy.cuts > 0 and stream.resumes == 1
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("message_start") == kinds.count("message_stop") == 1
    assert stream.stream_id is not None
    stored = asyncio.run(stored_message_stream(stack, stream.stream_id))
    assert message_events(yielded(events)) == message_events(stored)
    assert stream.text


async def test_a_messages_stream_cut_inside_its_first_group_attaches_to_the_same_run(
    stack: FullStack, proxy: CutProxy
) -> None:
    """Cut after ``message_start``, before the numbered event that closes the first
    group: the stream has no name yet, so the POST goes again with the same
    Idempotency-Key; the held ``message_start`` is dropped and the first group comes
    again whole."""
    proxy.cut_after_event(b"event: message_start")
    sent: list[httpx.Request] = []
    http = recording_client(sent)
    async with http, AsyncSluice(DEV_KEY, base_url=proxy.url, http_client=http) as client:
        stream = await client.messages.stream(model="sim-fast", max_tokens=30, messages=PROMPT)
        events = [event async for event in stream]
    assert proxy.cuts > 0 and stream.resumes == 1
    assert [(r.method, r.url.path) for r in sent] == [("POST", "/v1/messages")] * 2
    assert {r.headers["idempotency-key"] for r in sent} == {stream.idempotency_key}
    assert stream.stream_id is not None
    stored = await stored_message_stream(stack, stream.stream_id)
    assert message_events(yielded(events)) == message_events(stored)
    assert [e.type for e in events].count("message_start") == 1


async def test_a_message_is_sent_with_an_idempotency_key_and_replayed_under_it(
    stack: FullStack,
) -> None:
    key = str(uuid.uuid4())
    async with AsyncSluice(DEV_KEY, base_url=stack.gateway_url) as client:
        first = await client.messages.create(
            model="sim-fast", max_tokens=6, messages=PROMPT, idempotency_key=key
        )
        again = await client.messages.create(
            model="sim-fast", max_tokens=6, messages=PROMPT, idempotency_key=key
        )
        with pytest.raises(IdempotencyKeyReused):
            await client.messages.create(
                model="sim-fast", max_tokens=7, messages=PROMPT, idempotency_key=key
            )
        fresh = await client.messages.create(model="sim-fast", max_tokens=6, messages=PROMPT)
    assert first.response_info.idempotency_key == key
    assert not first.response_info.idempotent_replayed
    assert again.response_info.idempotent_replayed and again.text == first.text
    assert fresh.response_info.idempotency_key not in (None, key)
