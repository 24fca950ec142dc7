"""The Anthropic Messages API (``POST /v1/messages``) on the chat data path: its request
JSON into the canonical ``ChatRequest``, and the worker's answers back out as message
bodies, SSE events and error bodies. The data path itself (limits, cache, work, relay,
cost, tracing) is the one the OpenAI route uses; ``ANTHROPIC`` is the ``Dialect`` that
plugs these renderers into it.

Request
- ``system`` (a string or text blocks) becomes a leading ``system`` message. A user
  turn's ``tool_result`` blocks become ``tool`` messages (``tool_call_id`` =
  ``tool_use_id``) and the blocks around them ``user`` messages, in order; an assistant
  turn's ``tool_use`` blocks become its tool calls (``input`` as JSON arguments) and its
  text blocks its content. The conversation reaches the provider as an OpenAI client
  would have sent it.
- ``image`` blocks with a ``base64`` or ``url`` source become ``image_url`` parts (base64
  as a ``data:`` URL), as on the OpenAI route: whether the model can see them is the
  provider's answer. ``file`` sources are refused (400): they name Anthropic's Files
  API, which has no counterpart here. ``tool_result.is_error`` has no OpenAI field and is
  not passed on; the result's content is.
- ``thinking`` and ``redacted_thinking`` blocks of earlier assistant turns are dropped:
  they are an Anthropic model's signed reasoning, which no provider here can read.
- ``tools``: custom tools (``name``, ``description``, ``input_schema``) become function
  tools; server tools (a ``type`` such as ``web_search_20250305``) are refused (400),
  since they run at Anthropic. ``tool_choice`` ``auto``, ``any``, ``tool`` and ``none``
  become ``auto``, ``required``, the named function and ``none``;
  ``disable_parallel_tool_use: true`` sets ``parallel_tool_calls`` to false.
- ``max_tokens`` (required), ``temperature`` (0-1), ``top_p``, ``stop_sequences`` and
  ``stream`` map onto the sampling parameters, ``metadata.user_id`` onto ``user``.
  ``max_tokens`` must be at least 1: Anthropic's 0 pre-warms its prompt cache, and
  there is no prompt cache here to warm. ``top_k`` has no field in ``SamplingParams``;
  it travels in ``extra_json`` like a pass-through member of the OpenAI route
  (llama.cpp and vLLM honour it; OpenAI itself answers 400).
- Other members (``thinking``, ``service_tier``, ``output_config``, ...) and the
  ``anthropic-beta`` header are accepted and ignored: they name Anthropic features,
  which an OpenAI-compatible provider would only turn into a 400.

Answer
- ``stop_reason``: ``length`` -> ``max_tokens``, ``tool_calls`` -> ``tool_use``,
  ``content_filter`` or a refusal -> ``refusal``, anything else ``end_turn``. Providers
  speaking OpenAI's API do not say whether a stop sequence ended the text, so
  ``stop_sequence`` is always null and never the reason.
- ``usage.input_tokens`` leaves out cached prompt tokens, which are reported as
  ``cache_read_input_tokens`` (Anthropic counts them apart); nothing is written to a
  prompt cache, so ``cache_creation_input_tokens`` is 0. A stream's ``message_start``
  carries the prompt as the gateway counted it, its ``message_delta`` the provider's
  counts.
- The ``sluice`` object rides on the message, or on the stream's ``message_delta``
  (the SDK keeps unknown members).
- Errors are ``{"type": "error", "error": {"type", "message", "param"}, "request_id"}``
  (what the SDK parses) with the problem members beside it (``code``, ``trace_id``,
  ``title``, ``status``, ``detail``, ``instance``, ``details``), as
  ``application/json``: the top-level ``type`` must be ``"error"``, so the body cannot
  also be a problem+json document.
- Streams carry no ``id:`` fields: ``GET /v1/streams/{id}`` replays in the OpenAI
  dialect only, so there is nothing to resume with.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2

from services.gateway.normalize import (
    dumps_sorted,
    invalid_field,
    parse_model,
    validation_problem,
)
from services.gateway.problems import problem_body
from services.gateway.ratelimit import anthropic_rate_limit_headers
from services.gateway.render import Dialect, RequestMeta, final_sluice

VERSION_HEADER = "anthropic-version"
# The shape every answer of this route has; later versions only add to it.
DEFAULT_VERSION = "2023-06-01"
_DATED_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def check_version(value: str | None) -> str:
    """The ``anthropic-version`` a request asked for.

    Anthropic requires the header; here a missing one means ``2023-06-01``, so that a
    plain curl works. Any dated version is accepted: the official SDK sends its own
    (2.12.0 sends ``2026-10-21``), and every version since 2023-06-01 reads this
    route's answers, which are in that version's shape. A value that is not a date is a
    400 naming the header.
    """
    if value is None or not value.strip():
        return DEFAULT_VERSION
    version = value.strip()
    if not _DATED_VERSION.match(version):
        raise SluiceError(
            ErrorCode.INVALID_REQUEST,
            f"{VERSION_HEADER} must be a dated API version such as '{DEFAULT_VERSION}'.",
            param=VERSION_HEADER,
        )
    return version


# --- the request ------------------------------------------------------------------------


class _Nested(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextBlock(_Nested):
    type: Literal["text"]
    text: str


class ImageSource(_Nested):
    type: Literal["base64", "url", "file"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class ImageBlock(_Nested):
    type: Literal["image"]
    source: ImageSource


class ToolUseBlock(_Nested):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(_Nested):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    # A string or text and image blocks, validated one by one like message content.
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None


class ThinkingBlock(_Nested):
    type: Literal["thinking", "redacted_thinking"]


Block = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock

# Blocks are validated one at a time against the model their type names, so an error
# names ``messages.0.content.2.text`` rather than every member of a union.
_USER_BLOCKS: dict[str, type[Block]] = {
    "text": TextBlock,
    "image": ImageBlock,
    "tool_result": ToolResultBlock,
}
_ASSISTANT_BLOCKS: dict[str, type[Block]] = {
    "text": TextBlock,
    "tool_use": ToolUseBlock,
    "thinking": ThinkingBlock,
    "redacted_thinking": ThinkingBlock,
}
_TOOL_RESULT_BLOCKS: dict[str, type[Block]] = {"text": TextBlock, "image": ImageBlock}
_SYSTEM_BLOCKS: dict[str, type[Block]] = {"text": TextBlock}


class MessageParam(_Nested):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class ToolParam(_Nested):
    # Absent or "custom" for a client-side tool; anything else is a server tool.
    type: str | None = None
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class ToolChoiceParam(_Nested):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _tool_needs_a_name(self) -> ToolChoiceParam:
        if self.type == "tool" and not self.name:
            raise ValueError("a tool_choice of type 'tool' must name the tool")
        return self


class MetadataParam(_Nested):
    user_id: str | None = None


class MessagesRequest(BaseModel):
    """``POST /v1/messages`` body. Unknown members are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool | None = None
    metadata: MetadataParam | None = None


