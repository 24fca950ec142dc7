"""The OpenAPI document's examples (``make openapi-examples``): every operation has one
captured from a real response, every error code has one or a stated reason why not,
and what they show is consistent (codes and statuses as the catalogue says, token
counts that add up, no secret)."""

from __future__ import annotations

import re
from typing import Any

from sluice.errors import CATALOGUE, ErrorCode

from services.gateway.handlers.http.application import openapi_document
from services.gateway.handlers.http.openapi import METHODS, load_examples

EXAMPLES = load_examples()


def operations(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        op["operationId"]: op
        for item in document["paths"].values()
        for method, op in item.items()
        if method in METHODS
    }


def test_every_operation_has_an_example_in_the_served_document() -> None:
    served = operations(openapi_document(examples=True))
    assert set(served) == set(operations(openapi_document()))
    for op_id, op in served.items():
        shown = [
            name
            for response in op["responses"].values()
            for media in (response.get("content") or {}).values()
            for name in media.get("examples", {})
        ]
        assert shown, f"{op_id} has no example: run `make openapi-examples`"
    # Every captured example is of an operation that exists.
    assert set(EXAMPLES["operations"]) <= set(served)
    assert {e["operation"] for e in EXAMPLES["errors"].values()} <= set(served)


def test_every_error_code_has_an_example_or_a_reason() -> None:
    captured, reasons = set(EXAMPLES["errors"]), EXAMPLES["not_captured"]
    assert captured | set(reasons) == {str(code) for code in ErrorCode}
    assert not captured & set(reasons)
    assert all(len(why) > 10 for why in reasons.values())
    for code, entry in EXAMPLES["errors"].items():
        problem = entry["value"]
        assert problem["code"] == code and problem["type"].endswith("/" + code)
        assert problem["status"] == entry["status"] == CATALOGUE[ErrorCode(code)].status, code
        assert re.fullmatch(r"[0-9a-f]{32}", problem["trace_id"]), code
        assert problem["detail"].endswith(CATALOGUE[ErrorCode(code)].fix), code


def test_examples_show_real_token_counts_and_no_secret() -> None:
    chat = EXAMPLES["operations"]["createChatCompletion"]
    plain = next(e["value"] for e in chat if e["name"] == "completion")
    usage, sluice = plain["usage"], plain["sluice"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert sluice["usage"]["input_tokens"] == usage["prompt_tokens"]
    assert sluice["usage"]["output_tokens"] == usage["completion_tokens"]
    assert sluice["cost_usd"] > 0 and sluice["provider"] == "simulator"
    stream = next(e["value"] for e in chat if e["name"] == "stream")
    assert stream.rstrip().endswith("data: [DONE]") and '"completion_tokens"' in stream
    message = EXAMPLES["operations"]["createMessage"][0]["value"]
    assert message["usage"]["input_tokens"] > 0 and message["usage"]["output_tokens"] > 0

    def secrets(value: Any) -> list[str]:
        if isinstance(value, dict):
            return [
                v if k == "secret" else s
                for k, v in value.items()
                for s in ([v] if k == "secret" else secrets(v))
            ]
        if isinstance(value, list):
            return [s for v in value for s in secrets(v)]
        return []

    found = secrets(EXAMPLES)
    assert found and all(s.endswith("<redacted in this example>") for s in found), found
