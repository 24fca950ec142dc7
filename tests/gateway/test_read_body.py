"""Reading a request's body from ASGI messages: what the HTTP servers send, and no more
``receive`` calls than the body needs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sluice.errors import ErrorCode, SluiceError

from services.gateway.handlers.http.direct import AsgiRequest
from services.gateway.handlers.http.requests import read_body


class Messages:
    """``receive`` over scripted messages; past them it waits forever, as a server does
    while the client keeps the connection open."""

    def __init__(self, *messages: dict[str, Any]) -> None:
        self.messages = list(messages)
        self.calls = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.messages:
            return self.messages.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def _request(receive: Messages, length: int | None) -> AsgiRequest:
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    return AsgiRequest({"type": "http", "headers": headers}, receive)


def _chunk(body: bytes, more: bool) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_the_declared_length_read_ends_the_body_without_another_receive():
    # Granian sends a whole small body as one chunk still marked more_body, and says the
    # body ended only on the next receive: a second hand-off from its runtime thread.
    body = b'{"model": "sim-fast"}'
    receive = Messages(_chunk(body, True))
    read = await asyncio.wait_for(read_body(_request(receive, len(body)), 1024), 2)
    assert read == body
    assert receive.calls == 1


async def test_a_body_in_several_chunks_is_read_to_its_declared_length():
    receive = Messages(_chunk(b"abc", True), _chunk(b"def", True), _chunk(b"", False))
    read = await asyncio.wait_for(read_body(_request(receive, 6), 1024), 2)
    assert read == b"abcdef"
    assert receive.calls == 2


async def test_without_a_length_the_body_ends_when_the_server_says_so():
    receive = Messages(_chunk(b"abc", True), _chunk(b"def", True), _chunk(b"", False))
    read = await asyncio.wait_for(read_body(_request(receive, None), 1024), 2)
    assert read == b"abcdef"
    assert receive.calls == 3


async def test_a_body_over_the_limit_is_refused_even_at_its_declared_length():
    receive = Messages(_chunk(b"x" * 10, True), _chunk(b"", False))
    with pytest.raises(SluiceError) as info:
        await asyncio.wait_for(read_body(_request(receive, 10), 4), 2)
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE
