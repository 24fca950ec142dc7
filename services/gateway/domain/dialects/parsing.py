"""Request bodies into validated models, with errors that name the field and never echo
what was sent."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sluice.errors import ErrorCode, SluiceError

BodyT = TypeVar("BodyT", bound=BaseModel)

# Sorted keys: equal requests serialise equally, so the exact-cache key is stable.
SORTED_KEYS = orjson.OPT_SORT_KEYS


def dumps_sorted(value: Any) -> str:
    return orjson.dumps(value, option=SORTED_KEYS).decode()


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


class SluiceHintsIn(BaseModel):
    """The request body's ``sluice`` object (both dialects): what the caller asks of
    the answer. Never passed on to a provider."""

    model_config = ConfigDict(extra="forbid")

    # Below this confidence the answer is marked requires_human_review.
    review_threshold: float | None = Field(default=None, ge=0, le=1)
    # Below this confidence the request fails with 422 insufficient_confidence.
    min_confidence: float | None = Field(default=None, ge=0, le=1)
    # One repair call when the answer breaks response_format's JSON schema.
    schema_repair: bool | None = None
