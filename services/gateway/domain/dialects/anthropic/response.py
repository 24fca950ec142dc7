"""The Anthropic Messages API's answers: ``message`` bodies, the stream of
``message_start`` ... ``message_stop`` events and Anthropic error bodies, as the
``ANTHROPIC`` dialect. The mappings are listed in ``anthropic/request.py``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from sluice.common.v1 import chat_pb2
from sluice.errors import SluiceError
from sluice.inference.v1 import inference_pb2

from services.gateway.domain.dialects.common import Dialect, RequestMeta, final_sluice
from services.gateway.domain.dialects.ratelimit import anthropic_rate_limit_headers
from services.gateway.domain.problems import problem_body

_STOP_REASONS = {
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def stop_reason(finish_reason: str, *, tool_calls: bool, refusal: bool) -> str:
    if refusal:
        return "refusal"
    mapped = _STOP_REASONS.get(finish_reason)
    if mapped is not None:
        return mapped
    # Some servers finish a tool call with "stop".
    return "tool_use" if tool_calls else "end_turn"


def anthropic_usage(usage: chat_pb2.Usage) -> dict[str, int]:
    cached = usage.cached_input_tokens
    return {
        "input_tokens": max(0, usage.input_tokens - cached),
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def message_id(meta: RequestMeta) -> str:
    return "msg_" + meta.request_id.removeprefix("req_")


def _tool_id(meta: RequestMeta, call: chat_pb2.ToolCall) -> str:
    """The call's id; one made up when the provider gave none, since the client needs it
    to send the tool_result back."""
    return call.id or f"toolu_{meta.request_id.removeprefix('req_')}_{call.index}"


def tool_input(arguments: str) -> Any:
    """The arguments as the ``input`` object. Text that is not a JSON object (a model's
    mistake) is passed on as the string rather than dropped."""
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return arguments
    return value if isinstance(value, dict) else arguments


def _first_choice(final: inference_pb2.Final) -> chat_pb2.Choice | None:
    # The route never asks for n > 1, so the answer is choice 0.
    for choice in final.choices:
        if choice.index == 0:
            return choice
    return None


def message_body(meta: RequestMeta, final: inference_pb2.Final, *, cache_hit: bool) -> bytes:
    content: list[dict[str, Any]] = []
    reason = "end_turn"
    choice = _first_choice(final)
    if choice is not None:
        for text in (choice.content, choice.refusal):
            if text:
                content.append({"type": "text", "text": text})
        for call in choice.tool_calls:
            content.append(
                {
                    "type": "tool_use",
                    "id": _tool_id(meta, call),
                    "name": call.name,
                    "input": tool_input(call.arguments),
                }
            )
        reason = stop_reason(
            choice.finish_reason, tool_calls=bool(choice.tool_calls), refusal=bool(choice.refusal)
        )
    body = {
        "id": message_id(meta),
        "type": "message",
        "role": "assistant",
        "model": meta.model_requested,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": None,
        "usage": anthropic_usage(final.usage),
        "sluice": final_sluice(meta, final, cache_hit=cache_hit),
    }
    return orjson.dumps(body)


def _event(name: bytes, data: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name, orjson.dumps(data))


_PING = _event(b"ping", {"type": "ping"})
_MESSAGE_STOP = _event(b"message_stop", {"type": "message_stop"})


class MessageStreamRelay:
    """Turns worker ``StreamEvent``s into the Messages API's stream for one request:
    ``message_start``, then per content block ``content_block_start``,
    ``content_block_delta`` (``text_delta`` or ``input_json_delta``) and
    ``content_block_stop``, then ``message_delta`` (stop reason, usage, ``sluice``) and
    ``message_stop``.

    Blocks are numbered in the order they open, and one is open at a time: text after a
    tool call opens a new text block. ``message_start`` goes out with whatever comes
    first, a ping included, so it always leads.
    """

    def __init__(self, meta: RequestMeta, *, include_usage: bool = False) -> None:
        # include_usage is an OpenAI option: this stream always ends with its usage.
        self.meta = meta
        self._id = b"id: %s:" % meta.request_id.encode()
        self._started = False
        self._last_index = -1
        self._open: int | None = None
        self._open_is_text = False
        self._tool_blocks: dict[int, int] = {}
        self._finish = ""
        self._refusal = False

    def _start(self, usage: dict[str, int]) -> bytes:
        self._started = True
        message: dict[str, Any] = {
            "id": message_id(self.meta),
            "type": "message",
            "role": "assistant",
            "model": self.meta.model_requested,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        return _event(b"message_start", {"type": "message_start", "message": message})

    def _opening(self) -> list[bytes]:
        if self._started:
            return []
        usage = {
            "input_tokens": self.meta.prompt_tokens,
            "output_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        return [self._start(usage)]

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        index, self._open = self._open, None
        return _event(b"content_block_stop", {"type": "content_block_stop", "index": index})

    def _open_block(self, block: dict[str, Any], *, text: bool) -> bytes:
        closed = self._close()
        self._last_index += 1
        self._open, self._open_is_text = self._last_index, text
        start = {"type": "content_block_start", "index": self._last_index, "content_block": block}
        return closed + _event(b"content_block_start", start)

    def _text(self, text: str) -> bytes:
        out = b""
        if self._open is None or not self._open_is_text:
            out = self._open_block({"type": "text", "text": ""}, text=True)
        delta = {"type": "text_delta", "text": text}
        return out + _event(
            b"content_block_delta",
            {"type": "content_block_delta", "index": self._open, "delta": delta},
        )

    def _tool(self, call: chat_pb2.ToolCall) -> bytes:
        out = b""
        index = self._tool_blocks.get(call.index)
        if index is None:
            block = {
                "type": "tool_use",
                "id": _tool_id(self.meta, call),
                "name": call.name,
                "input": {},
            }
            out = self._open_block(block, text=False)
            index = self._tool_blocks[call.index] = self._last_index
        if call.arguments:
            # A fragment of a call whose block has closed (providers interleaving calls,
            # which OpenAI-compatible ones do not) still goes to its own index.
            delta = {"type": "input_json_delta", "partial_json": call.arguments}
            out += _event(
                b"content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
        return out

    def _answer(
        self, content: str, refusal: str, calls: Iterable[chat_pb2.ToolCall]
    ) -> list[bytes]:
        out: list[bytes] = []
        if content:
            out.append(self._text(content))
        if refusal:
            self._refusal = True
            out.append(self._text(refusal))
        out.extend(self._tool(call) for call in calls)
        return out

    def _tagged(self, sequence: int, out: list[bytes]) -> bytes:
        """The events of one stream event, the last carrying ``id: <request>:<n>`` (as
        on chat completions), so that ``Last-Event-ID`` resumes after a whole group."""
        body = b"".join(out)
        if not body or sequence <= 0:
            return body
        # Before the blank line that ends the last event: a field of that event.
        return body[:-1] + self._id + b"%d\n\n" % sequence

    def delta(self, sequence: int, d: inference_pb2.Delta) -> bytes:
        out = self._opening()
        if d.choice_index == 0:
            out.extend(self._answer(d.content, d.refusal, d.tool_calls))
            if d.finish_reason:
                self._finish = d.finish_reason
        return self._tagged(sequence, out)

    def final(self, sequence: int, final: inference_pb2.Final, sluice: dict[str, Any]) -> bytes:
        out = self._opening()
        choice = _first_choice(final)
        if choice is not None:
            if self._last_index < 0 and not self._finish:
                # Nothing was streamed: the final carries the whole answer.
                out.extend(self._answer(choice.content, choice.refusal, choice.tool_calls))
            self._finish = self._finish or choice.finish_reason
        out.append(self._close())
        reason = stop_reason(
            self._finish, tool_calls=bool(self._tool_blocks), refusal=self._refusal
        )
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": None},
            "usage": anthropic_usage(final.usage),
            "sluice": sluice,
        }
        out.append(_event(b"message_delta", delta))
        out.append(_MESSAGE_STOP)
        return self._tagged(sequence, out)

    def replay(self, final: inference_pb2.Final, sluice: dict[str, Any]) -> bytes:
        usage = anthropic_usage(final.usage)
        usage["output_tokens"] = 0
        return self._start(usage) + self.final(0, final, sluice)

    def failure(self, sequence: int, problem_json: bytes) -> bytes:
        return self._tagged(sequence, [b"event: error\ndata: %s\n\n" % problem_json])

    def heartbeat(self) -> bytes:
        return b"".join(self._opening()) + _PING


def error_object(
    err: SluiceError, *, instance: str, request_id: str, trace_id: str
) -> dict[str, Any]:
    problem = problem_body(err, instance=instance, request_id=request_id, trace_id=trace_id)
    return {
        "type": "error",
        "error": {
            "type": err.spec.anthropic_type,
            "message": problem["detail"],
            "param": err.param,
        },
        "request_id": request_id,
        "code": problem["code"],
        "trace_id": trace_id,
        "title": problem["title"],
        "status": problem["status"],
        "detail": problem["detail"],
        "instance": instance,
        "details": problem["details"],
    }


def render_error(err: SluiceError, *, instance: str, request_id: str, trace_id: str) -> bytes:
    body = error_object(err, instance=instance, request_id=request_id, trace_id=trace_id)
    return orjson.dumps(body, default=str)


ANTHROPIC = Dialect(
    name="anthropic",
    body=message_body,
    stream=MessageStreamRelay,
    error=render_error,
    limit_headers=anthropic_rate_limit_headers,
    error_media_type="application/json",
)
