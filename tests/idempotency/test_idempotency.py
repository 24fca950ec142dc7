"""``Idempotency-Key`` through every real process: one run, the stored response replayed
(``Idempotent-Replayed: true``), 409 with progress while the first runs (or, for a
stream asked with ``Accept: text/event-stream``, the same stream), 422 for another
body, team scoping, expiry, 50 concurrent duplicates on one and on two gateway replicas
(one upstream call at the simulator, one row in the cost ledger), what a failed first
request leaves behind, and 400 for a malformed key.

Semantics of a first request that fails (see ``services/gateway/domain/idempotency/policy.py``):
an answer that came from work the worker ran (an upstream 4xx/5xx) is stored and
replayed; a request refused before any work ran (invalid body, unknown model, rate
limit) releases the key, so a corrected retry with the same key runs. A client that
gives up while its work runs leaves the key in flight: its retry gets 409, then the
first run's result, never a second run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import orjson
import pytest
from sluice.bus import Bus
from sluice.cost.v1 import cost_pb2, cost_pb2_grpc
from sluice.topology import Buckets, ServiceName

from tests.idempotency.conftest import OTHER_KEY, TTL_SECONDS, Replica, new_team_key
from tests.support.full_stack import FullStack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHAT = "/v1/chat/completions"
JOBS = "/v1/jobs"
REPLAYED = "idempotent-replayed"
PROBLEM = "application/problem+json"
# A generation that lasts about 1.5 s at the simulator.
SLOW: dict[str, Any] = {"output_tokens": 30, "tokens_per_second": 20}


def uid() -> str:
    return uuid.uuid4().hex


def chat(sim_id: str, *, stream: bool = False, max_tokens: int = 8, **sim: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": f"Say hello ({sim_id[:8]})."}],
        "max_tokens": max(max_tokens, int(sim.get("output_tokens", 0))),
        "sim": {"id": sim_id, **sim},
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def keyed(key: str, **extra: str) -> dict[str, str]:
    return {"Idempotency-Key": key, **extra}


def problem(resp: httpx.Response) -> dict[str, Any]:
    assert resp.headers["content-type"].startswith(PROBLEM), resp.headers
    body: dict[str, Any] = resp.json()
    assert body["status"] == resp.status_code
    assert body["code"] == body["error"]["code"]
    return body


def replayed(resp: httpx.Response) -> bool:
    return resp.headers.get(REPLAYED) == "true"


async def sse(
    client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str]
) -> tuple[httpx.Response, bytes]:
    async with client.stream("POST", CHAT, json=body, headers=headers) as resp:
        raw = await resp.aread()
    return resp, raw


def sse_events(raw: bytes) -> list[tuple[str, Any]]:
    """(id, data) of every event with data; heartbeats and the retry hint dropped."""
    out: list[tuple[str, Any]] = []
    for block in raw.decode().split("\n\n"):
        ident, data = "", None
        for line in block.split("\n"):
            if line.startswith("id: "):
                ident = line[4:]
            elif line.startswith("data: "):
                data = line[6:]
        if data is not None:
            out.append((ident, data if data == "[DONE]" else orjson.loads(data)))
    return out


def without_sluice(events: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The events with the ``sluice`` object (its latencies differ per response) cut."""
    out = []
    for ident, data in events:
        kept = {k: v for k, v in data.items() if k != "sluice"} if isinstance(data, dict) else data
        out.append((ident, kept))
    return out


async def usage_for_team(stack: FullStack, team_id: str) -> cost_pb2.UsageSummary:
    async with stack.stack.grpc_channel(ServiceName.COST_TRACKER) as channel:
        stub = cost_pb2_grpc.UsageServiceStub(channel)
        summary: cost_pb2.UsageSummary = await stub.QueryUsage(
            cost_pb2.UsageQuery(team_id=team_id), timeout=5
        )
        return summary


async def billed_once(stack: FullStack, team_id: str) -> None:
    """The cost ledger holds exactly one request for the team, and keeps holding one."""

    async def some() -> cost_pb2.UsageSummary | None:
        summary = await usage_for_team(stack, team_id)
        return summary if summary.requests else None

    first = await wait_for(some, timeout=15, what=f"usage of {team_id}")
    assert first.requests == 1, first
    assert first.total_cost_usd > 0
    # A second run would bill about as late as the first: give it the chance to show.
    await asyncio.sleep(1.0)
    again = await usage_for_team(stack, team_id)
    assert again.requests == 1, again


