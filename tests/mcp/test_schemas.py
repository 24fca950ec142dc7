"""The tools' declarations, without a server: schemas MCP clients accept, and arguments
that name the HTTP API's own vocabulary."""

from __future__ import annotations

import typing

import jsonschema
import pytest
from sluice.errors import SluiceError

from services.gateway.domain.usage import DIMENSIONS
from services.gateway.handlers.http.mcp import schemas
from services.gateway.handlers.http.mcp.endpoint import _TOOL_LIST
from services.gateway.handlers.http.mcp.tools import TOOLS


def test_usage_dimensions_are_the_usage_routes() -> None:
    assert set(typing.get_args(schemas.Dimension)) == set(DIMENSIONS)


@pytest.mark.parametrize("tool", _TOOL_LIST, ids=lambda t: t.name)
def test_every_tool_has_object_schemas_in_and_out(tool) -> None:
    for schema in (tool.input_schema, tool.output_schema):
        assert schema is not None and schema["type"] == "object"
        jsonschema.Draft202012Validator.check_schema(schema)
    assert tool.description and tool.annotations is not None


def test_tool_names_are_unique_and_scoped() -> None:
    names = [t.name for t in TOOLS]
    assert len(names) == len(set(names))
    scopes = {t.name: t.scope for t in TOOLS}
    assert scopes["chat"] == "chat" and scopes["estimate_cost"] == "chat"
    assert {scopes[n] for n in ("submit_job", "get_job", "cancel_job")} == {"jobs"}
    assert scopes["my_usage"] is None and scopes["list_models"] is None


def test_arguments_refuse_unknown_members() -> None:
    chat = next(t for t in TOOLS if t.name == "chat")
    with pytest.raises(SluiceError) as caught:
        chat.parse({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3})
    assert caught.value.code == "invalid_request"
