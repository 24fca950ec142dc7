"""The Anthropic Messages API (``POST /v1/messages``) on the chat data path: here its
request JSON into the canonical ``ChatRequest``; in ``response.py`` the worker's
answers back out as message bodies, SSE events and error bodies (``ANTHROPIC``, the
``Dialect`` that plugs them into the path). The data path itself (limits, cache, work,
relay, cost, tracing) is the one the OpenAI route uses. Every mapping, both ways:

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
- Other members (``thinking``, ``service_tier``, ...) and the
  ``anthropic-beta`` header are accepted and ignored: they name Anthropic features,
  which an OpenAI-compatible provider would only turn into a 400.

Answer
- ``stop_reason``: ``length`` -> ``max_tokens``, ``tool_calls`` -> ``tool_use``,
  ``content_filter`` or a refusal -> ``refusal``, anything else ``end_turn``. Providers
  speaking OpenAI's API do not say whether a stop sequence ended the text, so
  ``stop_sequence`` is always null and never the reason.
- ``cache_control`` breakpoints (``ephemeral``, optional ``ttl``) on text, image,
  tool_use and tool_result blocks, system blocks and tools are kept on the canonical
  request (``cache_control_json``) and passed to Anthropic deployments (``kind:
  anthropic``); OpenAI-compatible providers ignore them.
- ``usage.input_tokens`` leaves out cached prompt tokens, which are reported as
  ``cache_read_input_tokens`` (Anthropic counts them apart). Cache writes are counted
  as plain input tokens, so ``cache_creation_input_tokens`` is 0. A stream's ``message_start``
  carries the prompt as the gateway counted it, its ``message_delta`` the provider's
  counts.
- The ``sluice`` object rides on the message, or on the stream's ``message_delta``
  (the SDK keeps unknown members).
- Errors are ``{"type": "error", "error": {"type", "message", "param"}, "request_id"}``
  (what the SDK parses) with the problem members beside it (``code``, ``trace_id``,
  ``title``, ``status``, ``detail``, ``instance``, ``details``), as
  ``application/json``: the top-level ``type`` must be ``"error"``, so the body cannot
  also be a problem+json document.
- Streams carry ``id: <request_id>:<n>`` on the last event of each worker event, as
  chat completions do: ``GET /v1/streams/{id}`` (``Last-Event-ID``) resumes them in
  this dialect.
- Structured outputs (``output_config.format`` or ``output_format``, a JSON schema)
  become ``response_format`` ``json_schema``: the provider is asked for it and the
  answer is validated against it (``sluice.status``).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError

from services.gateway.domain.dialects.parsing import (
    SluiceHintsIn,
    dumps_sorted,
    invalid_field,
    parse_model,
    validation_problem,
)

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


class CacheControl(_Nested):
    """A prompt-cache breakpoint: passed on to Anthropic deployments as sent."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None

    def json_text(self) -> str:
        return dumps_sorted(self.model_dump(exclude_none=True))


class _Cacheable(_Nested):
    cache_control: CacheControl | None = None

    @property
    def cache_control_json(self) -> str:
        return self.cache_control.json_text() if self.cache_control is not None else ""


class TextBlock(_Cacheable):
    type: Literal["text"]
    text: str


class ImageSource(_Nested):
    type: Literal["base64", "url", "file"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class ImageBlock(_Cacheable):
    type: Literal["image"]
    source: ImageSource


class ToolUseBlock(_Cacheable):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(_Cacheable):
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


class ToolParam(_Cacheable):
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


class OutputFormat(_Nested):
    type: Literal["json_schema"]
    # "schema" shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Nested):
    format: OutputFormat | None = None


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
    # Structured outputs: ``output_config.format`` (or the earlier beta's
    # ``output_format``), ``{"type": "json_schema", "schema": {...}}``.
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None
    # Sluice's own member, as on chat completions.
    sluice: SluiceHintsIn | None = None


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
        message.cache_control_json = parts[0].cache_control_json
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
    if block.cache_control_json:
        message.cache_control_json = block.cache_control_json
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
            run.append(
                chat_pb2.ContentPart(
                    type="text", text=block.text, cache_control_json=block.cache_control_json
                )
            )
        elif isinstance(block, ImageBlock):
            part = _image_part(block, loc)
            part.cache_control_json = block.cache_control_json
            run.append(part)
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
        if isinstance(block, (TextBlock, ToolUseBlock)) and block.cache_control_json:
            # The turn reaches providers as one message: the marker goes on its end.
            message.cache_control_json = block.cache_control_json
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
            parts.append(
                chat_pb2.ContentPart(
                    type="text", text=block.text, cache_control_json=block.cache_control_json
                )
            )
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
                cache_control_json=tool.cache_control_json,
            )
        )
    if body.tool_choice is not None:
        req.tool_choice_json = dumps_sorted(_tool_choice(body.tool_choice))
        if body.tool_choice.disable_parallel_tool_use:
            req.parallel_tool_calls = False

    if body.metadata is not None and body.metadata.user_id:
        req.user = body.metadata.user_id
    output = body.output_config.format if body.output_config is not None else None
    output = output or body.output_format
    if output is not None:
        req.response_format.type = "json_schema"
        req.response_format.schema_name = "output"
        req.response_format.schema_json = dumps_sorted(output.json_schema)
    return req