async def wait_sim(stack: FullStack, sim_id: str, count: int = 1) -> None:
    async def seen() -> bool:
        return await stack.sim_count(sim_id) >= count

    await wait_for(seen, timeout=15, interval=0.02, what=f"the simulator to see {sim_id}")


# --- first run and replay ---------------------------------------------------------------


async def test_first_request_runs_and_the_replay_is_the_stored_response(
    idem_stack: FullStack,
) -> None:
    sim_id, key = uid(), uid()
    body = chat(sim_id)
    async with idem_stack.client() as client:
        first = await client.post(CHAT, json=body, headers=keyed(key))
        assert first.status_code == 200, first.text
        assert REPLAYED not in first.headers
        assert first.json()["object"] == "chat.completion"

        again = await client.post(CHAT, json=body, headers=keyed(key))
        assert again.status_code == 200, again.text
        assert replayed(again)
        assert again.content == first.content
        assert again.headers["content-type"] == first.headers["content-type"]

        # The key as a structured-field string is the same key.
        quoted = await client.post(CHAT, json=body, headers=keyed(f'"{key}"'))
        assert quoted.status_code == 200 and replayed(quoted)
        assert quoted.content == first.content
    assert await idem_stack.sim_count(sim_id) == 1


async def test_a_stream_is_replayed_byte_for_byte(idem_stack: FullStack) -> None:
    sim_id, key = uid(), uid()
    body = chat(sim_id, stream=True, output_tokens=12, max_tokens=12)
    async with idem_stack.client() as client:
        first, raw = await sse(client, body, keyed(key))
        assert first.status_code == 200
        assert first.headers["content-type"].startswith("text/event-stream")
        assert REPLAYED not in first.headers
        events = sse_events(raw)
        assert events[-1] == ("", "[DONE]")
        # Opening chunk, text (tokens that reach the worker together leave as one
        # event), final chunk, [DONE].
        assert len(events) >= 4

        again, replay = await sse(client, body, keyed(key))
        assert again.status_code == 200
        assert replayed(again)
        assert again.headers["content-type"].startswith("text/event-stream")
        assert replay == raw
    assert await idem_stack.sim_count(sim_id) == 1


async def test_a_stream_answered_from_the_cache_is_replayed(idem_stack: FullStack) -> None:
    """A cache hit never reaches SLUICE_STREAMS: its replay must still be its answer."""
    sim_id, key = uid(), uid()
    body = {**chat(sim_id, stream=True), "temperature": 0}
    async with idem_stack.client() as client:
        await sse(client, body, {})
        # The store lands just after the answer: a poll sent before it misses and runs.
        misses = 0

        async def cached() -> bytes | None:
            nonlocal misses
            resp, data = await sse(client, body, {})
            if resp.headers.get("x-sluice-cache") == "hit":
                return data
            misses += 1
            return None

        await wait_for(cached, timeout=10, what="the answer to be cached")
        first, hit = await sse(client, body, keyed(key))
        assert first.status_code == 200 and first.headers["x-sluice-cache"] == "hit"
        again, replay = await sse(client, body, keyed(key))
        assert again.status_code == 200, replay
        assert replayed(again)
        assert replay == hit
    assert await idem_stack.sim_count(sim_id) == 1 + misses, "the keyed hit and its replay ran"


# --- duplicates while the first runs ------------------------------------------------------


