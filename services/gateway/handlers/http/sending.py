"""An ``Answer`` sent straight over ASGI, as Litestar would send it (the same status,
headers, media type and body), for the edge's refusals and the direct routes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from services.gateway.domain.exchange import Answer

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[Any]]


def _raw_headers(answer: Answer) -> list[tuple[bytes, bytes]]:
    media = answer.media_type
    if media.startswith("text/"):
        media += "; charset=utf-8"
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
    raw.append((b"content-type", media.encode("latin-1")))
    if answer.stream is None:
        raw.append((b"content-length", str(len(answer.body)).encode()))
    return raw


async def send_answer(send: Send, answer: Answer) -> None:
    """A whole answer: the status line and headers, then the body in one message."""
    await send(
        {"type": "http.response.start", "status": answer.status, "headers": _raw_headers(answer)}
    )
    await send({"type": "http.response.body", "body": answer.body, "more_body": False})


async def send_stream(send: Send, receive: Receive, answer: Answer) -> None:
    """A streamed answer, chunk by chunk, until it ends or the client goes away. A
    disconnect cancels the stream where it waits (the relay then applies the request's
    ``on_disconnect``) and ends the response quietly, as Litestar's ``Stream`` does; one
    small task waits for it, not a task group per stream."""
    assert answer.stream is not None
    await send(
        {"type": "http.response.start", "status": answer.status, "headers": _raw_headers(answer)}
    )
    streaming = asyncio.current_task()
    assert streaming is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = True
                streaming.cancel()
                return

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        async for chunk in answer.stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not gone:
            raise
        # Our own cancel: the client left; nothing more to send.
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if gone and streaming.cancelling():
            streaming.uncancel()
