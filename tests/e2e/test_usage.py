"""``GET /v1/usage`` and ``POST /v1/estimate`` on the whole product (real processes, the
SQLite ledger): who may read what, the groupings and their exact amounts, tags and end
users carried from the request to the ledger, what a cache hit saved, and the problem
for every bad input."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from sluice.bus import Bus
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.errors import CATALOGUE, ErrorCode
from sluice.keys.v1 import keys_pb2
from sluice.pricing import PriceTable
from sluice.topology import Buckets, Subjects

from tests.e2e.conftest import DEV_KEY, RunningStack
from tests.support.stack import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRICES = PriceTable.load(REPO / "config" / "prices.yaml")
SECRET_PROMPT = "usage-secret-prompt-7f3a"


async def add_key(e2e: RunningStack, *, team_id: str, scopes: list[str]) -> str:
    """A key written into the key bucket as the gateway reads it; its secret."""
    secret = "sk-sluice-usage-" + secrets.token_hex(12)
    digest = hashlib.sha256(secret.encode()).hexdigest()
    bus = await Bus.connect(e2e.nats.url, "tests-usage-keys")
    try:
        kv = await bus.kv(Buckets.API_KEYS)
        record = keys_pb2.ApiKeyRecord(
            key_id="key-" + secrets.token_hex(4),
            secret_sha256=digest,
            team_id=team_id,
            name="usage test",
            scopes=scopes,
            created_unix=int(time.time()),
        )
        await kv.put(digest, record.SerializeToString())
    finally:
        await bus.close()
    return secret


async def publish(e2e: RunningStack, events: list[cost_pb2.UsageEvent]) -> None:
    bus = await Bus.connect(e2e.nats.url, "tests-usage-publish")
    try:
        for event in events:
            await bus.js.publish(
                Subjects.usage(event.key_id),
                event.SerializeToString(),
                headers={"Nats-Msg-Id": event.request_id},
            )
    finally:
        await bus.close()


def event(key_id: str, team_id: str, **kw: Any) -> cost_pb2.UsageEvent:
    return cost_pb2.UsageEvent(
        request_id="req-" + secrets.token_hex(8),
        key_id=key_id,
        team_id=team_id,
        model_requested="sim-fast",
        model_served="sim-fast",
        provider="simulator",
        usage=chat_pb2.Usage(
            input_tokens=kw.pop("input_tokens", 1000), output_tokens=kw.pop("output_tokens", 100)
        ),
        occurred_unix_nanos=time.time_ns(),
        outcome="completed",
        **kw,
    )


def client(e2e: RunningStack, key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=e2e.gateway_url, headers=headers, timeout=30)


async def usage_when(
    http: httpx.AsyncClient, params: dict[str, str], requests: int
) -> dict[str, Any]:
    """The usage report once ``requests`` requests are in it (the ledger is fed
    asynchronously, in batches)."""
    deadline = time.monotonic() + 20
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        reply = await http.get("/v1/usage", params=params)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        if body["totals"]["requests"] >= requests:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"usage never reached {requests} requests: {body}")


def assert_problem(reply: httpx.Response, status: int, code: str, param: str | None = None):
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/problem+json")
    problem = reply.json()
    assert problem["code"] == code
    # The detail ends with how to fix it (the catalogue's fix text).
    assert problem["detail"].endswith(CATALOGUE[ErrorCode(code)].fix)
    assert re.fullmatch(r"[0-9a-f]{32}", problem["trace_id"])
    if param is not None:
        assert problem["error"]["param"] == param, problem
    assert "Traceback" not in reply.text and SECRET_PROMPT not in reply.text
    return problem


async def test_usage_and_estimate_ask_for_a_key(e2e: RunningStack) -> None:
    async with client(e2e, None) as http:
        assert_problem(await http.get("/v1/usage"), 401, "unauthorized")
        body = {"model": "sim-fast", "messages": [{"role": "user", "content": SECRET_PROMPT}]}
        assert_problem(await http.post("/v1/estimate", json=body), 401, "unauthorized")
    async with client(e2e, "sk-not-a-key") as http:
        assert_problem(await http.get("/v1/usage"), 401, "unauthorized")


async def test_a_team_reads_its_own_usage_and_only_an_admin_reads_others(
    e2e: RunningStack,
) -> None:
    team_a, team_b = "team-a-" + secrets.token_hex(4), "team-b-" + secrets.token_hex(4)
    key_a = await add_key(e2e, team_id=team_a, scopes=["chat"])
    # usage:read on a team's own key reads that team only; on an operators' key, all.
    reader_a = await add_key(e2e, team_id=team_a, scopes=["usage:read"])
    admin = await add_key(e2e, team_id="admin", scopes=["usage:read"])
    events = [
        event("ka-" + team_a, team_a, input_tokens=1000, output_tokens=100),
        event("ka-" + team_a, team_a, input_tokens=2000, output_tokens=10),
        event("kb-" + team_b, team_b, input_tokens=5000, output_tokens=500),
    ]
    await publish(e2e, events)
    cost = [PRICES.price("sim-fast", e.usage).total_nanos for e in events]

    async with client(e2e, admin) as http:
        both = await usage_when(http, {"group_by": "team", "team_id": team_b}, 1)
        assert [row["team_id"] for row in both["data"]] == [team_b]
        assert both["totals"]["cost_usd_nanos"] == cost[2]
    async with client(e2e, key_a) as http:
        mine = await usage_when(http, {"group_by": "team,key"}, 2)
        # Every row is the caller's team; the other team's key is nowhere.
        assert {row["team_id"] for row in mine["data"]} == {team_a}
        assert mine["team_id"] == team_a
        assert mine["totals"]["cost_usd_nanos"] == cost[0] + cost[1]
        assert mine["totals"]["cost_usd"] == str((cost[0] + cost[1]) / 1e9).rstrip("0")
        # Another team, asked by name or through its key: 403, or nothing of it.
        problem = assert_problem(
            await http.get("/v1/usage", params={"team_id": team_b}), 403, "forbidden", "team_id"
        )
        assert "usage:read" in problem["detail"]
        theirs = await http.get("/v1/usage", params={"key_id": "kb-" + team_b})
        assert theirs.status_code == 200 and theirs.json()["totals"]["requests"] == 0
        assert theirs.json()["data"] == []
    async with client(e2e, reader_a) as http:
        assert_problem(
            await http.get("/v1/usage", params={"team_id": team_b}), 403, "forbidden", "team_id"
        )
        everything = await http.get("/v1/usage", params={"group_by": "team"})
        assert {row["team_id"] for row in everything.json()["data"]} == {team_a}
    async with client(e2e, DEV_KEY) as http:  # "*", but of the dev team
        assert_problem(
            await http.get("/v1/usage", params={"team_id": team_b}), 403, "forbidden", "team_id"
        )


async def test_tags_and_end_users_go_from_the_request_to_grouped_exact_usage(
    client: httpx.AsyncClient,
) -> None:
    tag = "run-" + secrets.token_hex(4)
    answers = []
    for user, tags_header, meta_tags in (
        ("alice", f"{tag},web", None),
        ("bob", tag, f"{tag}, batch"),
        ("alice", None, tag),
    ):
        body: dict[str, Any] = {
            "model": "sim-fast",
            "messages": [{"role": "user", "content": f"tagged {secrets.token_hex(4)}"}],
            "max_tokens": 12,
            "user": user,
        }
        if meta_tags:
            body["metadata"] = {"tags": meta_tags}
        headers = {"x-sluice-tags": tags_header} if tags_header else {}
        reply = await client.post("/v1/chat/completions", json=body, headers=headers)
        assert reply.status_code == 200, reply.text
        answers.append(reply.json())
    cost = [
        PRICES.price(
            "sim-fast",
            chat_pb2.Usage(
                input_tokens=a["usage"]["prompt_tokens"],
                output_tokens=a["usage"]["completion_tokens"],
            ),
        ).total_nanos
        for a in answers
    ]
    report = await usage_when(client, {"tag": tag, "group_by": "end_user,tag"}, 3)
    rows = {(r["end_user"], r["tag"]): r for r in report["data"]}
    assert {k: (r["requests"], r["cost_usd_nanos"]) for k, r in rows.items()} == {
        ("alice", tag): (2, cost[0] + cost[2]),
        ("alice", "web"): (1, cost[0]),
        ("bob", tag): (1, cost[1]),
        ("bob", "batch"): (1, cost[1]),
    }
    assert report["totals"]["cost_usd_nanos"] == sum(cost)
    by_day = await usage_when(client, {"tag": tag, "group_by": "day,model,provider"}, 3)
    (row,) = by_day["data"]
    assert row["day"] == time.strftime("%Y-%m-%d", time.gmtime())
    assert (row["model"], row["provider"], row["requests"]) == ("sim-fast", "simulator", 3)
    bad = await client.post(
        "/v1/chat/completions",
        json={"model": "sim-fast", "messages": [{"role": "user", "content": SECRET_PROMPT}]},
        headers={"x-sluice-tags": "ok, not ok!"},
    )
    assert_problem(bad, 400, "invalid_request", "x-sluice-tags")


async def test_a_cache_hit_records_what_its_answer_cost_when_it_was_made(
    client: httpx.AsyncClient,
) -> None:
    tag = "cache-" + secrets.token_hex(4)
    body = {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": f"save me {secrets.token_hex(4)}"}],
        "temperature": 0,
        "max_tokens": 16,
    }
    headers = {"x-sluice-tags": tag}
    first = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert first.status_code == 200 and first.headers["x-sluice-cache"] == "miss"
    for _ in range(40):  # the store is asynchronous
        second = await client.post("/v1/chat/completions", json=body, headers=headers)
        if second.headers["x-sluice-cache"] == "hit":
            break
        await asyncio.sleep(0.1)
    assert second.headers["x-sluice-cache"] == "hit"
    usage = first.json()["usage"]
    made = PRICES.price(
        "sim-fast",
        chat_pb2.Usage(
            input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"]
        ),
    ).total_nanos
    report = await usage_when(client, {"tag": tag, "group_by": "tag"}, 2)
    totals = report["totals"]
    assert totals["cache_hits"] == 1
    # The hit cost nothing and saved exactly what the answer cost when it was made.
    assert totals["cost_usd_nanos"] == made
    assert totals["saved_usd_nanos"] == made > 0


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"group_by": "key,bogus"}, "group_by"),
        ({"group_by": "day,hour"}, "group_by"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-02-01", "until": "2026-01-01"}, "since"),
        ({"limit": "0"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"colour": "blue"}, "colour"),
    ],
)
async def test_bad_usage_parameters_are_a_400_naming_them(
    client: httpx.AsyncClient, params: dict[str, str], param: str
) -> None:
    assert_problem(await client.get("/v1/usage", params=params), 400, "invalid_request", param)


async def test_estimate_counts_the_prompt_and_prices_the_range_exactly(
    client: httpx.AsyncClient,
) -> None:
    body = {
        "model": "sim-fast",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "How many tokens is this prompt, exactly?"},
        ],
        "max_tokens": 300,
    }
    reply = await client.post("/v1/estimate", json=body)
    assert reply.status_code == 200, reply.text
    estimate = reply.json()
    # The same request through the provider reports the same prompt tokens (the
    # simulator counts with the same tokenizer).
    ran = await client.post("/v1/chat/completions", json={**body, "max_tokens": 5})
    assert estimate["input_tokens"] == ran.json()["usage"]["prompt_tokens"]
    assert estimate["output_tokens"] == {"min": 1, "max": 300}
    low = PRICES.price(
        "sim-fast", chat_pb2.Usage(input_tokens=estimate["input_tokens"], output_tokens=1)
    ).total_nanos
    high = PRICES.price(
        "sim-fast", chat_pb2.Usage(input_tokens=estimate["input_tokens"], output_tokens=300)
    ).total_nanos
    assert estimate["cost_usd_nanos"] == {"min": low, "max": high}
    assert estimate["priced"] and estimate["price_version"] == PRICES.version
    # Without max_tokens the range runs to what the gateway reserves.
    unbounded = (await client.post("/v1/estimate", json={**body, "max_tokens": None})).json()
    assert unbounded["output_tokens"]["max"] == 1024

    assert_problem(
        await client.post("/v1/estimate", json={**body, "model": "no-such-model"}),
        404,
        "model_not_found",
        "model",
    )
    assert_problem(
        await client.post("/v1/estimate", json={**body, "max_tokens": 10_000_000}),
        400,
        "context_length_exceeded",
        "max_tokens",
    )
    assert_problem(
        await client.post("/v1/estimate", json={"model": "sim-fast", "messages": SECRET_PROMPT}),
        400,
        "invalid_request",
    )
    assert_problem(
        await client.post(
            "/v1/estimate", content=b'{"model": ', headers={"content-type": "application/json"}
        ),
        400,
        "invalid_json",
    )


async def test_usage_routes_are_documented_traced_and_counted(
    e2e: RunningStack, client: httpx.AsyncClient
) -> None:
    spec = (await client.get("/docs/openapi.json")).json()
    assert "get" in spec["paths"]["/v1/usage"]
    assert "post" in spec["paths"]["/v1/estimate"]
    reply = await client.get("/v1/usage", params={"group_by": "model", "model": "none-such"})
    assert reply.status_code == 200
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", reply.headers["traceparent"])
    estimate = await client.post("/v1/estimate", json={"model": "sim-fast"})
    assert estimate.status_code == 400
    metrics = (await client.get("/metrics")).text
    counted = re.findall(r"sluice_requests_total\{([^}]*)\}", metrics)
    assert any('route="/v1/usage"' in labels and 'status="200"' in labels for labels in counted)
    assert any('route="/v1/estimate"' in labels and 'status="400"' in labels for labels in counted)


def sluice_usage(e2e: RunningStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice.devtools.cli", "usage", "--url", e2e.gateway_url, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_sluice_usage_prints_the_report(e2e: RunningStack, client: httpx.AsyncClient) -> None:
    tag = "cli-" + secrets.token_hex(4)
    events = [event("dev", "dev", tags=[tag], end_user="carol") for _ in range(2)]
    await publish(e2e, events)
    report = await usage_when(client, {"tag": tag, "group_by": "tag,end_user"}, 2)
    cost = report["totals"]["cost_usd"]

    table = await asyncio.to_thread(
        sluice_usage, e2e, "--key", DEV_KEY, "--group-by", "tag,end_user", "--tag", tag
    )
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["tag", "end_user", "requests"]
    (row,) = [line for line in lines if line.startswith(tag)]
    assert row.split()[:3] == [tag, "carol", "2"] and cost in row.split()
    assert lines[-1].startswith("team dev, ")

    as_json = await asyncio.to_thread(
        sluice_usage,
        e2e,
        "--key",
        DEV_KEY,
        "--all-time",
        "--group-by",
        "tag",
        "--tag",
        tag,
        "--json",
    )
    assert as_json.returncode == 0, as_json.stderr
    answer = json.loads(as_json.stdout)
    assert answer["since"] is None and answer["totals"] == report["totals"]
    assert answer["team_id"] == "dev"

    refused = await asyncio.to_thread(sluice_usage, e2e, "--key", "sk-wrong")
    assert refused.returncode == 1 and "401 unauthorized" in refused.stderr
    bad = await asyncio.to_thread(sluice_usage, e2e, "--key", DEV_KEY, "--group-by", "colour")
    assert bad.returncode == 1 and "400 invalid_request" in bad.stderr