async def test_a_duplicate_in_flight_gets_409_with_progress(idem_stack: FullStack) -> None:
    sim_id, key = uid(), uid()
    body = chat(sim_id, **SLOW)
    async with idem_stack.client() as client:
        running = asyncio.create_task(client.post(CHAT, json=body, headers=keyed(key)))
        await wait_sim(idem_stack, sim_id)

        async def conflict_running() -> httpx.Response | None:
            resp = await client.post(CHAT, json=body, headers=keyed(key))
            assert resp.status_code == 409, resp.text
            running = problem(resp)["details"]["status"] == "in_progress"
            return resp if running else None

        # The simulator has it, so a worker started it: the 409 says so.
        conflict = await wait_for(conflict_running, timeout=5, what="the 409 to say running")
        err = problem(conflict)
        assert err["code"] == "idempotency_key_in_use"
        assert err["details"]["status"] == "in_progress"
        progress = err["details"]["progress"]
        assert progress["attempt"] == 1
        # Not streamed: its tokens only arrive with the whole answer.
        assert progress["tokens"] == 0
        assert 0 < progress["elapsed_ms"] < 10_000
        assert err["details"]["started_at"] <= time.time()
        assert int(conflict.headers["retry-after"]) >= 1
        in_flight_id = err["details"]["request_id"]

        # Asking for a stream does not attach to a request that is not streamed.
        as_sse = await client.post(CHAT, json=body, headers=keyed(key, Accept="text/event-stream"))
        assert as_sse.status_code == 409
        # Another body under the key is refused while it runs, too.
        other = await client.post(CHAT, json=chat(uid()), headers=keyed(key))
        assert other.status_code == 422
        assert problem(other)["code"] == "idempotency_key_reused"

        first = await running
        assert first.status_code == 200, first.text
        assert first.json()["sluice"]["request_id"] == in_flight_id
        after = await client.post(CHAT, json=body, headers=keyed(key))
        assert after.status_code == 200 and replayed(after)
        assert after.content == first.content
    assert await idem_stack.sim_count(sim_id) == 1


async def test_a_stream_duplicate_asking_for_sse_attaches_to_the_same_stream(
    idem_stack: FullStack,
) -> None:
    sim_id, key = uid(), uid()
    body = chat(sim_id, stream=True, **SLOW)
    sse_headers = keyed(key, Accept="text/event-stream")
    async with idem_stack.client() as client, idem_stack.client() as second:
        async with client.stream("POST", CHAT, json=body, headers=sse_headers) as first:
            assert first.status_code == 200
            chunks: list[bytes] = []
            seen = 0
            stream = first.aiter_raw()
            async for chunk in stream:
                chunks.append(chunk)
                seen += chunk.count(b"data: ")
                if seen >= 3:
                    break

            # Without Accept: text/event-stream a duplicate gets the 409, with the
            # tokens streamed so far.
            plain = await second.post(CHAT, json=body, headers=keyed(key))
            assert plain.status_code == 409, plain.text
            err = problem(plain)
            assert err["code"] == "idempotency_key_in_use"
            assert err["details"]["status"] == "in_progress"
            assert 3 <= err["details"]["progress"]["tokens"] < 30

            attached = asyncio.create_task(sse(second, body, sse_headers))
            async for chunk in stream:
                chunks.append(chunk)
        raw = b"".join(chunks)
        dup, dup_raw = await attached
    assert dup.status_code == 200
    assert replayed(dup)
    assert dup.headers["content-type"].startswith("text/event-stream")
    events, dup_events = sse_events(raw), sse_events(dup_raw)
    # Thirty paced tokens, one event each unless some reached the worker together.
    assert len(events) > 4
    assert without_sluice(dup_events) == without_sluice(events)
    last = [d for _, d in events if isinstance(d, dict) and "sluice" in d]
    dup_last = [d for _, d in dup_events if isinstance(d, dict) and "sluice" in d]
    assert dup_last[0]["sluice"]["request_id"] == last[0]["sluice"]["request_id"]
    assert await idem_stack.sim_count(sim_id) == 1


# --- another body, another team -----------------------------------------------------------


async def test_the_same_key_with_another_body_is_422(idem_stack: FullStack) -> None:
    sim_id, other_id, key = uid(), uid(), uid()
    async with idem_stack.client() as client:
        first = await client.post(CHAT, json=chat(sim_id), headers=keyed(key))
        assert first.status_code == 200
        other = await client.post(CHAT, json=chat(other_id), headers=keyed(key))
        assert other.status_code == 422, other.text
        err = problem(other)
        assert err["code"] == "idempotency_key_reused"
        assert err["details"]["request_id"] == first.json()["sluice"]["request_id"]
        assert other.headers.get("x-should-retry") == "false"
        # The same key on another route is another request, too.
        job = await client.post(JOBS, json={"request": chat(sim_id)}, headers=keyed(key))
        assert job.status_code == 422
        # The same body with its members in another order is the same request.
        reordered = dict(reversed(list(chat(sim_id).items())))
        same = await client.post(CHAT, json=reordered, headers=keyed(key))
        assert same.status_code == 200 and replayed(same)
    assert await idem_stack.sim_count(sim_id) == 1
    assert await idem_stack.sim_count(other_id) == 0


