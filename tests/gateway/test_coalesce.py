"""Coalescing at one gateway, with the test standing in for the worker: followers share
the leader's answer, a claim whose leader never opened its stream is taken over, and
identical requests that differ in dialect or delivery do not share."""

from __future__ import annotations

import asyncio
import uuid

import orjson
from sluice import canonical
from sluice.inference.v1 import inference_pb2
from sluice.topology import Buckets

from services.gateway.domain.coalesce import coalesce_key
from services.gateway.domain.dialects.openai.request import parse_body, to_chat_request
from tests.gateway.harness import Gateway, answer, build_gateway

CHAT = "/v1/chat/completions"


def body() -> dict[str, object]:
    return {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": f"same {uuid.uuid4().hex}"}],
        "temperature": 0,
    }


async def test_followers_share_the_leaders_answer(gw: Gateway):
    async def slow(work, fake):
        await asyncio.sleep(0.3)
        await fake.emit(work, inference_pb2.StreamEvent(sequence=1, final=answer("shared")))

    gw.fake.scenario = slow
    request = body()
    async with gw.authed() as http:
        answers = await asyncio.gather(*(http.post(CHAT, json=request) for _ in range(5)))
    assert [a.status_code for a in answers] == [200] * 5
    assert len(gw.fake.work) == 1
    leader = gw.fake.work[0].request_id
    caches = sorted(a.headers["x-sluice-cache"] for a in answers)
    assert caches == ["coalesced"] * 4 + ["miss"]
    for a in answers:
        data = a.json()
        assert data["choices"][0]["message"]["content"] == "shared"
        assert data["sluice"]["request_id"] == leader
    # Every follower's reservation is settled by a usage event of its own: no cost, the
    # leader's cost as its saving.
    events = [e for e in await gw.fake.usage_events(gw.record.key_id) if e.cache_hit]
    assert len(events) == 4
    assert all(e.cache_saved_usd_nanos == answer().cost_usd_nanos for e in events)
    assert len({e.request_id for e in events}) == 4 and leader not in {e.request_id for e in events}
    # The claim is gone with the answer: the next identical request leads again.
    async with gw.authed() as http:
        again = await http.post(CHAT, json=request)
    assert again.headers["x-sluice-cache"] == "miss"
    assert len(gw.fake.work) == 2


async def test_a_claim_without_a_stream_is_taken_over(bus, tmp_path):
    gw = await build_gateway(bus, tmp_path, coalesce_open_wait_seconds=0.3)
    try:
        request = body()
        chat = to_chat_request(parse_body(orjson.dumps(request)))
        key = coalesce_key(canonical.cache_key(chat, scope=gw.record.team_id), "openai", False)
        kv = await bus.kv(Buckets.COALESCE)
        await kv.put(key, b"req_gone")
        async with gw.authed() as http:
            resp = await http.post(CHAT, json=request)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-sluice-cache"] == "miss"
        assert len(gw.fake.work) == 1
    finally:
        await gw.close()


async def test_streams_and_plain_answers_do_not_share(gw: Gateway):
    async def slow(work, fake):
        await asyncio.sleep(0.2)
        await fake.emit(work, inference_pb2.StreamEvent(sequence=1, final=answer("x")))

    gw.fake.scenario = slow
    request = body()
    async with gw.authed() as http:
        plain, streamed = await asyncio.gather(
            http.post(CHAT, json=request), http.post(CHAT, json={**request, "stream": True})
        )
    assert plain.status_code == streamed.status_code == 200
    assert len(gw.fake.work) == 2
