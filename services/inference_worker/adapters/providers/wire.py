"""The OpenAI chat-completions wire format: ChatRequest proto to JSON, JSON answers and
chunks to protos, usage, and provider errors to Sluice error codes. Pure functions."""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping
from typing import Any

import msgspec
from sluice import tokens
from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2

_DECODER = msgspec.json.Decoder()
MAX_PROVIDER_MESSAGE = 300
# Provider messages may quote the offending input (prompt text): quoted spans go.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`")
_CONTEXT_PATTERNS = re.compile(
    r"context[ _]length|maximum context|context window|exceeds? the available context",
    re.IGNORECASE,
)


def _json(text: str) -> Any:
    return _DECODER.decode(text)


def message_to_json(message: chat_pb2.Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role}
    if message.HasField("text"):
        out["content"] = message.text
    elif message.parts:
        parts: list[Any] = []
        for part in message.parts:
            if part.raw_json:
                parts.append(_DECODER.decode(part.raw_json))
            elif part.type == "image_url":
                image: dict[str, Any] = {"url": part.image_url}
                if part.image_detail:
                    image["detail"] = part.image_detail
                parts.append({"type": "image_url", "image_url": image})
            else:
                parts.append({"type": part.type or "text", "text": part.text})
        out["content"] = parts
    else:
        # An assistant turn that only calls tools has null content; others need a string.
        out["content"] = None if message.role == "assistant" else ""
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": call.type or "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def request_to_json(
    request: chat_pb2.ChatRequest, upstream_model: str, *, stream: bool
) -> dict[str, Any]:
    """The OpenAI body for ``request``; members of ``extra_json`` pass through verbatim
    (modelled members win on a clash, so ``model`` is always the upstream name)."""
    body: dict[str, Any] = {}
    if request.extra_json:
        extra = _json(request.extra_json)
        if isinstance(extra, dict):
            body.update(extra)
    body["model"] = upstream_model
    body["messages"] = [message_to_json(m) for m in request.messages]
    s = request.sampling
    if s.HasField("temperature"):
        body["temperature"] = s.temperature
    if s.HasField("top_p"):
        body["top_p"] = s.top_p
    if s.HasField("max_tokens"):
        body["max_tokens"] = s.max_tokens
    if s.HasField("n"):
        body["n"] = s.n
    if s.stop:
        body["stop"] = list(s.stop)
    if s.HasField("seed"):
        body["seed"] = s.seed
    if s.HasField("presence_penalty"):
        body["presence_penalty"] = s.presence_penalty
    if s.HasField("frequency_penalty"):
        body["frequency_penalty"] = s.frequency_penalty
    if s.logprobs:
        body["logprobs"] = True
    if s.HasField("top_logprobs"):
        body["top_logprobs"] = s.top_logprobs
    if request.tools:
        tools = []
        for tool in request.tools:
            function: dict[str, Any] = {"name": tool.name}
            if tool.description:
                function["description"] = tool.description
            if tool.parameters_json:
                function["parameters"] = _json(tool.parameters_json)
            if tool.HasField("strict"):
                function["strict"] = tool.strict
            tools.append({"type": tool.type or "function", "function": function})
        body["tools"] = tools
    if request.tool_choice_json:
        body["tool_choice"] = _json(request.tool_choice_json)
    if request.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = request.parallel_tool_calls
    rf = request.response_format
    if rf.type == "json_schema":
        schema: dict[str, Any] = {"name": rf.schema_name or "response"}
        if rf.schema_json:
            schema["schema"] = _json(rf.schema_json)
        if rf.HasField("strict"):
            schema["strict"] = rf.strict
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif rf.type:
        body["response_format"] = {"type": rf.type}
    if request.user:
        body["user"] = request.user
    body["stream"] = stream
    if stream:
        # Always ask for usage: billing needs it even when the client did not.
        options = body.get("stream_options")
        body["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    else:
        body.pop("stream_options", None)
    return body


# --- answers ------------------------------------------------------------------------


def tool_calls_from_json(items: Any) -> list[chat_pb2.ToolCall]:
    calls: list[chat_pb2.ToolCall] = []
    for position, item in enumerate(items or ()):
        if not isinstance(item, dict):
            continue
        function = item.get("function") or {}
        calls.append(
            chat_pb2.ToolCall(
                index=int(item.get("index", position) or 0),
                id=str(item.get("id") or ""),
                type=str(item.get("type") or ""),
                name=str(function.get("name") or ""),
                arguments=str(function.get("arguments") or ""),
            )
        )
    return calls


def usage_from_json(data: Any) -> chat_pb2.Usage | None:
    if not isinstance(data, dict):
        return None
    usage = chat_pb2.Usage(
        input_tokens=int(data.get("prompt_tokens") or 0),
        output_tokens=int(data.get("completion_tokens") or 0),
    )
    prompt_details = data.get("prompt_tokens_details")
    if isinstance(prompt_details, dict):
        usage.cached_input_tokens = int(prompt_details.get("cached_tokens") or 0)
    completion_details = data.get("completion_tokens_details")
    if isinstance(completion_details, dict):
        usage.reasoning_tokens = int(completion_details.get("reasoning_tokens") or 0)
    return usage


def _token_bytes(item: dict[str, Any]) -> bytes:
    raw = item.get("bytes")
    if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        return bytes(raw)
    return b""


def _token_logprob(item: Any) -> chat_pb2.TokenLogprob | None:
    if not isinstance(item, dict):
        return None
    logprob = item.get("logprob")
    if not isinstance(logprob, int | float):
        return None
    out = chat_pb2.TokenLogprob(
        token=str(item.get("token") or ""), logprob=float(logprob), bytes=_token_bytes(item)
    )
    for top in item.get("top_logprobs") or ():
        if isinstance(top, dict) and isinstance(top.get("logprob"), int | float):
            out.top_logprobs.append(
                chat_pb2.TopLogprob(
                    token=str(top.get("token") or ""),
                    logprob=float(top["logprob"]),
                    bytes=_token_bytes(top),
                )
            )
    return out


def logprobs_from_json(data: Any) -> chat_pb2.Logprobs | None:
    """A choice's ``logprobs`` object (``content`` and ``refusal`` token lists), or None
    when the provider sent none."""
    if not isinstance(data, dict):
        return None
    out = chat_pb2.Logprobs()
    for name in ("content", "refusal"):
        target = getattr(out, name)
        for item in data.get(name) or ():
            parsed = _token_logprob(item)
            if parsed is not None:
                target.append(parsed)
    return out


def choices_from_json(data: dict[str, Any]) -> list[chat_pb2.Choice]:
    choices: list[chat_pb2.Choice] = []
    for position, item in enumerate(data.get("choices") or ()):
        message = item.get("message") or {}
        content = message.get("content")
        if isinstance(content, list):  # some servers answer with typed parts
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        choice = chat_pb2.Choice(
            index=int(item.get("index", position) or 0),
            content=str(content or ""),
            tool_calls=tool_calls_from_json(message.get("tool_calls")),
            finish_reason=str(item.get("finish_reason") or ""),
            refusal=str(message.get("refusal") or ""),
        )
        logprobs = logprobs_from_json(item.get("logprobs"))
        if logprobs is not None:
            choice.logprobs.CopyFrom(logprobs)
        choices.append(choice)
    return choices


def delta_from_json(choice: dict[str, Any]) -> inference_pb2.Delta:
    delta = choice.get("delta") or {}
    out = inference_pb2.Delta(
        choice_index=int(choice.get("index") or 0),
        role=str(delta.get("role") or ""),
        content=str(delta.get("content") or ""),
        tool_calls=tool_calls_from_json(delta.get("tool_calls")),
        refusal=str(delta.get("refusal") or ""),
        finish_reason=str(choice.get("finish_reason") or ""),
    )
    logprobs = logprobs_from_json(choice.get("logprobs"))
    if logprobs is not None and (logprobs.content or logprobs.refusal):
        out.logprobs.CopyFrom(logprobs)
    return out


def count_choices(choices: list[chat_pb2.Choice]) -> int:
    total = 0
    for choice in choices:
        total += tokens.count_text(choice.content) + tokens.count_text(choice.refusal)
        for call in choice.tool_calls:
            total += tokens.count_text(call.name) + tokens.count_text(call.arguments)
    return total


# --- errors -------------------------------------------------------------------------


def sanitize_message(message: str) -> str:
    """A provider's error message without quoted input, bounded in length."""
    cleaned = _QUOTED.sub("<redacted>", message)
    cleaned = " ".join(cleaned.split())
    if len(cleaned) > MAX_PROVIDER_MESSAGE:
        cleaned = cleaned[: MAX_PROVIDER_MESSAGE - 1] + "…"
    return cleaned


def retry_after_ms(headers: Mapping[str, str]) -> int | None:
    """``retry-after-ms`` (OpenAI) or ``Retry-After`` (seconds or an HTTP date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0, int(float(raw_ms)))
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0, int(float(raw) * 1000))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0, int((when.timestamp() - time.time()) * 1000))


def error_fields(body: bytes) -> tuple[str, str, str, str]:
    """(message, type, code, param) of an OpenAI error body; empty strings if absent."""
    try:
        data = _DECODER.decode(body) if body else None
    except msgspec.DecodeError:
        return "", "", "", ""
    if not isinstance(data, dict):
        return "", "", "", ""
    err = data.get("error", data)
    if isinstance(err, str):
        return err, "", "", ""
    if not isinstance(err, dict):
        return "", "", "", ""
    return (
        str(err.get("message") or ""),
        str(err.get("type") or ""),
        str(err.get("code") or ""),
        str(err.get("param") or ""),
    )


def is_context_length(message: str, err_type: str, code: str) -> bool:
    return (
        code == "context_length_exceeded"
        or err_type == "exceed_context_size_error"  # llama.cpp
        or bool(_CONTEXT_PATTERNS.search(message))
    )


def error_from_status(
    status: int, headers: Mapping[str, str], body: bytes, provider: str
) -> tuple[SluiceError, bool]:
    """The Sluice error for an HTTP error answer, and whether it is permanent for this
    provider (retrying it cannot help)."""
    message, err_type, code, param = error_fields(body)
    details: dict[str, Any] = {"provider": provider, "upstream_status": status}
    if code:
        details["upstream_code"] = code
    if status == 429:
        return SluiceError(
            ErrorCode.UPSTREAM_RATE_LIMITED,
            f"provider {provider} is rate limiting",
            details,
            retry_after_ms=retry_after_ms(headers),
        ), False
    if status == 503:
        return SluiceError(
            ErrorCode.UPSTREAM_UNAVAILABLE,
            f"provider {provider} is unavailable",
            details,
            retry_after_ms=retry_after_ms(headers),
        ), False
    if status in {408, 504}:
        return SluiceError(
            ErrorCode.UPSTREAM_TIMEOUT, f"provider {provider} timed out", details
        ), False
    if status >= 500:
        return SluiceError(
            ErrorCode.UPSTREAM_ERROR, f"provider {provider} failed with status {status}", details
        ), False
    if status in {401, 403}:
        # The gateway's credentials, not the client's request: another provider may do.
        return SluiceError(
            ErrorCode.UPSTREAM_ERROR,
            f"provider {provider} rejected the gateway's credentials",
            details,
        ), True
    if status == 404:
        return SluiceError(
            ErrorCode.UPSTREAM_ERROR,
            f"provider {provider} does not serve the configured model",
            details,
        ), True
    if is_context_length(message, err_type, code):
        return SluiceError(
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            sanitize_message(message) or CONTEXT_LENGTH_DETAIL,
            details,
            param=param or "messages",
        ), True
    return SluiceError(
        ErrorCode.INVALID_REQUEST,
        sanitize_message(message) or f"provider {provider} rejected the request",
        details,
        param=param or None,
    ), True


CONTEXT_LENGTH_DETAIL = "the messages and max_tokens do not fit the model's context window"


def error_from_stream_event(data: dict[str, Any], provider: str) -> tuple[SluiceError, bool]:
    """An ``{"error": ...}`` object sent inside an SSE stream."""
    err = data.get("error")
    status = 500
    if isinstance(err, dict):
        raw_status = err.get("code") if isinstance(err.get("code"), int) else err.get("status")
        if isinstance(raw_status, int) and 400 <= raw_status < 600:
            status = raw_status
    body = msgspec.json.encode(data)
    return error_from_status(status, {}, body, provider)