def parse_messages_body(raw: bytes) -> MessagesRequest:
    return parse_model(raw, MessagesRequest)


def _block(raw: dict[str, Any], loc: str, allowed: dict[str, type[Block]], turn: str) -> Block:
    kind = raw.get("type")
    model = allowed.get(kind) if isinstance(kind, str) else None
    if model is None:
        # The type itself stays out of the message: it is the client's text.
        raise invalid_field(
            f"{loc}.type",
            f"{loc}.type: this content block type is not supported in {turn} here; "
            f"use one of: {', '.join(allowed)}.",
        )
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise validation_problem(exc, loc) from None


def _image_part(block: ImageBlock, loc: str) -> chat_pb2.ContentPart:
    source = block.source
    if source.type == "base64":
        if not (source.media_type and source.data):
            raise invalid_field(
                f"{loc}.source", f"{loc}.source needs media_type and data for a base64 image."
            )
        url = f"data:{source.media_type};base64,{source.data}"
    elif source.type == "url":
        if not source.url:
            raise invalid_field(f"{loc}.source.url", f"{loc}.source.url is required.")
        url = source.url
    else:
        raise invalid_field(
            f"{loc}.source.type",
            f"{loc}.source.type 'file' needs Anthropic's Files API, which this gateway does "
            "not have; send the image as base64 or url.",
        )
    return chat_pb2.ContentPart(type="image_url", image_url=url)


def _content_message(role: str, parts: list[chat_pb2.ContentPart]) -> chat_pb2.Message:
    """One message from parts; a single text part is sent as plain text, the form every
    provider takes."""
    message = chat_pb2.Message(role=role)
    if len(parts) == 1 and parts[0].type == "text":
        message.text = parts[0].text
    else:
        message.parts.extend(parts)
    return message


def _tool_message(block: ToolResultBlock, loc: str) -> chat_pb2.Message:
    if block.content is None or isinstance(block.content, str):
        message = chat_pb2.Message(role="tool", text=block.content or "")
    else:
        parts = []
        for k, raw in enumerate(block.content):
            inner = _block(raw, f"{loc}.content.{k}", _TOOL_RESULT_BLOCKS, "a tool_result")
            if isinstance(inner, TextBlock):
                parts.append(chat_pb2.ContentPart(type="text", text=inner.text))
            elif isinstance(inner, ImageBlock):
                parts.append(_image_part(inner, f"{loc}.content.{k}"))
        message = _content_message("tool", parts)
        if not parts:
            message.text = ""
    message.tool_call_id = block.tool_use_id
    return message


