"""Coalescing through every real process: identical concurrent requests of one team,
spread over two gateway replicas, make one provider call (counted at the simulator);
every waiter gets the whole answer, streamed if it asked; the ledger holds the cost
once and each other waiter's saving; another team's identical request is its own."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import orjson
import pytest

from tests.idempotency.conftest import Replica, new_team_key
from tests.idempotency.test_idempotency import usage_for_team
from tests.support.full_stack import FullStack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHAT = "/v1/chat/completions"


def request(sim_id: str, *, stream: bool = False) -> dict[str, Any]:
    # Temperature 0: an answer the exact cache (and so coalescing) takes. The simulator
    # takes about a second, so every request arrives while the first runs.
    body: dict[str, Any] = {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": f"Coalesce me ({sim_id})."}],
        "max_tokens": 24,
        "temperature": 0,
        "sim": {"id": sim_id, "ttft_ms": 600, "output_tokens": 20, "tokens_per_second": 40},
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def stream_text(raw: str) -> tuple[str, dict[str, Any]]:
    """The text of a chat completion stream and its last chunk's ``sluice`` object."""
    text: list[str] = []
    sluice: dict[str, Any] = {}
    for line in raw.split("\n"):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = orjson.loads(line[6:])
        for choice in chunk.get("choices") or ():
            text.append(choice["delta"].get("content") or "")
        sluice = chunk.get("sluice", sluice)
    return "".join(text), sluice


def clients(
    stack: FullStack, replica: Replica, secret: str
) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
    auth = {"Authorization": f"Bearer {secret}"}
    return (
        httpx.AsyncClient(base_url=stack.gateway_url, headers=auth, timeout=60),
        httpx.AsyncClient(base_url=replica.url, headers=auth, timeout=60),
    )


async def test_100_identical_requests_over_two_gateways_make_one_call(
    idem_stack: FullStack, second_gateway: Replica
) -> None:
    secret, team = await new_team_key(idem_stack)
    sim_id = uuid.uuid4().hex
    body = request(sim_id)
    one, two = clients(idem_stack, second_gateway, secret)
    async with one, two:
        answers = await asyncio.gather(
            *((one if i % 2 else two).post(CHAT, json=body) for i in range(100))
        )
    assert all(a.status_code == 200 for a in answers), [
        a.text for a in answers if a.status_code != 200
    ][:2]
    assert await idem_stack.sim_count(sim_id) == 1
    bodies = [a.json() for a in answers]
    contents = {b["choices"][0]["message"]["content"] for b in bodies}
    assert len(contents) == 1
    (content,) = contents
    assert len(content.split()) == 20
    assert {b["choices"][0]["finish_reason"] for b in bodies} == {"stop"}
    assert {b["usage"]["completion_tokens"] for b in bodies} == {20}
    caches = [a.headers["x-sluice-cache"] for a in answers]
    # One leader; the rest followed it (or, arriving after it was done, hit the cache).
    assert caches.count("miss") == 1, caches
    assert set(caches) <= {"miss", "coalesced", "hit"}
    assert caches.count("coalesced") >= 50
    assert all(b["sluice"]["status"] == "success" for b in bodies)
    # Both replicas had followers.
    followers = [a for a in answers if a.headers["x-sluice-cache"] == "coalesced"]
    assert {str(a.url).split("/v1")[0] for a in followers} == {
        idem_stack.gateway_url,
        second_gateway.url,
    }

    # The ledger: 100 requests, the provider's cost once, 99 savings of that cost.
    async def all_billed() -> Any:
        summary = await usage_for_team(idem_stack, team)
        return summary if summary.requests >= 100 else None

    summary = await wait_for(all_billed, timeout=20, what="100 usage rows")
    assert summary.requests == 100
    assert summary.cache_hits == 99
    assert summary.cost_usd_nanos > 0
    assert summary.saved_usd_nanos == 99 * summary.cost_usd_nanos


async def test_streamed_followers_get_the_whole_stream(
    idem_stack: FullStack, second_gateway: Replica
) -> None:
    secret, _team = await new_team_key(idem_stack)
    sim_id = uuid.uuid4().hex
    body = request(sim_id, stream=True)
    one, two = clients(idem_stack, second_gateway, secret)

    async def read(client: httpx.AsyncClient) -> tuple[str, str, dict[str, Any]]:
        async with client.stream("POST", CHAT, json=body) as resp:
            assert resp.status_code == 200
            raw = (await resp.aread()).decode()
            return resp.headers["x-sluice-cache"], *stream_text(raw)

    async with one, two:
        results = await asyncio.gather(*(read(one if i % 2 else two) for i in range(30)))
    assert await idem_stack.sim_count(sim_id) == 1
    texts = {text for _, text, _ in results}
    assert len(texts) == 1 and len(next(iter(texts)).split()) == 20
    assert [c for c, _, _ in results].count("miss") == 1
    assert all(s["status"] == "success" for _, _, s in results)
    assert all(s["usage"]["output_tokens"] == 20 for _, _, s in results)


async def test_another_team_is_never_coalesced_with(idem_stack: FullStack) -> None:
    first, _ = await new_team_key(idem_stack)
    second, _ = await new_team_key(idem_stack)
    sim_id = uuid.uuid4().hex
    body = request(sim_id)
    async with (
        httpx.AsyncClient(
            base_url=idem_stack.gateway_url, headers={"Authorization": f"Bearer {first}"}
        ) as ours,
        httpx.AsyncClient(
            base_url=idem_stack.gateway_url, headers={"Authorization": f"Bearer {second}"}
        ) as theirs,
    ):
        a, b = await asyncio.gather(ours.post(CHAT, json=body), theirs.post(CHAT, json=body))
    assert a.status_code == b.status_code == 200
    assert a.headers["x-sluice-cache"] == b.headers["x-sluice-cache"] == "miss"
    assert a.json()["sluice"]["request_id"] != b.json()["sluice"]["request_id"]
    assert await idem_stack.sim_count(sim_id) == 2
