"""The descriptor -> JSON Schema converter against protobuf's own JSON printer: real
messages, printed by ``json_format.MessageToDict``, validated by a JSON Schema
validator."""

from __future__ import annotations

import jsonschema
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from sluice.proto_schema import UnsupportedMessage, message_schema

F = descriptor_pb2.FieldDescriptorProto


def build_pool() -> descriptor_pool.DescriptorPool:
    """A file with every kind of field, a oneof, a proto3 optional, a map and a
    message that contains itself."""
    file = descriptor_pb2.FileDescriptorProto(name="probe.proto", package="probe", syntax="proto3")
    file.enum_type.add(name="Color").value.extend(
        [
            descriptor_pb2.EnumValueDescriptorProto(name="COLOR_UNSPECIFIED", number=0),
            descriptor_pb2.EnumValueDescriptorProto(name="COLOR_RED", number=1),
        ]
    )
    inner = file.message_type.add(name="Inner")
    inner.field.add(name="note", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)

    every = file.message_type.add(name="Every")
    scalars = [
        ("an_int32", F.TYPE_INT32),
        ("an_int64", F.TYPE_INT64),
        ("a_uint32", F.TYPE_UINT32),
        ("a_uint64", F.TYPE_UINT64),
        ("a_sint64", F.TYPE_SINT64),
        ("a_fixed64", F.TYPE_FIXED64),
        ("a_double", F.TYPE_DOUBLE),
        ("a_float", F.TYPE_FLOAT),
        ("a_bool", F.TYPE_BOOL),
        ("a_string", F.TYPE_STRING),
        ("some_bytes", F.TYPE_BYTES),
    ]
    for number, (name, kind) in enumerate(scalars, start=1):
        every.field.add(name=name, number=number, type=kind, label=F.LABEL_OPTIONAL)
    n = len(scalars)
    every.field.add(
        name="color",
        number=n + 1,
        type=F.TYPE_ENUM,
        type_name=".probe.Color",
        label=F.LABEL_OPTIONAL,
    )
    every.field.add(
        name="inners",
        number=n + 2,
        type=F.TYPE_MESSAGE,
        type_name=".probe.Inner",
        label=F.LABEL_REPEATED,
    )
    every.field.add(name="tags", number=n + 3, type=F.TYPE_STRING, label=F.LABEL_REPEATED)
    entry = every.nested_type.add(name="LabelsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(
        name="value",
        number=2,
        type=F.TYPE_MESSAGE,
        type_name=".probe.Inner",
        label=F.LABEL_OPTIONAL,
    )
    every.field.add(
        name="labels",
        number=n + 4,
        type=F.TYPE_MESSAGE,
        type_name=".probe.Every.LabelsEntry",
        label=F.LABEL_REPEATED,
    )
    every.oneof_decl.add(name="choice")
    every.field.add(
        name="left", number=n + 5, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL, oneof_index=0
    )
    every.field.add(
        name="right", number=n + 6, type=F.TYPE_MESSAGE, type_name=".probe.Inner", oneof_index=0
    )
    every.oneof_decl.add(name="_maybe")
    every.field.add(
        name="maybe",
        number=n + 7,
        type=F.TYPE_INT32,
        label=F.LABEL_OPTIONAL,
        oneof_index=1,
        proto3_optional=True,
    )

    node = file.message_type.add(name="Node")
    node.field.add(
        name="child", number=1, type=F.TYPE_MESSAGE, type_name=".probe.Node", label=F.LABEL_OPTIONAL
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return pool


POOL = build_pool()
EVERY = POOL.FindMessageTypeByName("probe.Every")
Every = message_factory.GetMessageClass(EVERY)
Inner = message_factory.GetMessageClass(POOL.FindMessageTypeByName("probe.Inner"))


def full() -> Message:
    msg = Every(
        an_int32=-7,
        an_int64=-(2**40),
        a_uint32=7,
        a_uint64=2**63,
        a_sint64=-5,
        a_fixed64=9,
        a_double=1.5,
        a_float=float("inf"),
        a_bool=True,
        a_string="s",
        some_bytes=b"\x00\xff",
        color=1,
        tags=["a", "b"],
        left="l",
        maybe=0,
        inners=[Inner(note="x")],
        labels={"k": Inner(note="v")},
    )
    return msg


def validate(schema, document) -> None:
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(document)


def test_what_the_json_printer_writes_validates() -> None:
    schema = message_schema(EVERY)
    printed = json_format.MessageToDict(full())
    assert printed["anInt64"] == str(-(2**40))  # 64-bit integers are strings
    assert printed["aFloat"] == "Infinity"
    validate(schema, printed)
    validate(schema, json_format.MessageToDict(Every()))  # all defaults: {}


def test_the_schema_names_fields_by_json_name_and_maps_each_kind() -> None:
    props = message_schema(EVERY)["properties"]
    assert props["anInt64"]["type"] == "string"
    assert props["aUint32"]["minimum"] == 0
    assert props["someBytes"]["contentEncoding"] == "base64"
    assert props["color"]["enum"] == ["COLOR_UNSPECIFIED", "COLOR_RED"]
    assert props["inners"]["type"] == "array"
    assert props["labels"]["additionalProperties"]["properties"] == {"note": {"type": "string"}}
    assert "allOf" in message_schema(EVERY)  # the real oneof; the synthetic one adds none
    assert len(message_schema(EVERY)["allOf"]) == 1


@pytest.mark.parametrize(
    "wrong",
    [
        {"left": "l", "right": {}},  # two members of one oneof
        {"anInt64": "12.5"},
        {"aUint32": -1},
        {"color": "COLOR_BLUE"},
        {"aBool": "true"},
        {"labels": {"k": {"note": 3}}},
    ],
)
def test_what_the_mapping_never_prints_is_refused(wrong) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate(message_schema(EVERY), wrong)


def test_a_message_that_contains_itself_cannot_be_inlined() -> None:
    with pytest.raises(UnsupportedMessage, match="contains itself"):
        message_schema(POOL.FindMessageTypeByName("probe.Node"))
