"""The gateway's side of the semantic cache on a real NATS server, the test answering
the cache: what the lookup and the work carry with and without the header, how a
semantic hit is rendered, and how a bad header value is refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sluice import canonical

from services.gateway.handlers.http.headers import SEMANTIC_HEADER, semantic_wanted
from services.gateway.settings import SemanticCacheMode
from tests.gateway.harness import Gateway, answer
from tests.gateway.test_http import CHAT, assert_problem

QUESTION = "How do I reverse a list in Python?"


def body(**kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "model": "sim-fast",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"  {QUESTION}\n"},
        ],
        "temperature": 0,
    }
    b.update(kw)
    return b


def set_fields(message: Any) -> set[str]:
    return {field.name for field, _ in message.ListFields()}


@pytest.mark.parametrize(
    ("mode", "header", "wanted"),
    [
        (SemanticCacheMode.OPT_IN, None, False),
        (SemanticCacheMode.OPT_IN, "on", True),
        (SemanticCacheMode.OPT_IN, " ON ", True),
        (SemanticCacheMode.OPT_IN, "off", False),
        (SemanticCacheMode.ON, None, True),
        (SemanticCacheMode.ON, "off", False),
        (SemanticCacheMode.OFF, "on", False),
        (SemanticCacheMode.OFF, None, False),
    ],
)
def test_semantic_wanted(mode: SemanticCacheMode, header: str | None, wanted: bool) -> None:
    assert semantic_wanted(mode, header) is wanted


async def test_without_the_header_the_messages_are_as_before(gw: Gateway) -> None:
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=body())
    assert resp.status_code == 200 and resp.headers["x-sluice-cache"] == "miss"
    (lookup,) = gw.fake.lookups
    (work,) = gw.fake.work
    # Nothing semantic on the wire: the same fields, so the same bytes, as before.
    assert set_fields(lookup) == {"cache_key", "request_id"}
    assert not work.semantic_text and not work.semantic_scope and work.cache_key


async def test_with_the_header_lookup_and_work_carry_text_and_scope(gw: Gateway) -> None:
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=body(), headers={SEMANTIC_HEADER: "on"})
    assert resp.status_code == 200 and resp.headers["x-sluice-cache"] == "miss"
    (lookup,) = gw.fake.lookups
    (work,) = gw.fake.work
    request = work.request
    assert lookup.semantic_text == QUESTION == canonical.semantic_text(request)
    assert lookup.semantic_scope == canonical.semantic_scope(request, gw.record.team_id)
    assert lookup.cache_key == work.cache_key == canonical.cache_key(request, gw.record.team_id)
    assert (work.semantic_text, work.semantic_scope) == (
        lookup.semantic_text,
        lookup.semantic_scope,
    )


async def test_the_header_does_not_make_an_uncacheable_request_cacheable(gw: Gateway) -> None:
    async with gw.authed() as http:
        sampled = await http.post(CHAT, json=body(temperature=0.7), headers={SEMANTIC_HEADER: "on"})
        no_store = await http.post(
            CHAT, json=body(), headers={SEMANTIC_HEADER: "on", "cache-control": "no-store"}
        )
    assert sampled.headers["x-sluice-cache"] == "bypass"
    first, second = gw.fake.work
    assert not first.cache_key and not first.semantic_text
    # Looked up by meaning, but the answer is not stored (nor indexed).
    assert no_store.headers["x-sluice-cache"] == "miss"
    assert not second.cache_key and not second.semantic_text
    assert [bool(lookup.semantic_text) for lookup in gw.fake.lookups] == [True]


async def test_a_semantic_hit_is_rendered_with_its_similarity(gw: Gateway) -> None:
    gw.fake.cache_answer = answer("Use reversed() or list.reverse().")
    gw.fake.cache_similarity = 0.99812345
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=body(), headers={SEMANTIC_HEADER: "on"})
        stream = await http.post(
            CHAT,
            json=body(stream=True, stream_options={"include_usage": True}),
            headers={SEMANTIC_HEADER: "on"},
        )
    assert resp.status_code == 200 and resp.headers["x-sluice-cache"] == "semantic-hit"
    sluice = resp.json()["sluice"]
    assert sluice["cache"] == "semantic-hit" and sluice["cache_similarity"] == 0.9981
    assert sluice["cost_usd"] == 0
    assert not gw.fake.work
    assert stream.headers["x-sluice-cache"] == "semantic-hit"
    last = [
        json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")
    ][-1]
    assert last["sluice"]["cache"] == "semantic-hit"

    # The official SDK takes it as any completion, the sluice object as an extra.
    client = gw.sdk()
    completion = await client.chat.completions.create(
        model="sim-fast",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        extra_headers={SEMANTIC_HEADER: "on"},
    )
    assert completion.choices[0].message.content == "Use reversed() or list.reverse()."
    assert (completion.model_extra or {})["sluice"]["cache"] == "semantic-hit"


async def test_exact_hits_keep_their_status(gw: Gateway) -> None:
    gw.fake.cache_answer = answer("exact")
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=body(), headers={SEMANTIC_HEADER: "on"})
    assert resp.headers["x-sluice-cache"] == "hit"
    assert "cache_similarity" not in resp.json()["sluice"]


@pytest.mark.parametrize("value", ["yes", "", "on,off", "1"])
async def test_a_bad_header_value_is_a_problem_not_a_server_error(gw: Gateway, value: str) -> None:
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=body(), headers={SEMANTIC_HEADER: value})
    problem = assert_problem(resp, 400, "invalid_request")
    assert problem["error"]["param"] == SEMANTIC_HEADER
    assert not gw.fake.work and not gw.fake.lookups


async def test_images_in_the_last_message_use_the_exact_cache_only(gw: Gateway) -> None:
    content = [
        {"type": "text", "text": QUESTION},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
    ]
    async with gw.authed() as http:
        resp = await http.post(
            CHAT,
            json=body(messages=[{"role": "user", "content": content}]),
            headers={SEMANTIC_HEADER: "on"},
        )
    assert resp.status_code == 200
    (lookup,) = gw.fake.lookups
    assert set_fields(lookup) == {"cache_key", "request_id"}
    assert not gw.fake.work[0].semantic_text