async def test_keys_are_scoped_to_the_team(idem_stack: FullStack) -> None:
    sim_id, key = uid(), uid()
    body = chat(sim_id)
    async with idem_stack.client() as ours, idem_stack.client(OTHER_KEY) as theirs:
        mine = await ours.post(CHAT, json=body, headers=keyed(key))
        other = await theirs.post(CHAT, json=body, headers=keyed(key))
        assert mine.status_code == other.status_code == 200
        assert not replayed(mine) and not replayed(other)
        assert mine.json()["sluice"]["request_id"] != other.json()["sluice"]["request_id"]
        # Each team replays its own answer; another body is only refused within a team.
        assert (await ours.post(CHAT, json=body, headers=keyed(key))).content == mine.content
        assert (await theirs.post(CHAT, json=body, headers=keyed(key))).content == other.content
    assert await idem_stack.sim_count(sim_id) == 2


# --- concurrency ------------------------------------------------------------------------


async def storm(
    clients: list[httpx.AsyncClient], body: dict[str, Any], key: str, count: int
) -> list[httpx.Response]:
    """``count`` duplicates over ``clients`` in turn: a burst at once, some spread while
    the first runs, and the last fifth once an original (not replayed) answer is back."""
    answered = asyncio.Event()
    burst, spread = count // 2, count - count // 5

    async def one(i: int) -> httpx.Response:
        if i >= spread:
            await asyncio.wait_for(answered.wait(), 30)
        elif i >= burst:
            await asyncio.sleep(0.04 * (i - burst))
        resp = await clients[i % len(clients)].post(CHAT, json=body, headers=keyed(key))
        if resp.status_code == 200 and not replayed(resp):
            answered.set()
        return resp

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def check_storm(responses: list[httpx.Response], late: int) -> None:
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 409}, [(r.status_code, r.text[:200]) for r in responses]
    originals = [r for r in responses if r.status_code == 200 and not replayed(r)]
    assert len(originals) == 1, statuses
    winner = originals[0]
    request_id = winner.json()["sluice"]["request_id"]
    for resp in responses:
        if resp.status_code == 200:
            assert resp.content == winner.content
        else:
            err = problem(resp)
            assert err["code"] == "idempotency_key_in_use"
            assert err["details"]["request_id"] == request_id
    assert statuses.count(409) >= 1, "no duplicate arrived while the first ran"
    assert all(r.status_code == 200 and replayed(r) for r in responses[-late:])


def many(stack_url: str, secret: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=stack_url,
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30,
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
    )


async def test_50_concurrent_duplicates_run_once_and_bill_once(idem_stack: FullStack) -> None:
    secret, team = await new_team_key(idem_stack)
    sim_id, key = uid(), uid()
    body = chat(sim_id, **SLOW)
    async with many(idem_stack.gateway_url, secret) as client:
        responses = await storm([client], body, key, 50)
    check_storm(responses, late=10)
    assert await idem_stack.sim_count(sim_id) == 1
    await billed_once(idem_stack, team)


async def test_duplicates_across_two_gateway_replicas_run_once(
    idem_stack: FullStack, second_gateway: Replica
) -> None:
    secret, team = await new_team_key(idem_stack)
    sim_id, key = uid(), uid()
    body = chat(sim_id, **SLOW)
    async with (
        many(idem_stack.gateway_url, secret) as one,
        many(second_gateway.url, secret) as two,
    ):
        responses = await storm([one, two], body, key, 40)
        check_storm(responses, late=8)
        # Both replicas answered conflicts and replays.
        for start in (0, 1):
            assert {r.status_code for r in responses[start::2]} >= {200}
        # A replica that did not run it replays it.
        late_sim, late_key = uid(), uid()
        late_body = chat(late_sim)
        first = await one.post(CHAT, json=late_body, headers=keyed(late_key))
        again = await two.post(CHAT, json=late_body, headers=keyed(late_key))
        assert first.status_code == again.status_code == 200
        assert replayed(again) and again.content == first.content
    assert await idem_stack.sim_count(sim_id) == 1
    assert await idem_stack.sim_count(late_sim) == 1
    # The storm's one run and the late request.
    assert (await settled_usage(idem_stack, team)).requests == 2


async def settled_usage(stack: FullStack, team_id: str) -> cost_pb2.UsageSummary:
    """The team's usage once its ledger rows stopped changing."""
    last = -1
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        summary = await usage_for_team(stack, team_id)
        if summary.requests and summary.requests == last:
            return summary
        last = summary.requests
        await asyncio.sleep(0.75)
    raise AssertionError(f"usage of {team_id} never settled")


