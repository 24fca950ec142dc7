"""OpenAI request JSON -> the canonical ``ChatRequest`` proto."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError

from services.gateway.models import ChatCompletionRequest, ChatMessageIn

BodyT = TypeVar("BodyT", bound=BaseModel)

# Sorted keys: equal requests serialise equally, so the exact-cache key is stable.
_DUMP_OPTS = orjson.OPT_SORT_KEYS


def dumps_sorted(value: Any) -> str:
    return orjson.dumps(value, option=_DUMP_OPTS).decode()


def decode_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; errors never echo it."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SluiceError(
            ErrorCode.INVALID_JSON,
            f"The body is not valid JSON (error at byte {exc.pos}).",
        ) from None
    if not isinstance(data, dict):
        raise SluiceError(ErrorCode.INVALID_REQUEST, "The body must be a JSON object.")
    return data


def parse_model(raw: bytes, model: type[BodyT]) -> BodyT:
    """Decode and validate a body as ``model``; errors name fields, never echo their
    values."""
    data = decode_object(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_problem(exc) from None


def parse_body(raw: bytes) -> ChatCompletionRequest:
    return parse_model(raw, ChatCompletionRequest)


_SCALAR_TAGS = frozenset({"str", "int", "float", "bool", "bytes", "none", "dict", "list"})


def _is_union_tag(part: int | str) -> bool:
    """pydantic names the union member it tried inside ``loc`` (``str``,
    ``list[dict[str,any]]``, ``TextBlock``); body fields are snake_case words."""
    if not isinstance(part, str):
        return False
    return part in _SCALAR_TAGS or "[" in part or "-" in part or part[:1].isupper()


def _loc(head: list[str], loc: tuple[int | str, ...]) -> str:
    return ".".join([*head, *(str(p) for p in loc if not _is_union_tag(p))])


def validation_problem(exc: ValidationError, prefix: str = "") -> SluiceError:
    """``prefix``: where the validated value sits in the body, for parts validated on
    their own (``messages.0.content.2``)."""
    head = [prefix] if prefix else []
    errors = [
        {
            "loc": _loc(head, err["loc"]),
            "type": err["type"],
            # pydantic messages describe the expectation; the input stays out.
            "msg": err["msg"],
        }
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]
    # A union's members each report the same field: name it once.
    fields = ", ".join(dict.fromkeys(e["loc"] or "<body>" for e in errors[:5]))
    first = errors[0]["loc"] if errors else None
    return SluiceError(
        ErrorCode.INVALID_REQUEST,
        f"Invalid field(s): {fields}.",
        details={"errors": errors},
        param=first or None,
    )


def invalid_field(param: str, detail: str) -> SluiceError:
    return SluiceError(
        ErrorCode.INVALID_REQUEST,
        detail,
        param=param,
        details={"errors": [{"loc": param, "type": "value_error", "msg": detail}]},
    )


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
            raw = orjson.dumps(part, option=_DUMP_OPTS)
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
