"""The OpenAPI guard: the document the gateway serves may only grow within an API
version. It is compared with the committed snapshot of the current version
(``docs/openapi/<version>.json``, refreshed by ``make openapi``); planted changes on a
copy of that snapshot show what counts as breaking and what as additive, and
``make openapi`` itself refuses to overwrite a snapshot with a breaking change."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.gateway.domain.versions import VERSIONS
from services.gateway.handlers.http import openapi
from services.gateway.handlers.http.openapi import breaking_changes, snapshot_path

CURRENT = VERSIONS.current.name


def snapshot() -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(snapshot_path(CURRENT).read_bytes())
    return data


def test_the_served_document_does_not_break_the_current_versions_snapshot() -> None:
    path = snapshot_path(CURRENT)
    assert path.exists(), f"no snapshot for API version {CURRENT}: run `make openapi`"
    assert breaking_changes(snapshot(), openapi.current_document()) == []


def test_every_supported_version_has_its_snapshot() -> None:
    for name in VERSIONS.supported():
        assert snapshot_path(name).exists(), name


# --- planted changes on a copy of the snapshot -------------------------------------------


@pytest.fixture
def base() -> dict[str, Any]:
    doc = snapshot()
    # Schemas as a typed operation would have them, to plant changes in.
    doc.setdefault("components", {}).setdefault("schemas", {})["Widget"] = {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "size": {"type": "integer"},
            "kind": {"type": "string", "enum": ["a", "b"]},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["id"],
    }
    doc["paths"]["/v1/widgets"] = {
        "post": {
            "operationId": "createWidget",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Widget"}}
                },
            },
            "responses": {
                "201": {
                    "description": "made",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Widget"}}
                    },
                }
            },
        }
    }
    return doc


def changed(base: dict[str, Any], plant: Any) -> list[str]:
    new = copy.deepcopy(base)
    plant(new)
    return breaking_changes(base, new)


def widget(doc: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = doc["components"]["schemas"]["Widget"]
    return schema


def test_planted_breaking_changes_are_named(base: dict[str, Any]) -> None:
    def drop_path(d: dict[str, Any]) -> None:
        del d["paths"]["/v1/usage"]

    def drop_operation(d: dict[str, Any]) -> None:
        del d["paths"]["/v1/jobs"]["post"]

    def drop_parameter(d: dict[str, Any]) -> None:
        d["paths"]["/v1/jobs"]["get"]["parameters"].pop(0)

    def retype_parameter(d: dict[str, Any]) -> None:
        d["paths"]["/v1/jobs"]["get"]["parameters"][0]["schema"] = {"type": "string"}

    def require_parameter(d: dict[str, Any]) -> None:
        d["paths"]["/v1/jobs"]["get"]["parameters"][0]["required"] = True

    def add_required_parameter(d: dict[str, Any]) -> None:
        d["paths"]["/v1/models"]["get"].setdefault("parameters", []).append(
            {"name": "owner", "in": "query", "required": True, "schema": {"type": "string"}}
        )

    def require_field(d: dict[str, Any]) -> None:
        widget(d)["required"] = ["id", "size"]

    def drop_field(d: dict[str, Any]) -> None:
        del widget(d)["properties"]["size"]

    def retype_field(d: dict[str, Any]) -> None:
        widget(d)["properties"]["size"] = {"type": "string"}

    def retype_items(d: dict[str, Any]) -> None:
        widget(d)["properties"]["tags"]["items"] = {"type": "integer"}

    def drop_enum_value(d: dict[str, Any]) -> None:
        widget(d)["properties"]["kind"]["enum"] = ["a"]

    def drop_response(d: dict[str, Any]) -> None:
        del d["paths"]["/v1/widgets"]["post"]["responses"]["201"]

    def drop_media_type(d: dict[str, Any]) -> None:
        body = d["paths"]["/v1/widgets"]["post"]["requestBody"]["content"]
        body["application/x-widget"] = body.pop("application/json")

    cases = {
        drop_path: "/v1/usage: path removed",
        drop_operation: "POST /v1/jobs: operation removed",
        drop_parameter: "GET /v1/jobs parameter limit (query): removed",
        retype_parameter: "GET /v1/jobs parameter limit (query): type ['integer'] became",
        require_parameter: "GET /v1/jobs parameter limit (query): newly required",
        add_required_parameter: "GET /v1/models parameter owner (query): added as required",
        require_field: "POST /v1/widgets body.size: newly required",
        drop_field: "POST /v1/widgets body.size: property removed",
        retype_field: "POST /v1/widgets response 201.size: type ['integer'] became ['string']",
        retype_items: "POST /v1/widgets body.tags[]: type ['string'] became ['integer']",
        drop_enum_value: "POST /v1/widgets body.kind: enum values ['b'] removed",
        drop_response: "POST /v1/widgets response 201: removed",
        drop_media_type: "POST /v1/widgets request body application/json: no longer accepted",
    }
    for plant, expected in cases.items():
        found = changed(base, plant)
        assert any(line.startswith(expected) for line in found), (plant.__name__, found)


def test_additive_changes_pass(base: dict[str, Any]) -> None:
    def grow(d: dict[str, Any]) -> None:
        d["paths"]["/v1/gadgets"] = {"get": {"operationId": "listGadgets", "responses": {}}}
        d["paths"]["/v1/widgets"]["get"] = {"operationId": "listWidgets", "responses": {}}
        d["paths"]["/v1/jobs"]["get"]["parameters"].append(
            {"name": "status", "in": "query", "required": False, "schema": {"type": "string"}}
        )
        widget(d)["properties"]["colour"] = {"type": "string"}
        widget(d)["properties"]["kind"]["enum"] = ["a", "b", "c"]
        d["paths"]["/v1/widgets"]["post"]["responses"]["409"] = {"description": "conflict"}
        d["info"]["description"] = "changed words"

    assert changed(base, grow) == []
    assert breaking_changes(base, base) == []


# --- `make openapi` ------------------------------------------------------------------


def test_make_openapi_refuses_to_overwrite_a_snapshot_with_a_breaking_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    served = openapi.current_document()
    # A snapshot that promised one more path than the gateway serves now.
    promised = copy.deepcopy(served)
    promised["paths"]["/v1/retired-thing"] = {"get": {"responses": {}}}
    target = snapshot_path(CURRENT, tmp_path)
    target.write_bytes(openapi.dumps(promised))
    assert openapi.main(["write", str(tmp_path)]) == 1
    assert "/v1/retired-thing: path removed" in capsys.readouterr().err
    assert target.read_bytes() == openapi.dumps(promised)
    assert openapi.main(["check", str(tmp_path)]) == 1

    # A snapshot with one path fewer: the gateway's document only adds to it.
    smaller = copy.deepcopy(served)
    del smaller["paths"]["/v1/usage"]
    target.write_bytes(openapi.dumps(smaller))
    assert openapi.main(["check", str(tmp_path)]) == 0
    assert openapi.main(["write", str(tmp_path)]) == 0
    assert orjson.loads(target.read_bytes()) == orjson.loads(openapi.dumps(served))
