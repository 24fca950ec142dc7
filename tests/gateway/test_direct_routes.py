"""The answer routes served straight from the edge answer as Litestar's routes do: the
same status, headers, media type and body shape, for answers, streams and errors of both
dialects. One gateway, two edges over it: the service's (direct routes) and one that
sends every route through Litestar."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from sluice.inference.v1 import inference_pb2

from services.gateway.handlers.http.application import create_app
from services.gateway.handlers.http.middleware import Edge
from tests.gateway.harness import BASE_URL, Gateway, answer

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
# Differ from one request to the next whichever way it is served.
VARYING_HEADERS = {"x-request-id", "traceparent", "request-id", "content-length", "date"}
IDS = re.compile(r"(req|chatcmpl|msg|job)_[0-9a-zA-Z]+|[0-9a-f]{32}|\d{9,}|\d+\.\d+")


def through_litestar(gw: Gateway) -> httpx.AsyncClient:
    edge = Edge(create_app(gw.parts.api), gw.deps.instruments, gw.parts.audit)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=edge),
        base_url=BASE_URL,
        headers={"authorization": f"Bearer {gw.secret}"},
        timeout=10,
    )


def shape(resp: httpx.Response) -> tuple[int, dict[str, str], str]:
    headers = {k: IDS.sub("<id>", v) for k, v in resp.headers.items() if k not in VARYING_HEADERS}
    return resp.status_code, headers, IDS.sub("<id>", resp.text)


async def both(gw: Gateway, method: str, path: str, **kw: Any) -> list[httpx.Response]:
    out = []
    async with gw.authed() as direct, through_litestar(gw) as litestar:
        for client in (direct, litestar):
            out.append(await client.request(method, path, **kw))
    return out


async def stream_scenario(work: inference_pb2.InferenceWork, fake: Any) -> None:
    for seq, text in enumerate(["Hel", "lo"], start=1):
        await fake.emit(
            work, inference_pb2.StreamEvent(sequence=seq, delta=inference_pb2.Delta(content=text))
        )
    await fake.emit(
        work,
        inference_pb2.StreamEvent(sequence=3, delta=inference_pb2.Delta(finish_reason="stop")),
    )
    await fake.emit(work, inference_pb2.StreamEvent(sequence=4, final=answer("Hello", choices=[])))


CHAT_BODY = {"model": "sim-fast", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES_BODY = {
    "model": "sim-fast",
    "max_tokens": 8,
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        pytest.param(CHAT, CHAT_BODY, {}, id="chat"),
        pytest.param(MESSAGES, MESSAGES_BODY, {}, id="messages"),
        # A repeated header reads as Litestar reads it (every Prefer value): a job.
        pytest.param(
            CHAT,
            CHAT_BODY,
            [("Prefer", "handling=lenient"), ("Prefer", "respond-async")],
            id="repeated-prefer",
        ),
    ],
)
async def test_answers_match(gw: Gateway, path: str, body: dict[str, Any], headers: Any) -> None:
    direct, litestar = await both(gw, "POST", path, json=body, headers=headers)
    assert direct.status_code == (202 if headers else 200), direct.text
    assert shape(direct) == shape(litestar)
    assert direct.headers["content-length"] == str(len(direct.content))


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
async def test_streams_match(gw: Gateway, path: str) -> None:
    gw.fake.scenario = stream_scenario
    body = {**(CHAT_BODY if path == CHAT else MESSAGES_BODY), "stream": True}
    direct, litestar = await both(gw, "POST", path, json=body)
    assert direct.status_code == 200, direct.text
    assert direct.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert "content-length" not in direct.headers
    assert shape(direct) == shape(litestar)
    assert "Hel" in direct.text and "lo" in direct.text


@pytest.mark.parametrize(
    ("path", "content", "headers", "status"),
    [
        # Not JSON: 400 problem+json (chat) or an Anthropic error body (messages).
        pytest.param(CHAT, b"{not json", {"content-type": "application/json"}, 400, id="chat"),
        pytest.param(
            MESSAGES, b"{not json", {"content-type": "application/json"}, 400, id="messages"
        ),
        # No credentials: 401 before the body is read.
        pytest.param(CHAT, b"{}", {"authorization": ""}, 401, id="chat-no-key"),
        pytest.param(MESSAGES, b"{}", {"authorization": ""}, 401, id="messages-no-key"),
        # A media type that is not JSON: 415.
        pytest.param(CHAT, b"hello", {"content-type": "text/plain"}, 415, id="chat-media"),
    ],
)
async def test_errors_match(
    gw: Gateway, path: str, content: bytes, headers: dict[str, str], status: int
) -> None:
    direct, litestar = await both(gw, "POST", path, content=content, headers=headers)
    assert direct.status_code == status, direct.text
    assert shape(direct) == shape(litestar)
    error = json.loads(direct.text)
    if path == MESSAGES:
        assert error["type"] == "error" and error["trace_id"] and error["error"]["message"]
    else:
        assert direct.headers["content-type"] == "application/problem+json"
        assert error["request_id"] == direct.headers["x-request-id"]


async def test_other_methods_and_paths_go_through_litestar(gw: Gateway) -> None:
    async with gw.authed() as http:
        wrong_method = await http.get(CHAT)
        trailing = await http.post(CHAT + "/", json=CHAT_BODY)
    assert wrong_method.status_code == 405
    assert wrong_method.headers["content-type"] == "application/problem+json"
    # Litestar's own routing still answers the paths the edge does not take.
    assert trailing.status_code in (200, 404)
