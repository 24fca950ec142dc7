"""``/v1/messages`` does what chat completions do, through every real process:
``Idempotency-Key`` (one run, the stored message replayed, 409/422 in Anthropic's error
shape, team scoping), resumable streams (``id:`` on the events, ``GET /v1/streams/{id}``
answering in Anthropic's events, another team 404) and ``Prefer: respond-async`` /
``wait`` (a job whose result is a ``message``)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest

from tests.idempotency.conftest import OTHER_KEY, new_team_key
from tests.idempotency.test_idempotency import billed_once, keyed, replayed, uid
from tests.support.full_stack import FullStack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESSAGES = "/v1/messages"
VERSION = {"anthropic-version": "2023-06-01"}


def message(*, stream: bool = False, max_tokens: int = 8) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "sim-fast",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"Say hello ({uuid.uuid4().hex[:12]})."}],
    }
    if stream:
        body["stream"] = True
    return body


def client_for(stack: FullStack, secret: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=stack.gateway_url,
        headers={"x-api-key": secret, **VERSION},
        timeout=30,
    )


def events(raw: bytes) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, event name, data) of each SSE event; pings and the retry hint dropped."""
    out = []
    for block in raw.decode().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, sep, value = line.partition(": ")
            if sep and name in ("id", "event", "data"):
                fields[name] = value
        if "data" in fields and fields.get("event") != "ping":
            data = orjson.loads(fields["data"])
            out.append((fields.get("id", ""), fields.get("event", ""), data))
    return out


def text_of(evs: list[tuple[str, str, dict[str, Any]]]) -> str:
    return "".join(
        d["delta"]["text"]
        for _, name, d in evs
        if name == "content_block_delta" and d["delta"]["type"] == "text_delta"
    )


async def test_idempotency_key_on_messages(idem_stack: FullStack) -> None:
    secret, team = await new_team_key(idem_stack)
    key = uid()
    body = message()
    async with client_for(idem_stack, secret) as client:
        first = await client.post(MESSAGES, json=body, headers=keyed(key))
        assert first.status_code == 200, first.text
        assert first.json()["type"] == "message"
        assert not replayed(first)

        again = await client.post(MESSAGES, json=body, headers=keyed(key))
        assert again.status_code == 200 and replayed(again)
        assert again.content == first.content

        other = await client.post(MESSAGES, json=message(), headers=keyed(key))
        assert other.status_code == 422
        error = other.json()
        assert error["type"] == "error" and error["code"] == "idempotency_key_reused"
        assert error["error"]["type"] == "invalid_request_error"
        # The same key on the other route is another operation: it does not collide.
        chat = await client.post(
            "/v1/chat/completions",
            json={"model": "sim-fast", "messages": body["messages"], "max_tokens": 8},
            headers={"authorization": f"Bearer {secret}", **keyed(key)},
        )
        assert chat.status_code == 422
    await billed_once(idem_stack, team)


async def test_a_message_stream_is_replayed_byte_for_byte(idem_stack: FullStack) -> None:
    secret, team = await new_team_key(idem_stack)
    key = uid()
    body = message(stream=True, max_tokens=12)
    async with client_for(idem_stack, secret) as client:
        first = await client.post(MESSAGES, json=body, headers=keyed(key))
        assert first.status_code == 200
        evs = events(first.content)
        assert evs[0][1] == "message_start" and evs[-1][1] == "message_stop"
        again = await client.post(MESSAGES, json=body, headers=keyed(key))
        assert replayed(again) and again.content == first.content
    await billed_once(idem_stack, team)