def _user_turn(index: int, content: str | list[dict[str, Any]]) -> list[chat_pb2.Message]:
    if isinstance(content, str):
        return [chat_pb2.Message(role="user", text=content)]
    messages: list[chat_pb2.Message] = []
    run: list[chat_pb2.ContentPart] = []
    for j, raw in enumerate(content):
        loc = f"messages.{index}.content.{j}"
        block = _block(raw, loc, _USER_BLOCKS, "a user turn")
        if isinstance(block, TextBlock):
            run.append(chat_pb2.ContentPart(type="text", text=block.text))
        elif isinstance(block, ImageBlock):
            run.append(_image_part(block, loc))
        elif isinstance(block, ToolResultBlock):
            if run:
                messages.append(_content_message("user", run))
                run = []
            messages.append(_tool_message(block, loc))
    if run or not messages:
        messages.append(_content_message("user", run) if run else chat_pb2.Message(role="user"))
    return messages


def _assistant_turn(index: int, content: str | list[dict[str, Any]]) -> chat_pb2.Message:
    message = chat_pb2.Message(role="assistant")
    if isinstance(content, str):
        message.text = content
        return message
    texts: list[str] = []
    for j, raw in enumerate(content):
        block = _block(raw, f"messages.{index}.content.{j}", _ASSISTANT_BLOCKS, "an assistant turn")
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            message.tool_calls.append(
                chat_pb2.ToolCall(
                    index=len(message.tool_calls),
                    id=block.id,
                    type="function",
                    name=block.name,
                    arguments=orjson.dumps(block.input).decode(),
                )
            )
    if texts or not message.tool_calls:
        message.text = "".join(texts)
    return message


def _system_message(system: str | list[dict[str, Any]]) -> chat_pb2.Message | None:
    if isinstance(system, str):
        return chat_pb2.Message(role="system", text=system) if system else None
    parts = []
    for k, raw in enumerate(system):
        block = _block(raw, f"system.{k}", _SYSTEM_BLOCKS, "system")
        if isinstance(block, TextBlock):
            parts.append(chat_pb2.ContentPart(type="text", text=block.text))
    return _content_message("system", parts) if parts else None


def _tool_choice(choice: ToolChoiceParam) -> Any:
    if choice.type == "any":
        return "required"
    if choice.type == "tool":
        return {"type": "function", "function": {"name": choice.name}}
    return choice.type  # "auto" and "none" mean the same in both APIs


def anthropic_to_chat_request(body: MessagesRequest) -> chat_pb2.ChatRequest:
    req = chat_pb2.ChatRequest(model=body.model, stream=bool(body.stream))
    if body.system is not None:
        system = _system_message(body.system)
        if system is not None:
            req.messages.append(system)
    for i, m in enumerate(body.messages):
        if m.role == "user":
            req.messages.extend(_user_turn(i, m.content))
        else:
            req.messages.append(_assistant_turn(i, m.content))

    s = req.sampling
    s.max_tokens = body.max_tokens
    if body.temperature is not None:
        s.temperature = body.temperature
    if body.top_p is not None:
        s.top_p = body.top_p
    if body.stop_sequences:
        s.stop.extend(body.stop_sequences)
    if body.top_k is not None:
        req.extra_json = dumps_sorted({"top_k": body.top_k})

    for i, tool in enumerate(body.tools or ()):
        if tool.type not in (None, "custom"):
            raise invalid_field(
                f"tools.{i}.type",
                f"tools.{i} is a server tool, which runs at Anthropic; only custom tools "
                "(name, description, input_schema) can be served here.",
            )
        if tool.input_schema is None:
            raise invalid_field(f"tools.{i}.input_schema", f"tools.{i}.input_schema is required.")
        req.tools.append(
            chat_pb2.Tool(
                type="function",
                name=tool.name,
                description=tool.description or "",
                parameters_json=dumps_sorted(tool.input_schema),
            )
        )
    if body.tool_choice is not None:
        req.tool_choice_json = dumps_sorted(_tool_choice(body.tool_choice))
        if body.tool_choice.disable_parallel_tool_use:
            req.parallel_tool_calls = False

    if body.metadata is not None and body.metadata.user_id:
        req.user = body.metadata.user_id
    return req


# --- the answer -------------------------------------------------------------------------

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

    def delta(self, sequence: int, d: inference_pb2.Delta) -> bytes:
        out = self._opening()
        if d.choice_index == 0:
            out.extend(self._answer(d.content, d.refusal, d.tool_calls))
            if d.finish_reason:
                self._finish = d.finish_reason
        return b"".join(out)

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
        return b"".join(out)

    def replay(self, final: inference_pb2.Final, sluice: dict[str, Any]) -> bytes:
        usage = anthropic_usage(final.usage)
        usage["output_tokens"] = 0
        return self._start(usage) + self.final(0, final, sluice)

    def failure(self, sequence: int, problem_json: bytes) -> bytes:
        return b"event: error\ndata: %s\n\n" % problem_json

    def heartbeat(self) -> bytes:
        return b"".join(self._opening()) + _PING


# --- errors -----------------------------------------------------------------------------


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
    body=message_body,
    stream=MessageStreamRelay,
    error=render_error,
    limit_headers=anthropic_rate_limit_headers,
)