# --- expiry -----------------------------------------------------------------------------


async def test_keys_expire_after_the_configured_ttl(idem_stack: FullStack) -> None:
    bus = await Bus.connect(idem_stack.nats.url, "tests-idem-ttl")
    try:
        info = await bus.js.stream_info(f"KV_{Buckets.IDEMPOTENCY.name}")
    finally:
        await bus.close()
    assert info.config.max_age == pytest.approx(TTL_SECONDS)

    sim_id, key = uid(), uid()
    body = chat(sim_id)
    async with idem_stack.client() as client:
        sent = time.monotonic()
        first = await client.post(CHAT, json=body, headers=keyed(key))
        again = await client.post(CHAT, json=body, headers=keyed(key))
        assert first.status_code == again.status_code == 200
        assert replayed(again)
        await asyncio.sleep(max(0.0, sent + TTL_SECONDS + 0.5 - time.monotonic()))
        fresh = await client.post(CHAT, json=body, headers=keyed(key))
        assert fresh.status_code == 200
        assert not replayed(fresh)
        assert fresh.json()["sluice"]["request_id"] != first.json()["sluice"]["request_id"]
        # Expired, the key can carry another body too.
        other = await client.post(CHAT, json=chat(uid()), headers=keyed(uid()))
        assert other.status_code == 200
    assert await idem_stack.sim_count(sim_id) == 2


# --- failed first requests --------------------------------------------------------------


async def test_an_upstream_error_is_stored_and_replayed(idem_stack: FullStack) -> None:
    async with idem_stack.client() as client:
        for fault, statuses in (("context_length", {400}), ("503", {502, 503})):
            sim_id, key = uid(), uid()
            body = chat(sim_id, fault=fault)
            first = await client.post(CHAT, json=body, headers=keyed(key))
            assert first.status_code in statuses, first.text
            problem(first)
            calls = await idem_stack.sim_count(sim_id)
            assert calls >= 1
            again = await client.post(CHAT, json=body, headers=keyed(key))
            assert again.status_code == first.status_code
            assert replayed(again)
            assert again.content == first.content
            assert await idem_stack.sim_count(sim_id) == calls


async def test_a_stream_that_failed_upstream_is_replayed(idem_stack: FullStack) -> None:
    sim_id, key = uid(), uid()
    body = chat(sim_id, stream=True, fault="context_length")
    async with idem_stack.client() as client:
        first = await client.post(CHAT, json=body, headers=keyed(key))
        assert first.status_code == 400, first.text
        again = await client.post(CHAT, json=body, headers=keyed(key))
        assert again.status_code == 400 and replayed(again)
        assert again.content == first.content
    assert await idem_stack.sim_count(sim_id) == 1


async def test_a_request_refused_before_it_ran_releases_the_key(idem_stack: FullStack) -> None:
    async with idem_stack.client() as client:
        # An invalid body, then the corrected one under the same key: it runs.
        sim_id, key = uid(), uid()
        bad = {k: v for k, v in chat(sim_id).items() if k != "messages"}
        refused = await client.post(CHAT, json=bad, headers=keyed(key))
        assert refused.status_code == 400
        fixed = await client.post(CHAT, json=chat(sim_id), headers=keyed(key))
        assert fixed.status_code == 200, fixed.text
        assert not replayed(fixed)

        # An unknown model, likewise.
        key = uid()
        unknown = await client.post(
            CHAT, json={**chat(sim_id), "model": "no-such-model"}, headers=keyed(key)
        )
        assert unknown.status_code == 404
        ok = await client.post(CHAT, json=chat(sim_id), headers=keyed(key))
        assert ok.status_code == 200 and not replayed(ok)
    assert await idem_stack.sim_count(sim_id) == 2


async def test_a_rate_limited_request_releases_the_key(idem_stack: FullStack) -> None:
    secret, _ = await new_team_key(idem_stack, requests_per_minute=1)
    key = uid()
    async with idem_stack.client(secret) as client:
        assert (await client.post(CHAT, json=chat(uid()))).status_code == 200
        limited = await client.post(CHAT, json=chat(uid()), headers=keyed(key))
        assert limited.status_code == 429, limited.text
        assert problem(limited)["code"] == "rate_limited"
        # Had the key been kept, another body would be 422 and the same one a replay.
        other = await client.post(CHAT, json=chat(uid()), headers=keyed(key))
        assert other.status_code == 429, other.text
        assert not replayed(other)


