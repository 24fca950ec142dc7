"""The OpenAPI document the gateway serves at /docs/openapi.json carries the captured
examples, and its contract part is the committed snapshot's for the current version."""

from __future__ import annotations

from services.gateway.domain.versions import VERSIONS
from services.gateway.handlers.http.openapi import breaking_changes, current_document, load_examples
from tests.gateway.harness import Gateway


async def test_the_served_document_has_the_examples(gw: Gateway) -> None:
    async with gw.authed() as http:
        resp = await http.get("/docs/openapi.json")
    assert resp.status_code == 200
    assert resp.headers["sluice-version"] == VERSIONS.current.name
    document = resp.json()
    chat = document["paths"]["/v1/chat/completions"]["post"]
    examples = chat["responses"]["200"]["content"]["application/json"]["examples"]
    captured = load_examples()["operations"]["createChatCompletion"][0]
    assert examples["completion"]["value"] == captured["value"]
    problems = chat["responses"]["404"]["content"]["application/problem+json"]["examples"]
    assert problems["model_not_found"]["value"]["code"] == "model_not_found"
    assert chat["requestBody"]["content"]["application/json"]["examples"]["completion"]
    # The version header, declared on every operation and every response.
    for item in document["paths"].values():
        for op in item.values():
            names = [p["name"] for p in op.get("parameters", []) if p["in"] == "header"]
            assert "Sluice-Version" in names, op["operationId"]
            for response in op["responses"].values():
                assert "sluice-version" in response["headers"], op["operationId"]
    # Examples add to the document; they never break the version's contract.
    assert breaking_changes(current_document(), document) == []
