"""A fake Anthropic Messages API, run as its own process by the tests
(``python -m tests.support.fake_anthropic --port N``): ``POST /v1/messages`` streamed or
not, in Anthropic's wire format, with a prompt cache that honours ``cache_control``
breakpoints the way Anthropic reports it (a first request writes the prefix,
``cache_creation_input_tokens``; the same prefix again reads it,
``cache_read_input_tokens``).

It checks what a real endpoint checks first (``x-api-key``, ``anthropic-version``,
``max_tokens``, alternating roles, tool results answering tool uses) and keeps every
request body for the test: ``GET /_fake/requests``. A user text containing
``[fault:429]``, ``[fault:529]`` or ``[fault:cut]`` answers with that fault.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import uuid
from typing import Any

from aiohttp import web

ANSWER = "Hello from the fake Anthropic endpoint."
KEY = "sk-ant-fake-test-key"
TOOL_INPUT = {"city": "Oslo"}


def _error(status: int, kind: str, message: str) -> web.Response:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status)


def _tokens(value: Any) -> int:
    return max(1, len(json.dumps(value, sort_keys=True)) // 4)


def _texts(body: dict[str, Any]) -> str:
    out = []
    for message in body.get("messages") or ():
        content = message.get("content")
        if isinstance(content, str):
            out.append(content)
        else:
            out.extend(b.get("text", "") for b in content or () if isinstance(b, dict))
    return "\n".join(out)


def _block_ids(message: dict[str, Any], kind: str, field: str) -> set[str]:
    content = message.get("content")
    if not isinstance(content, list):
        return set()
    return {str(b.get(field)) for b in content if isinstance(b, dict) and b.get("type") == kind}


def _prefix(body: dict[str, Any]) -> Any:
    """Everything up to the last block with cache_control (tools, system, messages, in
    Anthropic's order), or None without a breakpoint."""
    ordered: list[Any] = []
    last = -1
    for tool in body.get("tools") or ():
        ordered.append(tool)
        if "cache_control" in tool:
            last = len(ordered)
    system = body.get("system")
    for block in system if isinstance(system, list) else ():
        ordered.append(block)
        if "cache_control" in block:
            last = len(ordered)
    for message in body.get("messages") or ():
        content = message.get("content")
        for block in content if isinstance(content, list) else ():
            ordered.append(block)
            if isinstance(block, dict) and "cache_control" in block:
                last = len(ordered)
    return ordered[:last] if last > 0 else None


class Fake:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.cache: set[str] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_get("/_fake/requests", self.list_requests)
        return app

    async def list_requests(self, _request: web.Request) -> web.Response:
        return web.json_response(self.requests)

    def _check(self, request: web.Request, body: Any) -> web.Response | None:
        if request.headers.get("x-api-key") != KEY:
            return _error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return _error(400, "invalid_request_error", "anthropic-version header is required")
        if not isinstance(body, dict) or not isinstance(body.get("max_tokens"), int):
            return _error(400, "invalid_request_error", "max_tokens: Field required")
        messages = body.get("messages") or []
        roles = [m.get("role") for m in messages]
        if not roles or roles[0] != "user" or any(a == b for a, b in itertools.pairwise(roles)):
            return _error(400, "invalid_request_error", "roles must alternate, user first")
        for i, message in enumerate(messages):
            uses = _block_ids(message, "tool_use", "id")
            following = messages[i + 1] if i + 1 < len(messages) else {}
            if uses - _block_ids(following, "tool_result", "tool_use_id"):
                return _error(400, "invalid_request_error", "tool_use without tool_result")
        return None

    def _usage(self, body: dict[str, Any]) -> dict[str, int]:
        total = _tokens([body.get("tools"), body.get("system"), body.get("messages")])
        prefix = _prefix(body)
        read = written = 0
        if prefix is not None:
            digest = hashlib.sha256(json.dumps(prefix, sort_keys=True).encode()).hexdigest()
            size = min(total, _tokens(prefix))
            if digest in self.cache:
                read = size
            else:
                written = size
                self.cache.add(digest)
        return {
            "input_tokens": total - read - written,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
            "output_tokens": 0,
        }

    async def messages(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "invalid_request_error", "body is not JSON")
        refused = self._check(request, body)
        if refused is not None:
            return refused
        self.requests.append(body)
        text = _texts(body)
        if "[fault:429]" in text:
            return _error(429, "rate_limit_error", "rate limited (fake)")
        if "[fault:529]" in text:
            return _error(529, "overloaded_error", "Overloaded")
        words = ANSWER.split(" ")
        stop = "end_turn"
        if body["max_tokens"] < len(words):
            words, stop = words[: body["max_tokens"]], "max_tokens"
        choice = body.get("tool_choice") or {}
        tool = None
        if body.get("tools") and choice.get("type") in ("any", "tool"):
            name = choice.get("name") or body["tools"][0]["name"]
            tool = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:20]}", "name": name}
            stop = "tool_use"
        usage = self._usage(body)
        message_id = f"msg_{uuid.uuid4().hex[:24]}"
        if not body.get("stream"):
            content: list[dict[str, Any]] = [{"type": "text", "text": " ".join(words)}]
            if tool is not None:
                content = [{**tool, "input": TOOL_INPUT}]
            usage["output_tokens"] = len(words) if tool is None else 5
            return web.json_response(
                {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": body.get("model"),
                    "content": content,
                    "stop_reason": stop,
                    "stop_sequence": None,
                    "usage": usage,
                }
            )
        return await self._stream(request, body, message_id, words, stop, tool, usage, text)

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        message_id: str,
        words: list[str],
        stop: str,
        tool: dict[str, Any] | None,
        usage: dict[str, int],
        text: str,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def event(name: str, data: dict[str, Any]) -> None:
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

        start: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": body.get("model"),
            "content": [],
            "stop_reason": None,
            "usage": {**usage, "output_tokens": 1},
        }
        await event("message_start", {"type": "message_start", "message": start})
        await event("ping", {"type": "ping"})
        if tool is not None:
            block = {**tool, "input": {}}
            await event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": block},
            )
            raw = json.dumps(TOOL_INPUT)
            for piece in (raw[: len(raw) // 2], raw[len(raw) // 2 :]):
                delta = {"type": "input_json_delta", "partial_json": piece}
                await event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
            output = 5
        else:
            await event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            for i, word in enumerate(words):
                if "[fault:cut]" in text and i == 3:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                delta = {"type": "text_delta", "text": word if i == 0 else " " + word}
                await event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
                await asyncio.sleep(0)
            output = len(words)
        await event("content_block_stop", {"type": "content_block_stop", "index": 0})
        await event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": output},
            },
        )
        await event("message_stop", {"type": "message_stop"})
        await resp.write_eof()
        return resp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(Fake().app(), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
