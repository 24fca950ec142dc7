"""The OpenAI Chat Completions request: its body (pydantic, validated at the door) and
its normalisation into the canonical ``ChatRequest``.

Unknown top-level members are kept (``extra="allow"``) and passed through to providers;
unknown members inside nested objects are ignored, as OpenAI itself does.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from sluice.common.v1 import chat_pb2

from services.gateway.domain.dialects.parsing import (
    SORTED_KEYS,
    SluiceHintsIn,
    dumps_sorted,
    invalid_field,
    parse_model,
)

Role = Literal["system", "developer", "user", "assistant", "tool"]


class _Nested(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionCall(_Nested):
    name: str = ""
    arguments: str = ""


class ToolCallIn(_Nested):
    id: str = ""
    type: str = "function"
    function: FunctionCall


class ChatMessageIn(_Nested):
    role: Role
    # A string, or typed parts (text, image_url, and others kept verbatim).
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Nested):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(_Nested):
    type: Literal["function"] = "function"
    function: FunctionDef


class JsonSchemaFormat(_Nested):
    name: str = ""
    description: str | None = None
    # "schema" shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatIn(_Nested):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Nested):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body; unknown members pass through to providers."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    tools: list[ToolIn] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormatIn | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None
    metadata: dict[str, str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    parallel_tool_calls: bool | None = None
    # Sluice's own member: what the caller asks of the answer (never sent upstream).
    sluice: SluiceHintsIn | None = None


def _parts(index: int, parts: list[dict[str, Any]]) -> list[chat_pb2.ContentPart]:
    out: list[chat_pb2.ContentPart] = []
    for j, part in enumerate(parts):
        loc = f"messages.{index}.content.{j}"
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid_field(f"{loc}.text", f"{loc}.text must be a string.")
            out.append(chat_pb2.ContentPart(type="text", text=text))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise invalid_field(f"{loc}.image_url", f"{loc}.image_url.url must be a string.")
            detail = image.get("detail") if isinstance(image, dict) else None
            out.append(
                chat_pb2.ContentPart(type="image_url", image_url=url, image_detail=detail or "")
            )
        elif isinstance(kind, str) and kind:
            raw = orjson.dumps(part, option=SORTED_KEYS)
            out.append(chat_pb2.ContentPart(type=kind, raw_json=raw))
        else:
            raise invalid_field(f"{loc}.type", f"{loc}.type must name the part type.")
    return out


def _message(index: int, m: ChatMessageIn) -> chat_pb2.Message:
    msg = chat_pb2.Message(role=m.role)
    if isinstance(m.content, str):
        msg.text = m.content
    elif m.content is not None:
        msg.parts.extend(_parts(index, m.content))
    if m.name:
        msg.name = m.name
    if m.tool_call_id:
        msg.tool_call_id = m.tool_call_id
    if m.tool_calls:
        for i, call in enumerate(m.tool_calls):
            msg.tool_calls.append(
                chat_pb2.ToolCall(
                    index=i,
                    id=call.id,
                    type=call.type,
                    name=call.function.name,
                    arguments=call.function.arguments,
                )
            )
    return msg


def to_chat_request(body: ChatCompletionRequest) -> chat_pb2.ChatRequest:
    req = chat_pb2.ChatRequest(model=body.model, stream=bool(body.stream))
    req.messages.extend(_message(i, m) for i, m in enumerate(body.messages))
    if body.stream_options is not None and body.stream:
        req.include_usage = body.stream_options.include_usage

    s = req.sampling
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None:
        s.max_tokens = max_tokens
    if body.temperature is not None:
        s.temperature = body.temperature
    if body.top_p is not None:
        s.top_p = body.top_p
    if body.n is not None:
        s.n = body.n
    if isinstance(body.stop, str):
        s.stop.append(body.stop)
    elif body.stop:
        s.stop.extend(body.stop)
    if body.seed is not None:
        s.seed = body.seed
    if body.presence_penalty is not None:
        s.presence_penalty = body.presence_penalty
    if body.frequency_penalty is not None:
        s.frequency_penalty = body.frequency_penalty
    if body.logprobs:
        s.logprobs = True
    if body.top_logprobs is not None:
        s.top_logprobs = body.top_logprobs

    for tool in body.tools or ():
        t = chat_pb2.Tool(
            type=tool.type,
            name=tool.function.name,
            description=tool.function.description or "",
            parameters_json=dumps_sorted(tool.function.parameters)
            if tool.function.parameters is not None
            else "",
        )
        if tool.function.strict is not None:
            t.strict = tool.function.strict
        req.tools.append(t)
    if body.tool_choice is not None:
        req.tool_choice_json = dumps_sorted(body.tool_choice)
    if body.parallel_tool_calls is not None:
        req.parallel_tool_calls = body.parallel_tool_calls

    rf = body.response_format
    if rf is not None:
        req.response_format.type = rf.type
        if rf.type == "json_schema":
            if rf.json_schema is None:
                raise invalid_field(
                    "response_format.json_schema",
                    "response_format.json_schema is required when type is json_schema.",
                )
            req.response_format.schema_name = rf.json_schema.name
            if rf.json_schema.json_schema is not None:
                req.response_format.schema_json = dumps_sorted(rf.json_schema.json_schema)
            if rf.json_schema.strict is not None:
                req.response_format.strict = rf.json_schema.strict

    if body.user:
        req.user = body.user
    if body.metadata:
        req.metadata.update(body.metadata)
    if body.model_extra:
        req.extra_json = dumps_sorted(body.model_extra)
    return req


def parse_body(raw: bytes) -> ChatCompletionRequest:
    return parse_model(raw, ChatCompletionRequest)