async def test_a_client_that_gives_up_gets_the_first_result_on_retry(
    idem_stack: FullStack,
) -> None:
    sim_id, key = uid(), uid()
    body = chat(sim_id, **SLOW)
    async with idem_stack.client(timeout=0.5) as impatient:
        with pytest.raises(httpx.TimeoutException):
            await impatient.post(CHAT, json=body, headers=keyed(key))
    async with idem_stack.client() as client:
        statuses: list[int] = []

        async def settled() -> httpx.Response | None:
            resp = await client.post(CHAT, json=body, headers=keyed(key))
            statuses.append(resp.status_code)
            assert resp.status_code in (200, 409), resp.text
            return resp if resp.status_code == 200 else None

        result = await wait_for(settled, timeout=15, interval=0.2, what="the first result")
    assert statuses[0] == 409
    assert replayed(result)
    assert result.json()["object"] == "chat.completion"
    assert await idem_stack.sim_count(sim_id) == 1


async def leave_a_stream(
    stack: FullStack, body: dict[str, Any], headers: dict[str, str], events: int
) -> None:
    """Opens the stream, reads ``events`` data events and hangs up."""
    async with (
        stack.client() as client,
        client.stream("POST", CHAT, json=body, headers=headers) as resp,
    ):
        assert resp.status_code == 200
        seen = 0
        async for chunk in resp.aiter_raw():
            seen += chunk.count(b"data: ")
            if seen >= events:
                break


async def test_a_stream_left_midway_is_replayed_whole_on_retry(idem_stack: FullStack) -> None:
    """The generation goes on without its client (the default disconnect policy): the
    retry gets 409 while it runs, then the whole stream, never a second run."""
    sim_id, key = uid(), uid()
    body = chat(sim_id, stream=True, **SLOW)
    await leave_a_stream(idem_stack, body, keyed(key), 3)
    async with idem_stack.client() as client:
        busy = await client.post(CHAT, json=body, headers=keyed(key))
        assert busy.status_code == 409, busy.text

        async def whole() -> bytes | None:
            resp, raw = await sse(client, body, keyed(key))
            assert resp.status_code in (200, 409), raw
            return raw if resp.status_code == 200 and replayed(resp) else None

        raw = await wait_for(whole, timeout=15, interval=0.2, what="the replay")
    events = sse_events(raw)
    assert events[-1] == ("", "[DONE]")
    text = "".join(
        choice["delta"].get("content") or ""
        for _, data in events
        if isinstance(data, dict)
        for choice in data["choices"]
    )
    assert len(text.split()) == 30
    assert await idem_stack.sim_count(sim_id) == 1


async def test_a_stream_cancelled_by_its_leaving_client_releases_the_key(
    idem_stack: FullStack,
) -> None:
    """With ``x-sluice-on-disconnect: cancel`` the generation stops when the client
    leaves: nothing to replay, so the retry runs it again."""
    sim_id, key = uid(), uid()
    body = chat(sim_id, stream=True, **SLOW)
    headers = keyed(key, **{"x-sluice-on-disconnect": "cancel"})
    await leave_a_stream(idem_stack, body, headers, 3)
    async with idem_stack.client() as client:

        async def rerun() -> httpx.Response | None:
            resp = await client.post(CHAT, json=body, headers=headers)
            assert resp.status_code in (200, 409), resp.text
            return resp if resp.status_code == 200 else None

        # Well before the key would expire anyway.
        again = await wait_for(
            rerun, timeout=TTL_SECONDS - 2, interval=0.2, what="the key to be free"
        )
    assert not replayed(again)
    assert await idem_stack.sim_count(sim_id) == 2


# --- jobs ---------------------------------------------------------------------------------


