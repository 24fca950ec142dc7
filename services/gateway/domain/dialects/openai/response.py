"""OpenAI response shapes: ``chat.completion`` bodies, ``chat.completion.chunk`` SSE
events (each with its ``sluice`` object on the last one) and problem+json errors, as the
``OPENAI`` dialect."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from sluice.common.v1 import chat_pb2
from sluice.inference.v1 import inference_pb2

from services.gateway.domain.dialects.common import (
    SSE_DONE,
    SSE_HEARTBEAT,
    Dialect,
    RequestMeta,
    final_sluice,
)
from services.gateway.domain.dialects.ratelimit import rate_limit_headers
from services.gateway.domain.problems import PROBLEM_CONTENT_TYPE, render_problem


def openai_usage(u: chat_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


def _tool_calls_full(calls: Iterable[chat_pb2.ToolCall]) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id,
            "type": c.type or "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for c in calls
    ]


def _token_json(token: chat_pb2.TokenLogprob) -> dict[str, Any]:
    out: dict[str, Any] = {
        "token": token.token,
        "logprob": token.logprob,
        "bytes": list(token.bytes) if token.bytes else None,
    }
    out["top_logprobs"] = [
        {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes) if t.bytes else None}
        for t in token.top_logprobs
    ]
    return out


def logprobs_json(logprobs: chat_pb2.Logprobs) -> dict[str, Any]:
    """OpenAI's ``choices[].logprobs`` object."""
    return {
        "content": [_token_json(t) for t in logprobs.content] or None,
        "refusal": [_token_json(t) for t in logprobs.refusal] or None,
    }


def _choice_logprobs(meta: RequestMeta, holder: Any) -> dict[str, Any] | None:
    # Only for a caller who asked: the gateway may ask the provider on its own, to
    # measure confidence.
    if not meta.checks.logprobs or not holder.HasField("logprobs"):
        return None
    return logprobs_json(holder.logprobs)


def completion_body(meta: RequestMeta, final: inference_pb2.Final, *, cache_hit: bool) -> bytes:
    choices = []
    for c in final.choices:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": c.content if (c.content or not c.tool_calls) else None,
            "refusal": c.refusal or None,
        }
        if c.tool_calls:
            message["tool_calls"] = _tool_calls_full(c.tool_calls)
        choices.append(
            {
                "index": c.index,
                "message": message,
                "finish_reason": c.finish_reason or "stop",
                "logprobs": _choice_logprobs(meta, c),
            }
        )
    body = {
        "id": meta.completion_id,
        "object": "chat.completion",
        "created": final.created_unix or meta.created,
        "model": final.model_served or meta.model_requested,
        "choices": choices,
        "usage": openai_usage(final.usage),
        "system_fingerprint": final.system_fingerprint or None,
        "sluice": final_sluice(meta, final, cache_hit=cache_hit),
    }
    return orjson.dumps(body)


def _tool_call_delta(c: chat_pb2.ToolCall) -> dict[str, Any]:
    out: dict[str, Any] = {"index": c.index}
    if c.id:
        out["id"] = c.id
    if c.type or c.id:
        out["type"] = c.type or "function"
    fn: dict[str, str] = {"arguments": c.arguments}
    if c.name:
        fn["name"] = c.name
    out["function"] = fn
    return out


class SseRelay:
    """Turns worker ``StreamEvent``s into OpenAI chunk events for one request.

    Tracks which choices have had their role, content and finish sent, so the end of the
    stream adds only what the deltas did not carry, and the last chunk carries ``sluice``.
    """

    def __init__(self, meta: RequestMeta, *, include_usage: bool) -> None:
        self.meta = meta
        self.include_usage = include_usage
        self._prefix = f"id: {meta.request_id}:".encode()
        self._head = {
            "id": meta.completion_id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model_requested,
        }
        self._role_sent: set[int] = set()
        self._content_sent: set[int] = set()
        self._finished: set[int] = set()

    def _event(self, sequence: int, chunk: dict[str, Any]) -> bytes:
        return b"%s%d\ndata: %s\n\n" % (self._prefix, sequence, orjson.dumps(chunk))

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = dict(self._head)
        chunk["choices"] = choices
        return chunk

    def _choice_delta(
        self,
        index: int,
        *,
        content: str = "",
        tool_calls: Iterable[chat_pb2.ToolCall] = (),
        refusal: str = "",
        finish_reason: str = "",
    ) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if index not in self._role_sent:
            delta["role"] = "assistant"
            self._role_sent.add(index)
        calls = [_tool_call_delta(c) for c in tool_calls]
        if content or (not calls and not refusal and not finish_reason):
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        if refusal:
            delta["refusal"] = refusal
        if content or calls or refusal:
            self._content_sent.add(index)
        if finish_reason:
            self._finished.add(index)
        return {
            "index": index,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish_reason or None,
        }

    def delta(self, sequence: int, d: inference_pb2.Delta) -> bytes:
        choice = self._choice_delta(
            d.choice_index,
            content=d.content,
            tool_calls=d.tool_calls,
            refusal=d.refusal,
            finish_reason=d.finish_reason,
        )
        choice["logprobs"] = _choice_logprobs(self.meta, d)
        return self._event(sequence, self._chunk([choice]))

    def final(self, sequence: int, final: inference_pb2.Final, sluice: dict[str, Any]) -> bytes:
        chunks: list[dict[str, Any]] = []
        for c in final.choices:
            if c.index in self._finished:
                continue
            unsent = c.index not in self._content_sent
            chunks.append(
                self._chunk(
                    [
                        self._choice_delta(
                            c.index,
                            content=c.content if unsent else "",
                            tool_calls=c.tool_calls if unsent else (),
                            refusal=c.refusal if unsent else "",
                            finish_reason=c.finish_reason or "stop",
                        )
                    ]
                )
            )
        open_choices = sorted(self._role_sent - self._finished)
        if not final.choices and not self._role_sent:
            open_choices = [0]
        for index in open_choices:
            chunks.append(self._chunk([self._choice_delta(index, finish_reason="stop")]))
        if self.include_usage:
            usage_chunk = self._chunk([])
            usage_chunk["usage"] = openai_usage(final.usage)
            chunks.append(usage_chunk)
        if not chunks:
            chunks.append(self._chunk([]))
        chunks[-1]["sluice"] = sluice
        return b"".join(self._event(sequence, c) for c in chunks) + SSE_DONE

    def replay(self, final: inference_pb2.Final, sluice: dict[str, Any]) -> bytes:
        """A whole stream synthesised from a finished answer (a cache hit)."""
        events = []
        sequence = 0
        for c in final.choices:
            sequence += 1
            choice = self._choice_delta(
                c.index, content=c.content, tool_calls=c.tool_calls, refusal=c.refusal
            )
            choice["logprobs"] = _choice_logprobs(self.meta, c)
            events.append(self._event(sequence, self._chunk([choice])))
        events.append(self.final(sequence + 1, final, sluice))
        return b"".join(events)

    def failure(self, sequence: int, problem_json: bytes) -> bytes:
        return b"%s%d\nevent: error\ndata: %s\n\n" % (self._prefix, sequence, problem_json)

    def heartbeat(self) -> bytes:
        return SSE_HEARTBEAT


OPENAI = Dialect(
    name="openai",
    body=completion_body,
    stream=SseRelay,
    error=render_problem,
    limit_headers=rate_limit_headers,
    error_media_type=PROBLEM_CONTENT_TYPE,
)
