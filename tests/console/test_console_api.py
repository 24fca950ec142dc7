"""The console's JSON endpoints on the real stack: each asks for credentials, answers
problem+json, is in the OpenAPI document, and shows a team nothing of another's."""

from __future__ import annotations

import asyncio
import re
import uuid

import pytest

from tests.console.conftest import ADMIN_KEY, ConsoleStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NEW_PATHS = (
    "/v1/me",
    "/v1/traces/{trace_id}",
    "/v1/cache",
    "/v1/cache/invalidate",
    "/v1/providers",
)


async def _team_key(stack: ConsoleStack, team: str, **extra: object) -> str:
    async with stack.client(ADMIN_KEY) as admin:
        r = await admin.post("/v1/admin/teams", json={"team_id": team, "name": team})
        assert r.status_code in (201, 409), r.text
        r = await admin.post(
            "/v1/admin/keys",
            json={
                "team_id": team,
                "name": f"k-{uuid.uuid4().hex[:6]}",
                "scopes": ["chat", "jobs"],
                **extra,
            },
        )
        assert r.status_code == 201, r.text
        return str(r.json()["secret"])


def _chat(prompt: str) -> dict[str, object]:
    return {
        "model": "sim-fast",
        "temperature": 0,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": prompt}],
    }


async def test_every_new_endpoint_asks_for_credentials(console_stack: ConsoleStack) -> None:
    async with console_stack.client("") as anon:
        for method, path in (
            ("GET", "/v1/me"),
            ("GET", "/v1/traces/" + "0" * 32),
            ("GET", "/v1/cache"),
            ("POST", "/v1/cache/invalidate"),
            ("GET", "/v1/providers"),
        ):
            r = await anon.request(method, path, json={} if method == "POST" else None)
            assert r.status_code == 401, (path, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == "unauthorized"
        spec = (await anon.get("/docs/openapi.json")).json()
        for path in NEW_PATHS:
            assert path in spec["paths"], path
        assert not any(p.startswith("/console") for p in spec["paths"])


async def test_a_team_reads_its_own_trace_and_never_another_teams(
    console_stack: ConsoleStack,
) -> None:
    alpha = await _team_key(console_stack, "alpha-api")
    beta = await _team_key(console_stack, "beta-api")
    async with console_stack.client(alpha) as a, console_stack.client(beta) as b:
        r = await a.post("/v1/chat/completions", json=_chat("trace me " + uuid.uuid4().hex))
        assert r.status_code == 200, r.text
        trace_id = r.headers["traceparent"].split("-")[1]
        # Spans reach their files within a flush interval: wait until the trace is there.
        for _ in range(100):
            mine = await a.get(f"/v1/traces/{trace_id}")
            if mine.status_code == 200 and "inference-worker" in mine.json()["services"]:
                break
            await asyncio.sleep(0.1)
        assert mine.status_code == 200, mine.text
        tree = mine.json()
        assert tree["trace_id"] == trace_id and tree["span_count"] >= 3
        assert tree["spans"][0]["service"] == "gateway"
        theirs = await b.get(f"/v1/traces/{trace_id}")
        assert theirs.status_code == 404
        assert theirs.json()["code"] == "not_found"
        bad = await a.get("/v1/traces/not-a-trace")
        assert bad.status_code == 400 and bad.json()["code"] == "invalid_request"
        async with console_stack.client(ADMIN_KEY) as admin:
            assert (await admin.get(f"/v1/traces/{trace_id}")).status_code == 200


async def test_cache_counters_are_for_operators_and_invalidation_stays_in_the_team(
    console_stack: ConsoleStack,
) -> None:
    alpha = await _team_key(console_stack, "alpha-cache")
    beta = await _team_key(console_stack, "beta-cache")
    body = _chat("cache me " + uuid.uuid4().hex)
    async with console_stack.client(alpha) as a, console_stack.client(beta) as b:
        assert (await a.post("/v1/chat/completions", json=body)).status_code == 200
        for _ in range(100):  # the worker stores the answer after replying
            again = await a.post("/v1/chat/completions", json=body)
            if again.headers["x-sluice-cache"] == "hit":
                break
            await asyncio.sleep(0.05)
        assert again.headers["x-sluice-cache"] == "hit"

        forbidden = await b.get("/v1/cache")
        assert forbidden.status_code == 403 and forbidden.json()["code"] == "forbidden"
        all_of_it = await b.post("/v1/cache/invalidate", json={"all": True})
        assert all_of_it.status_code == 403
        # Beta names the same request: its key is beta's, alpha's entry stays.
        other = await b.post("/v1/cache/invalidate", json={"request": body})
        assert other.status_code == 200 and other.json()["removed"] == 0
        assert (await a.post("/v1/chat/completions", json=body)).headers["x-sluice-cache"] == "hit"

        neither = await a.post("/v1/cache/invalidate", json={})
        assert neither.status_code == 400
        assert neither.headers["content-type"].startswith("application/problem+json")
        removed = await a.post("/v1/cache/invalidate", json={"request": body})
        assert removed.status_code == 200 and removed.json() == {
            "object": "cache.invalidation",
            "scope": "request",
            "removed": 1,
        }
        assert (await a.post("/v1/chat/completions", json=body)).headers["x-sluice-cache"] == "miss"

    async with console_stack.client(ADMIN_KEY) as admin:
        stats = (await admin.get("/v1/cache")).json()
        assert stats["lookups"] >= 4 and stats["hits"] >= 2
        assert stats["exact_hits"] == stats["hits"] - stats["semantic_hits"]


async def test_me_and_providers_follow_the_key(console_stack: ConsoleStack) -> None:
    narrow = await _team_key(
        console_stack, "alpha-me", model_allow=["sim-fast"], budgets={"usd_per_day": "2.5"}
    )
    async with console_stack.client(narrow) as c:
        me = (await c.get("/v1/me")).json()
        assert me["team_id"] == "alpha-me" and me["operator"] is False
        assert me["budgets"]["key"]["usd_per_day"] == "2.5"
        assert me["budgets_usd_nanos"]["key"]["day"] == 2_500_000_000
        assert (await c.post("/v1/chat/completions", json=_chat("calls"))).status_code == 200
        for _ in range(100):
            providers = (await c.get("/v1/providers")).json()
            recent = providers["data"][0]["steps"][0]["deployments"][0]["recent"]
            if recent:
                break
            await asyncio.sleep(0.1)
        assert [r["route"] for r in providers["data"]] == ["sim-fast"]
        deployment = providers["data"][0]["steps"][0]["deployments"][0]
        assert deployment["breaker"]["state"] == "closed"
        assert recent["calls"] >= 1 and recent["error_rate"] == 0.0
        assert recent["latency_ms_p50"] > 0


async def test_pages_and_assets_are_served_with_cache_headers(console_stack: ConsoleStack) -> None:
    async with console_stack.client("") as anon:
        page = await anon.get("/console/playground")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["cache-control"] == "no-cache"
        assets = re.findall(r"(/console/static/[a-z]+\.(?:js|css)\?v=[0-9a-f]{16})", page.text)
        assert len(assets) >= 3
        for url in assets:
            asset = await anon.get(url)
            assert asset.status_code == 200
            assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
            kind = "javascript" if url.split("?")[0].endswith(".js") else "css"
            assert asset.headers["content-type"] == f"text/{kind}; charset=utf-8"
        # The page's module imports the shared module by the URL the page preloads.
        module = (await anon.get(next(u for u in assets if "playground" in u))).text
        shared = next(u for u in assets if "/console.js" in u)
        assert f'from "{shared}"' in module
        stale = await anon.get("/console/static/console.js?v=0000000000000000")
        assert stale.headers["cache-control"] == "no-cache"
        again = await anon.get(
            "/console/static/console.js", headers={"if-none-match": stale.headers["etag"]}
        )
        assert again.status_code == 304 and not again.content
        missing = await anon.get("/console/nothing-here")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")
