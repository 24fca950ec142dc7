"""JSON Schema of a protobuf message, from its descriptor, following protobuf's JSON
mapping (what ``google.protobuf.json_format.MessageToDict`` prints):

- fields by their JSON name (lowerCamelCase, ``json_name``); a field at its default
  value is omitted, so no field is required;
- 64-bit integers as decimal strings, 32-bit ones as numbers; ``uint32``/``fixed32``
  are never negative;
- ``float``/``double`` as numbers (or the strings "NaN", "Infinity", "-Infinity");
- ``bytes`` as base64 strings; enums by value name;
- repeated fields as arrays, map fields as objects keyed by the map's key as a string;
- message fields as nested objects, inlined (the payload schemas of an AsyncAPI
  document are self-contained); a message that contains itself is refused, since it
  cannot be inlined;
- the members of a ``oneof`` are mutually exclusive: at most one appears.

Well-known types have JSON forms of their own; the ones Sluice's events could carry are
mapped here, and any other is refused rather than described wrongly.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

JsonSchema = dict[str, Any]

_T = FieldDescriptor
_INT64 = {_T.TYPE_INT64, _T.TYPE_SINT64, _T.TYPE_SFIXED64}
_UINT64 = {_T.TYPE_UINT64, _T.TYPE_FIXED64}
_INT32 = {_T.TYPE_INT32, _T.TYPE_SINT32, _T.TYPE_SFIXED32}
_UINT32 = {_T.TYPE_UINT32, _T.TYPE_FIXED32}
_FLOATING = {_T.TYPE_FLOAT, _T.TYPE_DOUBLE}
_NON_FINITE = ["NaN", "Infinity", "-Infinity"]

# Well-known types whose JSON form is not an object of their fields.
_WELL_KNOWN: dict[str, JsonSchema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BytesValue": {"type": "string", "contentEncoding": "base64"},
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.DoubleValue": {"oneOf": [{"type": "number"}, {"enum": _NON_FINITE}]},
    "google.protobuf.FloatValue": {"oneOf": [{"type": "number"}, {"enum": _NON_FINITE}]},
    "google.protobuf.Int32Value": {"type": "integer", "format": "int32"},
    "google.protobuf.UInt32Value": {"type": "integer", "format": "uint32", "minimum": 0},
    "google.protobuf.Int64Value": {"type": "string", "format": "int64"},
    "google.protobuf.UInt64Value": {"type": "string", "format": "uint64"},
}


class UnsupportedMessage(ValueError):
    """A message this mapping cannot describe faithfully."""


def message_schema(descriptor: Descriptor, *, title: str | None = None) -> JsonSchema:
    """The JSON Schema of ``descriptor``'s JSON mapping."""
    schema = _message(descriptor, ())
    schema["title"] = title or descriptor.name
    return schema


def _message(descriptor: Descriptor, outer: tuple[str, ...]) -> JsonSchema:
    name = descriptor.full_name
    if name in _WELL_KNOWN:
        return dict(_WELL_KNOWN[name])
    if name.startswith("google.protobuf."):
        raise UnsupportedMessage(f"{name}: a well-known type without a mapping here")
    if name in outer:
        raise UnsupportedMessage(f"{name} contains itself: {' > '.join((*outer, name))}")
    inside = (*outer, name)
    properties = {field.json_name: _field(field, inside) for field in descriptor.fields}
    schema: JsonSchema = {
        "type": "object",
        "description": f"protobuf {name}",
        "properties": properties,
    }
    exclusive = [
        [field.json_name for field in oneof.fields]
        for oneof in descriptor.oneofs
        # A proto3 ``optional`` field lives alone in a synthetic oneof: nothing to exclude.
        if len(oneof.fields) > 1
    ]
    if exclusive:
        schema["allOf"] = [_at_most_one(names) for names in exclusive]
    return schema


def _at_most_one(names: list[str]) -> JsonSchema:
    present = [{"required": [name]} for name in names]
    return {"oneOf": [*present, {"not": {"anyOf": present}}]}


def _field(field: FieldDescriptor, outer: tuple[str, ...]) -> JsonSchema:
    if _is_map(field):
        value = _single(_message_type(field).fields_by_name["value"], outer)
        return {"type": "object", "additionalProperties": value}
    single = _single(field, outer)
    if field.is_repeated:
        return {"type": "array", "items": single}
    return single


def _message_type(field: FieldDescriptor) -> Descriptor:
    if field.message_type is None:
        raise UnsupportedMessage(f"{field.full_name}: a message field without its type")
    return field.message_type


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == _T.TYPE_MESSAGE
        and field.is_repeated
        and bool(_message_type(field).GetOptions().map_entry)
    )


def _single(field: FieldDescriptor, outer: tuple[str, ...]) -> JsonSchema:
    kind = field.type
    if kind in (_T.TYPE_MESSAGE, _T.TYPE_GROUP):
        return _message(_message_type(field), outer)
    if kind == _T.TYPE_ENUM and field.enum_type is not None:
        return _enum(field.enum_type)
    if kind in _INT64:
        return {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
    if kind in _UINT64:
        return {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
    if kind in _INT32:
        return {"type": "integer", "format": "int32"}
    if kind in _UINT32:
        return {"type": "integer", "format": "uint32", "minimum": 0}
    if kind in _FLOATING:
        return {
            "oneOf": [{"type": "number"}, {"enum": _NON_FINITE}],
            "format": "float" if kind == _T.TYPE_FLOAT else "double",
        }
    if kind == _T.TYPE_BOOL:
        return {"type": "boolean"}
    if kind == _T.TYPE_STRING:
        return {"type": "string"}
    if kind == _T.TYPE_BYTES:
        return {"type": "string", "contentEncoding": "base64"}
    raise UnsupportedMessage(f"{field.full_name}: field type {kind}")


def _enum(descriptor: EnumDescriptor) -> JsonSchema:
    return {
        "type": "string",
        "enum": [value.name for value in descriptor.values],
        "description": f"protobuf enum {descriptor.full_name}",
    }


__all__ = ["JsonSchema", "UnsupportedMessage", "message_schema"]