async def test_a_job_submission_is_idempotent(idem_stack: FullStack) -> None:
    sim_id, key = uid(), uid()
    spec = {"request": chat(sim_id)}
    async with idem_stack.client() as client:
        first = await client.post(JOBS, json=spec, headers=keyed(key))
        assert first.status_code == 202, first.text
        again = await client.post(JOBS, json=spec, headers=keyed(key))
        assert again.status_code == 202 and replayed(again)
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["location"] == first.headers["location"]

        async def done() -> dict[str, Any] | None:
            job: dict[str, Any] = (await client.get(first.headers["location"])).json()
            return job if job["status"] == "completed" else None

        await wait_for(done, timeout=15, what="the job to complete")
        # Prefer: respond-async on the chat route is a job too.
        async_key = uid()
        prefer = keyed(async_key, Prefer="respond-async")
        one = await client.post(CHAT, json=chat(sim_id), headers=prefer)
        two = await client.post(CHAT, json=chat(sim_id), headers=prefer)
        assert one.status_code == two.status_code == 202
        assert replayed(two) and two.json()["id"] == one.json()["id"]
        await wait_for(lambda: _at_least(idem_stack, sim_id, 2), timeout=15, what="job 2")
    assert await idem_stack.sim_count(sim_id) == 2


async def test_a_client_that_leaves_a_waited_job_gets_the_same_job_on_retry(
    idem_stack: FullStack,
) -> None:
    """Prefer: wait holds the request; the client gives up before the job ends. Retries
    with the same key answer with that job (or 409 while it is being answered), never
    a second one."""
    sim_id, key = uid(), uid()
    spec = {"request": chat(sim_id, **SLOW)}
    async with idem_stack.client(timeout=0.5) as impatient:
        with pytest.raises(httpx.TimeoutException):
            await impatient.post(JOBS, json=spec, headers=keyed(key, Prefer="wait=10"))
    async with idem_stack.client() as client:
        job_ids: set[str] = set()

        async def answered() -> bool:
            resp = await client.post(JOBS, json=spec, headers=keyed(key))
            assert resp.status_code in (200, 202, 409), resp.text
            if resp.status_code != 409:
                job_ids.add(resp.headers["x-sluice-job-id"])
            return len(job_ids) > 0

        await wait_for(answered, timeout=15, interval=0.2, what="an answer with the job")
        (job_id,) = job_ids

        async def done() -> bool:
            job = (await client.get(f"{JOBS}/{job_id}")).json()
            return bool(job["status"] == "completed")

        await wait_for(done, timeout=15, what="the job to complete")
        again = await client.post(JOBS, json=spec, headers=keyed(key))
        assert again.headers["x-sluice-job-id"] == job_id
    assert await idem_stack.sim_count(sim_id) == 1


async def _at_least(stack: FullStack, sim_id: str, count: int) -> bool:
    return await stack.sim_count(sim_id) >= count


async def test_a_job_that_failed_while_waited_for_is_replayed(idem_stack: FullStack) -> None:
    """``Prefer: wait`` and the job fails in time: its error is the answer, and the job
    exists, so a retry replays it rather than submitting another."""
    sim_id, key = uid(), uid()
    spec = {"request": chat(sim_id, fault="context_length")}
    headers = keyed(key, Prefer="wait=10")
    async with idem_stack.client() as client:
        first = await client.post(JOBS, json=spec, headers=headers)
        assert first.status_code == 400, first.text
        assert problem(first)["code"] == "context_length_exceeded"
        job_id = first.headers["x-sluice-job-id"]
        again = await client.post(JOBS, json=spec, headers=headers)
        assert again.status_code == 400 and replayed(again)
        assert again.headers["x-sluice-job-id"] == job_id
        assert again.content == first.content
    assert await idem_stack.sim_count(sim_id) == 1


# --- malformed keys -----------------------------------------------------------------------

BAD_KEYS: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("too long", b"k" * 256),
    ("tab inside", b"a\tb"),
    ("not ascii", "caf\u00e9".encode()),
    ("bad structured string", b'"a"b"'),
    ("bad escape", b'"a\\x"'),
]


@pytest.mark.parametrize("path", [CHAT, JOBS])
async def test_a_malformed_key_is_a_400_problem(idem_stack: FullStack, path: str) -> None:
    sim_id = uid()
    body = chat(sim_id) if path == CHAT else {"request": chat(sim_id)}
    async with idem_stack.client() as client:
        for name, value in BAD_KEYS:
            resp = await client.post(path, json=body, headers={b"Idempotency-Key": value})
            assert resp.status_code == 400, (name, resp.status_code, resp.text)
            err = problem(resp)
            assert err["code"] == "invalid_request", name
            assert err["error"]["param"] == "Idempotency-Key", name
        longest = await client.post(path, json=body, headers=keyed(uid() + "k" * 223))
        assert longest.status_code in (200, 202), longest.text
    await asyncio.sleep(0.3)
    assert await idem_stack.sim_count(sim_id) <= 1
