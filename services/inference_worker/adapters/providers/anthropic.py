"""Adapter for Anthropic-compatible Messages APIs (``ProviderConfig.kind ==
"anthropic"``): ``POST {base_url}/v1/messages`` with ``x-api-key`` and
``anthropic-version``, streamed (SSE: ``message_start`` ... ``message_stop``) or not, over
one pooled aiohttp session.

The canonical request becomes a Messages body: system messages the ``system`` blocks,
tool results user turns of ``tool_result`` blocks, tool calls ``tool_use`` blocks,
``image_url`` parts ``image`` blocks (a ``data:`` URL as base64, else a URL source),
tools with their ``input_schema``, ``tool_choice`` and ``parallel_tool_calls`` as
Anthropic's, ``stop`` as ``stop_sequences``, ``user`` as ``metadata.user_id``, ``top_k``
from the pass-through members. Anthropic's prompt-cache breakpoints
(``cache_control_json`` on parts, messages and tools) are passed on as sent.

Answers come back as the canonical choice: text, ``tool_use`` blocks as tool calls
(``input`` as JSON arguments), ``stop_reason`` as the finish reason (``max_tokens`` ->
``length``, ``tool_use`` -> ``tool_calls``, ``refusal`` -> ``content_filter``, else
``stop``). Usage: the prompt is ``input_tokens`` plus the cache reads and writes
(Anthropic counts them apart), ``cached_input_tokens`` the cache reads.

Not covered: ``response_format`` (Anthropic's structured outputs), ``n`` > 1,
``logprobs`` (the Messages API has none), ``seed``, penalties, extended thinking, server
tools, and the price of cache writes (counted as plain input tokens).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import aiohttp
import msgspec
from sluice import tokens
from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2

from services.inference_worker.adapters.providers import wire
from services.inference_worker.adapters.providers.http import PooledHttpProvider
from services.inference_worker.domain.upstream import (
    ChoiceAssembler,
    DeltaSink,
    UpstreamAnswer,
    UpstreamFailure,
)

log = logging.getLogger(__name__)

API_VERSION = "2023-06-01"
# Anthropic requires max_tokens; a request that names none gets this.
DEFAULT_MAX_TOKENS = 4096
_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()
_MAX_ERROR_BODY = 64 * 1024
_DATA_URL = re.compile(r"^data:(?P<media>[\w/+.-]+);base64,(?P<data>.*)$", re.DOTALL)
_FINISH = {
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
}


def _cache(target: dict[str, Any], cache_control_json: str) -> dict[str, Any]:
    if cache_control_json:
        target["cache_control"] = _DECODER.decode(cache_control_json)
    return target


def _part_block(part: chat_pb2.ContentPart) -> dict[str, Any] | None:
    if part.raw_json:
        return None
    if part.type == "image_url":
        match = _DATA_URL.match(part.image_url)
        if match:
            source = {"type": "base64", "media_type": match["media"], "data": match["data"]}
        else:
            source = {"type": "url", "url": part.image_url}
        return _cache({"type": "image", "source": source}, part.cache_control_json)
    return _cache({"type": "text", "text": part.text}, part.cache_control_json)


def _blocks(message: chat_pb2.Message) -> list[dict[str, Any]]:
    if message.HasField("text"):
        blocks = [{"type": "text", "text": message.text}] if message.text else []
    else:
        blocks = [b for b in (_part_block(p) for p in message.parts) if b is not None]
    if message.cache_control_json and blocks and "cache_control" not in blocks[-1]:
        _cache(blocks[-1], message.cache_control_json)
    return blocks


def _tool_input(arguments: str) -> Any:
    if not arguments.strip():
        return {}
    try:
        value = _DECODER.decode(arguments)
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _append(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Consecutive turns of one role become one (the Messages API alternates roles)."""
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def request_to_json(
    request: chat_pb2.ChatRequest, upstream_model: str, *, stream: bool
) -> dict[str, Any]:
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for message in request.messages:
        if message.role in ("system", "developer"):
            system.extend(_blocks(message))
        elif message.role == "tool":
            content: Any = message.text
            if not message.HasField("text"):
                content = [b for b in (_part_block(p) for p in message.parts) if b is not None]
            result = {
                "type": "tool_result",
                "tool_use_id": message.tool_call_id,
                "content": content,
            }
            _append(turns, "user", [_cache(result, message.cache_control_json)])
        elif message.role == "assistant":
            blocks = [] if message.tool_calls and not message.text else _blocks(message)
            for call in message.tool_calls:
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.name,
                        "input": _tool_input(call.arguments),
                    }
                )
            if message.tool_calls and message.cache_control_json and blocks:
                _cache(blocks[-1], message.cache_control_json)
            _append(turns, "assistant", blocks)
        else:
            _append(turns, "user", _blocks(message))
    body: dict[str, Any] = {"model": upstream_model, "messages": turns}
    if system:
        body["system"] = system
    s = request.sampling
    body["max_tokens"] = s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if s.HasField("temperature"):
        # Anthropic's range is 0 to 1; OpenAI's 0 to 2.
        body["temperature"] = min(1.0, s.temperature)
    if s.HasField("top_p"):
        body["top_p"] = s.top_p
    if s.stop:
        body["stop_sequences"] = list(s.stop)
    if request.extra_json:
        extra = _DECODER.decode(request.extra_json)
        if isinstance(extra, dict) and isinstance(extra.get("top_k"), int):
            body["top_k"] = extra["top_k"]
    if request.tools:
        body["tools"] = [
            _cache(
                {
                    "name": t.name,
                    "description": t.description,
                    "input_schema": (
                        _DECODER.decode(t.parameters_json)
                        if t.parameters_json
                        else {"type": "object"}
                    ),
                },
                t.cache_control_json,
            )
            for t in request.tools
        ]
    choice = _DECODER.decode(request.tool_choice_json) if request.tool_choice_json else None
    tool_choice: dict[str, Any] | None = None
    if choice == "required":
        tool_choice = {"type": "any"}
    elif choice in ("auto", "none"):
        tool_choice = {"type": choice}
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name:
            tool_choice = {"type": "tool", "name": name}
    if request.HasField("parallel_tool_calls") and not request.parallel_tool_calls:
        tool_choice = {**(tool_choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if tool_choice is not None and request.tools:
        body["tool_choice"] = tool_choice
    if request.user:
        body["metadata"] = {"user_id": request.user}
    if stream:
        body["stream"] = True
    return body


def usage_from_json(data: Any) -> chat_pb2.Usage | None:
    if not isinstance(data, dict):
        return None
    read = int(data.get("cache_read_input_tokens") or 0)
    written = int(data.get("cache_creation_input_tokens") or 0)
    return chat_pb2.Usage(
        input_tokens=int(data.get("input_tokens") or 0) + read + written,
        output_tokens=int(data.get("output_tokens") or 0),
        cached_input_tokens=read,
    )


def _finish(stop_reason: Any) -> str:
    return _FINISH.get(str(stop_reason or ""), "stop")


def choice_from_json(data: dict[str, Any]) -> chat_pb2.Choice:
    texts: list[str] = []
    calls: list[chat_pb2.ToolCall] = []
    for block in data.get("content") or ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(str(block.get("text") or ""))
        elif block.get("type") == "tool_use":
            calls.append(
                chat_pb2.ToolCall(
                    index=len(calls),
                    id=str(block.get("id") or ""),
                    type="function",
                    name=str(block.get("name") or ""),
                    arguments=_ENCODER.encode(block.get("input") or {}).decode(),
                )
            )
    return chat_pb2.Choice(
        index=0,
        content="".join(texts),
        tool_calls=calls,
        finish_reason=_finish(data.get("stop_reason")),
    )


def error_from_status(
    status: int, headers: Any, body: bytes, provider: str
) -> tuple[SluiceError, bool]:
    # 529 overloaded_error: the provider is out of capacity, as a 503 says elsewhere.
    return wire.error_from_status(503 if status == 529 else status, headers, body, provider)


class _Stream:
    def __init__(self) -> None:
        self.assembler = ChoiceAssembler()
        self.relayed = False
        self.first_at: float | None = None
        self.usage = chat_pb2.Usage()
        self.usage_seen = False
        self.response_id = ""
        self.model = ""
        self.done = False
        # Content block index -> the tool call's index in the choice.
        self.tools: dict[int, int] = {}
        self.role_sent = False


class AnthropicProvider(PooledHttpProvider):
    """One Anthropic-compatible deployment."""

    path = "/v1/messages"

    def headers(self) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "accept": "application/json",
            "anthropic-version": API_VERSION,
        }
        key = self.config.api_key()
        if key:
            headers["x-api-key"] = key
        return headers

    async def chat(
        self,
        request: chat_pb2.ChatRequest,
        upstream_model: str,
        *,
        on_delta: DeltaSink | None = None,
        deadline: float | None = None,
    ) -> UpstreamAnswer:
        stream = on_delta is not None
        body = _ENCODER.encode(request_to_json(request, upstream_model, stream=stream))
        started = time.monotonic()
        state = _Stream()
        name = self.config.name
        try:
            async with self._client().post(
                self._url, data=body, timeout=self._timeout(deadline, stream)
            ) as resp:
                if resp.status >= 400:
                    raw = await resp.content.read(_MAX_ERROR_BODY)
                    error, permanent = error_from_status(resp.status, resp.headers, raw, name)
                    raise UpstreamFailure(error, upstream_status=resp.status, permanent=permanent)
                if on_delta is None:
                    return self._answer(request, _DECODER.decode(await resp.read()), started)
                await self._read_stream(resp, state, on_delta, started)
        except UpstreamFailure as failure:
            failure.relayed = state.relayed
            if state.relayed:
                failure.usage = self._partial_usage(request, state)
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise self._failure(
                request, state, ErrorCode.UPSTREAM_TIMEOUT, f"provider {name} timed out", "timeout"
            ) from exc
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            code = (
                ErrorCode.UPSTREAM_STREAM_INTERRUPTED
                if state.relayed
                else ErrorCode.UPSTREAM_UNAVAILABLE
            )
            raise self._failure(
                request, state, code, f"cannot reach provider {name}", "connect"
            ) from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise self._failure(
                request,
                state,
                ErrorCode.UPSTREAM_ERROR,
                f"provider {name} broke the connection",
                "connection_closed",
            ) from exc
        except (msgspec.DecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise self._failure(
                request,
                state,
                ErrorCode.UPSTREAM_ERROR,
                f"provider {name} sent a malformed answer",
                "malformed",
            ) from exc
        choices = state.assembler.choices()
        usage = state.usage if state.usage_seen else self._partial_usage(request, state)
        return UpstreamAnswer(
            response_id=state.response_id,
            model=state.model,
            created_unix=int(time.time()),
            choices=choices,
            usage=usage,
            usage_reported=state.usage_seen,
            ttft_s=state.first_at,
            total_s=time.monotonic() - started,
        )

    def _failure(
        self,
        request: chat_pb2.ChatRequest,
        state: _Stream,
        code: ErrorCode,
        detail: str,
        cause: str,
    ) -> UpstreamFailure:
        if state.relayed:
            code = ErrorCode.UPSTREAM_STREAM_INTERRUPTED
        error = SluiceError(code, detail, {"provider": self.config.name, "cause": cause})
        usage = self._partial_usage(request, state) if state.relayed else chat_pb2.Usage()
        return UpstreamFailure(error, usage=usage, relayed=state.relayed)

    @staticmethod
    def _partial_usage(request: chat_pb2.ChatRequest, state: _Stream) -> chat_pb2.Usage:
        if state.usage_seen:
            return state.usage
        return chat_pb2.Usage(
            input_tokens=tokens.count_chat(request),
            output_tokens=state.assembler.output_text_tokens(),
        )

    def _answer(self, request: chat_pb2.ChatRequest, data: Any, started: float) -> UpstreamAnswer:
        if not isinstance(data, dict):
            raise ValueError("answer is not a JSON object")
        if data.get("type") == "error":
            error, permanent = wire.error_from_stream_event(data, self.config.name)
            raise UpstreamFailure(error, permanent=permanent)
        choice = choice_from_json(data)
        usage = usage_from_json(data.get("usage"))
        reported = usage is not None
        if usage is None:
            usage = chat_pb2.Usage(
                input_tokens=tokens.count_chat(request),
                output_tokens=wire.count_choices([choice]),
            )
        return UpstreamAnswer(
            response_id=str(data.get("id") or ""),
            model=str(data.get("model") or ""),
            created_unix=int(time.time()),
            choices=[choice],
            usage=usage,
            usage_reported=reported,
            total_s=time.monotonic() - started,
        )

    async def _read_stream(
        self,
        resp: aiohttp.ClientResponse,
        state: _Stream,
        on_delta: DeltaSink,
        started: float,
    ) -> None:
        data_lines: list[bytes] = []
        async for raw_line in resp.content:
            line = raw_line.rstrip(b"\r\n")
            if line:
                if line.startswith(b"data:"):
                    data_lines.append(line[5:].lstrip(b" "))
                continue
            if not data_lines:
                continue
            payload = b"\n".join(data_lines)
            data_lines.clear()
            await self._on_event(_DECODER.decode(payload), state, on_delta, started)
            if state.done:
                break
        if not state.done:
            raise aiohttp.ClientPayloadError("stream ended before message_stop")

    async def _on_event(
        self, data: Any, state: _Stream, on_delta: DeltaSink, started: float
    ) -> None:
        if not isinstance(data, dict):
            raise ValueError("stream event is not a JSON object")
        kind = data.get("type")
        if kind == "error":
            error, permanent = wire.error_from_stream_event(data, self.config.name)
            raise UpstreamFailure(error, permanent=permanent)
        if kind == "message_start":
            message = data.get("message") or {}
            state.response_id = str(message.get("id") or "")
            state.model = str(message.get("model") or "")
            usage = usage_from_json(message.get("usage"))
            if usage is not None:
                state.usage, state.usage_seen = usage, True
        elif kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                call_index = len(state.tools)
                state.tools[int(data.get("index") or 0)] = call_index
                call = chat_pb2.ToolCall(
                    index=call_index,
                    id=str(block.get("id") or ""),
                    type="function",
                    name=str(block.get("name") or ""),
                )
                await self._relay(inference_pb2.Delta(tool_calls=[call]), state, on_delta, started)
            elif block.get("type") == "text" and block.get("text"):
                opening = inference_pb2.Delta(content=str(block["text"]))
                await self._relay(opening, state, on_delta, started)
        elif kind == "content_block_delta":
            change = data.get("delta") or {}
            if change.get("type") == "text_delta" and change.get("text"):
                out = inference_pb2.Delta(content=str(change["text"]))
                await self._relay(out, state, on_delta, started)
            elif change.get("type") == "input_json_delta" and change.get("partial_json"):
                call_index = state.tools.get(int(data.get("index") or 0), 0)
                call = chat_pb2.ToolCall(index=call_index, arguments=str(change["partial_json"]))
                await self._relay(inference_pb2.Delta(tool_calls=[call]), state, on_delta, started)
        elif kind == "message_delta":
            ending = data.get("delta") or {}
            counts = data.get("usage") or {}
            if isinstance(counts, dict) and "output_tokens" in counts:
                # Cumulative; the prompt side was given in message_start.
                state.usage.output_tokens = int(counts.get("output_tokens") or 0)
                state.usage_seen = True
            if ending.get("stop_reason"):
                finish = inference_pb2.Delta(finish_reason=_finish(ending["stop_reason"]))
                await self._relay(finish, state, on_delta, started)
        elif kind == "message_stop":
            state.done = True

    async def _relay(
        self, delta: inference_pb2.Delta, state: _Stream, on_delta: DeltaSink, started: float
    ) -> None:
        if not state.role_sent:
            delta.role = "assistant"
            state.role_sent = True
        state.assembler.add(delta)
        if state.first_at is None:
            state.first_at = time.monotonic() - started
        await on_delta(delta)
        state.relayed = True
