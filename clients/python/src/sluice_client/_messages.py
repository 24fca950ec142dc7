"""Resuming a Messages stream.

The gateway's ``/v1/messages`` stream carries no ``id:`` lines, and its resume route
(``GET /v1/streams/{request_id}``) replays a stream as chat completion chunks. So after
a broken connection the client replays the stream from its start, renders the chunks
as Messages events again (the gateway's rules: blocks numbered in the order they open,
one open at a time, text after a tool call in a new block), and passes on only what the
caller has not had: by block, by the characters of text or tool input already yielded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sluice_client._sse import SseEvent

_STOP_REASONS = {
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _stop_reason(finish_reason: str, *, tool_calls: bool, refusal: bool) -> str:
    if refusal:
        return "refusal"
    mapped = _STOP_REASONS.get(finish_reason)
    if mapped is not None:
        return mapped
    return "tool_use" if tool_calls else "end_turn"


def _usage(sluice: dict[str, Any] | None) -> dict[str, int] | None:
    usage = (sluice or {}).get("usage")
    if not isinstance(usage, dict):
        return None
    cached = int(usage.get("cached_input_tokens") or 0)
    return {
        "input_tokens": max(0, int(usage.get("input_tokens") or 0) - cached),
        "output_tokens": int(usage.get("output_tokens") or 0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


@dataclass
class _Block:
    kind: str
    emitted: str = ""
    stopped: bool = False


@dataclass
class _Renderer:
    """Chat completion chunks of choice 0 as Messages events (no ``message_start``)."""

    last_index: int = -1
    open: int | None = None
    open_is_text: bool = False
    tool_blocks: dict[int, int] = field(default_factory=dict)
    texts: dict[int, str] = field(default_factory=dict)
    finish: str = ""
    refusal: bool = False
    sluice: dict[str, Any] | None = None

    def _close(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        index, self.open = self.open, None
        return [{"type": "content_block_stop", "index": index}]

    def _open_block(self, block: dict[str, Any], *, text: bool) -> list[dict[str, Any]]:
        out = self._close()
        self.last_index += 1
        self.open, self.open_is_text = self.last_index, text
        self.texts[self.last_index] = ""
        out.append(
            {"type": "content_block_start", "index": self.last_index, "content_block": block}
        )
        return out

    def _text(self, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.open is None or not self.open_is_text:
            out = self._open_block({"type": "text", "text": ""}, text=True)
        assert self.open is not None
        self.texts[self.open] += text
        delta = {"type": "text_delta", "text": text}
        out.append({"type": "content_block_delta", "index": self.open, "delta": delta})
        return out

    def _tool(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        position = int(call.get("index") or 0)
        function = call.get("function") or {}
        index = self.tool_blocks.get(position)
        if index is None:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": call.get("id") or "",
                "name": function.get("name") or "",
                "input": {},
            }
            out = self._open_block(block, text=False)
            index = self.tool_blocks[position] = self.last_index
        arguments = function.get("arguments") or ""
        if arguments:
            self.texts[index] += arguments
            delta = {"type": "input_json_delta", "partial_json": arguments}
            out.append({"type": "content_block_delta", "index": index, "delta": delta})
        return out

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if isinstance(chunk.get("sluice"), dict):
            self.sluice = chunk["sluice"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out.extend(self._text(delta["content"]))
            if delta.get("refusal"):
                self.refusal = True
                out.extend(self._text(delta["refusal"]))
            for call in delta.get("tool_calls") or ():
                out.extend(self._tool(call))
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return out

    def end(self) -> list[dict[str, Any]]:
        out = self._close()
        reason = _stop_reason(self.finish, tool_calls=bool(self.tool_blocks), refusal=self.refusal)
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": None},
        }
        usage = _usage(self.sluice)
        if usage is not None:
            delta["usage"] = usage
        if self.sluice is not None:
            delta["sluice"] = self.sluice
        out.append(delta)
        out.append({"type": "message_stop"})
        return out


class ResumeMismatch(Exception):
    """The replayed stream does not continue what the caller already had."""


@dataclass
class MessageTracker:
    """What a Messages stream has yielded, and the replay's events that are new."""

    started: bool = False
    blocks: dict[int, _Block] = field(default_factory=dict)
    delta_sent: bool = False
    stopped: bool = False
    _renderer: _Renderer = field(default_factory=_Renderer)

    def observe(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        index = event.get("index")
        if kind == "message_start":
            self.started = True
        elif kind == "content_block_start" and isinstance(index, int):
            block = event.get("content_block") or {}
            self.blocks[index] = _Block(str(block.get("type", "")))
        elif kind == "content_block_delta" and isinstance(index, int):
            delta = event.get("delta") or {}
            piece = delta.get("text") or delta.get("partial_json") or ""
            self.blocks.setdefault(index, _Block("text")).emitted += piece
        elif kind == "content_block_stop" and isinstance(index, int):
            self.blocks.setdefault(index, _Block("text")).stopped = True
        elif kind == "message_delta":
            self.delta_sent = True
        elif kind == "message_stop":
            self.stopped = True

    def restart(self) -> None:
        """A new replay from the stream's start."""
        self._renderer = _Renderer()

    def _new(self, events: list[dict[str, Any]]) -> list[SseEvent]:
        out: list[SseEvent] = []
        for event in events:
            kind = event["type"]
            index = event.get("index")
            fresh: dict[str, Any] | None = event
            if kind == "content_block_start":
                if index in self.blocks:
                    fresh = None
            elif kind == "content_block_delta":
                assert isinstance(index, int)
                have = self.blocks[index].emitted if index in self.blocks else ""
                full = self._renderer.texts[index]
                if not (full.startswith(have) or have.startswith(full)):
                    raise ResumeMismatch(f"block {index} differs from what was streamed")
                if len(full) <= len(have):
                    fresh = None
                else:
                    key = "text" if event["delta"]["type"] == "text_delta" else "partial_json"
                    delta = dict(event["delta"])
                    delta[key] = full[len(have) :]
                    fresh = {**event, "delta": delta}
            elif kind == "content_block_stop":
                if index in self.blocks and self.blocks[index].stopped:
                    fresh = None
            elif (kind == "message_delta" and self.delta_sent) or (
                kind == "message_stop" and self.stopped
            ):
                fresh = None
            if fresh is not None:
                self.observe(fresh)
                out.append(SseEvent(json.dumps(fresh), event=kind))
        return out

    def replay_chunk(self, chunk: dict[str, Any]) -> list[SseEvent]:
        """The new Messages events in one replayed chat completion chunk."""
        return self._new(self._renderer.chunk(chunk))

    def replay_end(self) -> list[SseEvent]:
        """The new events at the replay's ``[DONE]``."""
        return self._new(self._renderer.end())
