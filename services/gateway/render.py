"""OpenAI response shapes: ``chat.completion`` bodies, ``chat.completion.chunk`` SSE
events, and the ``sluice`` object that rides on both; and ``Dialect``, the renderers a
public API plugs into the chat data path (``OPENAI`` here, Anthropic's in
``anthropic.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from sluice.common.v1 import chat_pb2
from sluice.errors import SluiceError
from sluice.inference.v1 import inference_pb2
from sluice.limiter.v1 import limiter_pb2

from services.gateway.problems import render_problem
from services.gateway.ratelimit import rate_limit_headers

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEARTBEAT = b": keep-alive\n\n"


def sse_retry(ms: int) -> bytes:
    """The reconnect hint (WHATWG ``retry:`` field) as a line to put in front of the
    stream's first event: an event of its own, without data, would reach the OpenAI
    SDK as an empty ``data`` that it fails to parse as JSON."""
    return b"retry: %d\n" % max(0, ms)


@dataclass
class RequestMeta:
    """What the gateway knows about one request, for the response and its ``sluice``."""

    request_id: str
    trace_id: str
    model_requested: str
    started: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))
    cache: str = "bypass"
    cache_ms: float = 0.0
    # Set on a semantic hit: how close the stored question was to this one.
    cache_similarity: float | None = None
    ttft_ms: float | None = None
    # The prompt as the gateway counted it: Anthropic's message_start reports it before
    # the provider's own count arrives with the answer.
    prompt_tokens: int = 0

    @property
    def completion_id(self) -> str:
        return "chatcmpl-" + self.request_id.removeprefix("req_")


def openai_usage(u: chat_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


def _ms(us: int) -> float:
    return round(us / 1000, 3)


def sluice_object(
    meta: RequestMeta,
    *,
    usage: chat_pb2.Usage,
    model_served: str,
    provider: str,
    cost_usd: float,
    timing: chat_pb2.Timing | None,
) -> dict[str, Any]:
    total = (time.perf_counter() - meta.started) * 1000
    queue = _ms(timing.queue_wait_us) if timing is not None else 0.0
    upstream = _ms(timing.upstream_total_us) if timing is not None else 0.0
    if meta.ttft_ms is not None:
        ttft = meta.ttft_ms
    elif timing is not None and timing.upstream_ttft_us:
        ttft = queue + _ms(timing.upstream_ttft_us)
    else:
        ttft = total
    sluice: dict[str, Any] = {
        "request_id": meta.request_id,
        "trace_id": meta.trace_id,
        "model_requested": meta.model_requested,
        "model_served": model_served,
        "provider": provider,
        "cache": meta.cache,
        "usage": {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
        },
        "cost_usd": cost_usd,
        "latency_ms": {
            "queue": queue,
            "cache": round(meta.cache_ms, 3),
            "ttft": round(ttft, 3),
            "upstream": upstream,
            "total": round(total, 3),
            "overhead": round(max(0.0, total - queue - upstream), 3),
        },
    }
    if meta.cache_similarity is not None:
        sluice["cache_similarity"] = round(meta.cache_similarity, 4)
    return sluice


def final_sluice(
    meta: RequestMeta, final: inference_pb2.Final, *, cache_hit: bool
) -> dict[str, Any]:
    return sluice_object(
        meta,
        usage=final.usage,
        model_served=final.model_served or meta.model_requested,
        provider=final.provider,
        # A cached answer costs nothing again.
        cost_usd=0.0 if cache_hit else final.cost_usd,
        timing=None if cache_hit else final.timing,
    )


def _tool_calls_full(calls: Iterable[chat_pb2.ToolCall]) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id,
            "type": c.type or "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for c in calls
    ]


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
                "logprobs": None,
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
            events.append(self._event(sequence, self._chunk([choice])))
        events.append(self.final(sequence + 1, final, sluice))
        return b"".join(events)

    def failure(self, sequence: int, problem_json: bytes) -> bytes:
        return b"%s%d\nevent: error\ndata: %s\n\n" % (self._prefix, sequence, problem_json)

    def heartbeat(self) -> bytes:
        return SSE_HEARTBEAT


# --- dialects -------------------------------------------------------------------------


class StreamRenderer(Protocol):
    """Renders one request's stream events as the SSE events of a public API."""

    def delta(self, sequence: int, d: inference_pb2.Delta) -> bytes: ...

    def final(self, sequence: int, final: inference_pb2.Final, sluice: dict[str, Any]) -> bytes: ...

    def failure(self, sequence: int, problem_json: bytes) -> bytes: ...

    def replay(self, final: inference_pb2.Final, sluice: dict[str, Any]) -> bytes:
        """A whole stream synthesised from a finished answer (a cache hit)."""
        ...

    def heartbeat(self) -> bytes:
        """What an idle stream sends to keep proxies from closing it."""
        ...


class StreamRendererFactory(Protocol):
    def __call__(self, meta: RequestMeta, *, include_usage: bool) -> StreamRenderer: ...


class BodyRenderer(Protocol):
    def __call__(
        self, meta: RequestMeta, final: inference_pb2.Final, *, cache_hit: bool
    ) -> bytes: ...


class ErrorRenderer(Protocol):
    def __call__(
        self, err: SluiceError, *, instance: str, request_id: str, trace_id: str
    ) -> bytes: ...


LimitHeaders = Callable[[Sequence[limiter_pb2.PolicyState], str], dict[str, str]]


@dataclass(frozen=True)
class Dialect:
    """How one public API answers on the shared chat data path: the whole body, the
    stream, the error body of a stream that fails mid-way, and the rate-limit headers.
    Everything else (admission, cache, work, relay, cost, tracing) is the same."""

    body: BodyRenderer
    stream: StreamRendererFactory
    error: ErrorRenderer
    limit_headers: LimitHeaders


OPENAI = Dialect(
    body=completion_body,
    stream=SseRelay,
    error=render_problem,
    limit_headers=rate_limit_headers,
)