async def test_a_message_stream_resumes_in_its_own_dialect(idem_stack: FullStack) -> None:
    body = message(stream=True, max_tokens=12)
    secret, _team = await new_team_key(idem_stack)
    async with client_for(idem_stack, secret) as client:
        whole = await client.post(MESSAGES, json=body)
        assert whole.status_code == 200
        request_id = whole.headers["request-id"]
        evs = events(whole.content)
        ids = [i for i, _, _ in evs if i]
        assert ids, "every worker event's group carries an id"
        assert all(i.startswith(request_id + ":") for i in ids)
        first_id = ids[0]

        resumed = await client.get(
            f"/v1/streams/{request_id}",
            headers={"authorization": f"Bearer {secret}", "Last-Event-ID": first_id},
        )
        assert resumed.status_code == 200, resumed.text
        rest = events(resumed.content)
        names = [n for _, n, _ in rest]
        # Anthropic's events, from after the first group to the end.
        assert names[-2:] == ["message_delta", "message_stop"]
        assert "message_start" not in names
        upto = evs.index(next(e for e in evs if e[0] == first_id)) + 1
        assert text_of(evs[upto:]) == text_of(rest)
        assert text_of(evs[:upto]) + text_of(rest) == text_of(evs)
        # The resumed stream ends with the same verdict: the simulator's 16 tokens stop
        # at max_tokens 12.
        original = evs[-2][2]["sluice"]
        assert original["status"] == "partial_success"
        assert rest[-2][2]["sluice"]["status"] == original["status"]
        assert rest[-2][2]["sluice"]["errors"] == original["errors"]

        # From the start (no Last-Event-ID): the whole stream again.
        again = await client.get(
            f"/v1/streams/{request_id}", headers={"authorization": f"Bearer {secret}"}
        )
        replayed_all = events(again.content)
        assert text_of(replayed_all) == text_of(evs)
        # Its opening reports the prompt tokens the live stream did.
        usage = replayed_all[0][2]["message"]["usage"]
        assert usage["input_tokens"] == evs[0][2]["message"]["usage"]["input_tokens"] > 0

    async with httpx.AsyncClient(
        base_url=idem_stack.gateway_url,
        headers={"authorization": f"Bearer {OTHER_KEY}"},
        timeout=30,
    ) as other:
        stranger = await other.get(f"/v1/streams/{request_id}")
        assert stranger.status_code == 404


async def test_prefer_respond_async_on_messages(idem_stack: FullStack) -> None:
    secret, _team = await new_team_key(idem_stack, scopes=("chat", "jobs"))
    async with client_for(idem_stack, secret) as client:
        # Room for the simulator's 16 tokens: a whole answer.
        accepted = await client.post(
            MESSAGES, json=message(max_tokens=32), headers={"Prefer": "respond-async"}
        )
        assert accepted.status_code == 202, accepted.text
        assert accepted.headers["preference-applied"] == "respond-async"
        location = accepted.headers["location"]
        auth = {"authorization": f"Bearer {secret}"}

        async def done() -> dict[str, Any] | None:
            job: dict[str, Any] = (await client.get(location, headers=auth)).json()
            return job if job["status"] == "completed" else None

        job = await wait_for(done, timeout=15, what="the message job to complete")
        result = job["result"]
        assert result["type"] == "message" and result["role"] == "assistant"
        assert result["content"][0]["type"] == "text"
        assert result["stop_reason"] == "end_turn"
        assert result["sluice"]["status"] == "success"

        waited = await client.post(MESSAGES, json=message(), headers={"Prefer": "wait=10"})
        assert waited.status_code == 200, waited.text
        assert waited.json()["type"] == "message"

    chat_only, _ = await new_team_key(idem_stack, scopes=("chat",))
    async with client_for(idem_stack, chat_only) as client:
        refused = await client.post(MESSAGES, json=message(), headers={"Prefer": "respond-async"})
        assert refused.status_code == 403
        assert refused.json()["type"] == "error"


async def test_message_idempotency_keys_belong_to_their_team(idem_stack: FullStack) -> None:
    ours, _ = await new_team_key(idem_stack)
    theirs, _ = await new_team_key(idem_stack)
    key = uid()
    body = message()
    async with client_for(idem_stack, ours) as a, client_for(idem_stack, theirs) as b:
        mine = await a.post(MESSAGES, json=body, headers=keyed(key))
        other = await b.post(MESSAGES, json=body, headers=keyed(key))
        assert mine.status_code == other.status_code == 200
        assert not replayed(other)
        assert mine.json()["id"] != other.json()["id"]
        again = await b.post(MESSAGES, json=body, headers=keyed(key))
        assert replayed(again) and again.content == other.content
