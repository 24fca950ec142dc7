"""The admin API, scopes, model allow-lists, expiry, rotation, revocation, the audit
trail and JWT callers, through the real gateway app on a test NATS (the limiter, cache
and worker scripted by the harness)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sluice.devtools.embedded import free_port
from sluice.topology import Buckets

from services.gateway.settings import JwtIssuer
from tests.gateway.harness import Gateway, build_gateway

CHAT = {"model": "sim-fast", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def gw(bus, tmp_path):
    gateway = await build_gateway(bus, tmp_path)
    yield gateway
    await gateway.close()
    await gateway.parts.api.keys.keys.stop()  # type: ignore[attr-defined]


def admin(gw: Gateway, tmp_path: Path) -> httpx.AsyncClient:
    secret = (tmp_path / "admin-key").read_text().strip()
    return gw.http(authorization=f"Bearer {secret}")


def new_team() -> str:
    return "t-" + secrets.token_hex(4)


async def make_team(http: httpx.AsyncClient, **body: Any) -> str:
    team = body.pop("team_id", new_team())
    r = await http.post("/v1/admin/teams/", json={"team_id": team, **body})
    assert r.status_code == 201, r.text
    return team


async def make_key(http: httpx.AsyncClient, team: str, **body: Any) -> dict[str, Any]:
    r = await http.post(
        "/v1/admin/keys/", json={"team_id": team, "name": "k-" + secrets.token_hex(3), **body}
    )
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def as_key(gw: Gateway, secret: str) -> httpx.AsyncClient:
    return gw.http(authorization=f"Bearer {secret}")


def problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["code"] == code and body["trace_id"]
    return body


async def test_admin_routes_ask_for_credentials_and_the_admin_scope(gw, tmp_path) -> None:
    async with gw.http() as anon:
        for method, path in [
            ("GET", "/v1/admin/teams/"),
            ("POST", "/v1/admin/teams/"),
            ("GET", "/v1/admin/keys/"),
            ("POST", "/v1/admin/keys/key_x/revoke"),
            ("GET", "/v1/admin/audit/"),
        ]:
            problem(await anon.request(method, path, json={}), 401, "unauthorized")
    async with admin(gw, tmp_path) as ops:
        team = await make_team(ops, tier="free")
        chat_key = await make_key(ops, team, scopes=["chat"])
    async with as_key(gw, chat_key["secret"]) as user:
        body = problem(await user.get("/v1/admin/keys/"), 403, "insufficient_scope")
        assert body["details"]["scope"] == "admin"
    # The harness key has every scope in its own team, but teams are the operators'.
    async with gw.authed() as other:
        problem(
            await other.post("/v1/admin/teams/", json={"team_id": new_team()}), 403, "forbidden"
        )


async def test_bad_input_is_refused_and_nothing_stored_changes(gw, tmp_path) -> None:
    async with admin(gw, tmp_path) as ops:
        team = await make_team(ops, tier="standard", budgets={"usd_per_month": "250.5"})
        problem(await ops.post("/v1/admin/teams/", json={"team_id": team}), 409, "conflict")
        body = problem(
            await ops.post("/v1/admin/teams/", json={"team_id": new_team(), "tier": "gold"}),
            400,
            "invalid_request",
        )
        assert body["error"]["param"] == "tier"
        before = (await ops.get(f"/v1/admin/teams/{team}")).json()
        body = problem(
            await ops.patch(f"/v1/admin/teams/{team}", json={"budgets": {"usd_per_day": -1}}),
            400,
            "invalid_request",
        )
        assert "budgets.usd_per_day" in body["error"]["param"]
        assert (await ops.get(f"/v1/admin/teams/{team}")).json() == before
        assert before["budgets"]["usd_per_month"] == "250.5"
        assert before["effective"]["limits"]["requests_per_minute"] == 600  # the tier's

        body = problem(
            await ops.post("/v1/admin/keys/", json={"team_id": "nope-team", "name": "x"}),
            400,
            "invalid_request",
        )
        assert body["error"]["param"] == "team_id" and "nope-team" in body["detail"]
        key = await make_key(ops, team)
        problem(
            await ops.post("/v1/admin/keys/", json={"team_id": team, "name": key["name"]}),
            409,
            "conflict",
        )
        listed = (await ops.get("/v1/admin/keys/", params={"team_id": team})).json()["data"]
        assert [k["key_id"] for k in listed] == [key["key_id"]]
        assert "secret" not in listed[0] and key["secret"] not in json.dumps(listed)
        problem(
            await ops.post(
                "/v1/admin/keys/", json={"team_id": team, "name": "s", "scopes": ["root"]}
            ),
            400,
            "invalid_request",
        )


async def test_scopes_models_and_the_levels_on_the_reservation(gw, tmp_path) -> None:
    async with admin(gw, tmp_path) as ops:
        team = await make_team(
            ops,
            tier="free",
            limits={"requests_per_minute": 30},
            end_user_limits={"requests_per_minute": 5},
        )
        key = await make_key(
            ops,
            team,
            scopes=["chat"],
            model_allow=["sim-*"],
            limits={"concurrent_requests": 2},
            budgets={"usd_per_day": "0.5"},
        )
    async with as_key(gw, key["secret"]) as user:
        r = await user.post("/v1/chat/completions", json={**CHAT, "user": "end-user-1"})
        assert r.status_code == 200, r.text
        reserve = gw.fake.reserves[-1]
        assert reserve.team_id == team and reserve.key_id == key["key_id"]
        assert reserve.team_limits.requests_per_minute == 30  # override over tier (60)
        assert reserve.team_limits.input_tokens_per_minute == 20000  # the tier's
        assert reserve.team_budgets.usd_nanos_per_day == 1_000_000_000
        assert reserve.key_limits.concurrent_requests == 2
        assert reserve.key_limits.requests_per_minute == 30  # the key falls back on its team
        assert reserve.key_budgets.usd_nanos_per_day == 500_000_000
        assert reserve.end_user == "end-user-1"
        assert reserve.end_user_limits.requests_per_minute == 5
        assert reserve.priority == "interactive"

        body = problem(
            await user.post("/v1/chat/completions", json={**CHAT, "model": "qwen2.5-coder-0.5b"}),
            403,
            "model_not_allowed",
        )
        assert "qwen2.5-coder-0.5b" in body["detail"]
        problem(await user.post("/v1/jobs", json={"request": CHAT}), 403, "insufficient_scope")
        problem(await user.get("/v1/jobs"), 403, "insufficient_scope")
        # The free tier offers interactive only.
        r = await user.post(
            "/v1/chat/completions", json=CHAT, headers={"x-sluice-priority": "batch"}
        )
        problem(r, 403, "forbidden")
        # The Anthropic door checks the same.
        r = await user.post(
            "/v1/messages",
            json={"model": "qwen2.5-coder-0.5b", "max_tokens": 5, "messages": CHAT["messages"]},
        )
        assert r.status_code == 403 and r.json()["code"] == "model_not_allowed"


async def test_expiry_rotation_and_revocation(gw, tmp_path) -> None:
    async with admin(gw, tmp_path) as ops:
        team = await make_team(ops, tier="enterprise")
        short = await make_key(ops, team, expires_in_seconds=1)
        old = await make_key(ops, team)
        doomed = await make_key(ops, team)
        async with as_key(gw, short["secret"]) as user:
            assert (await user.post("/v1/chat/completions", json=CHAT)).status_code == 200
            await asyncio.sleep(1.1)
            body = problem(await user.post("/v1/chat/completions", json=CHAT), 401, "key_expired")
            assert "expired" in body["detail"]

        r = await ops.post(f"/v1/admin/keys/{old['key_id']}/rotate", json={"grace_seconds": 2})
        assert r.status_code == 201, r.text
        new = r.json()
        assert new["secret"] != old["secret"] and new["name"] == old["name"]
        shown = (await ops.get(f"/v1/admin/keys/{old['key_id']}")).json()
        assert shown["status"] == "rotating" and shown["replaced_by"] == new["key_id"]
        async with as_key(gw, old["secret"]) as o, as_key(gw, new["secret"]) as n:
            assert (await o.post("/v1/chat/completions", json=CHAT)).status_code == 200
            assert (await n.post("/v1/chat/completions", json=CHAT)).status_code == 200
            await asyncio.sleep(2.1)
            body = problem(await o.post("/v1/chat/completions", json=CHAT), 401, "key_expired")
            assert new["key_id"] in json.dumps(body["details"])
            assert (await n.post("/v1/chat/completions", json=CHAT)).status_code == 200

        async with as_key(gw, doomed["secret"]) as d:
            assert (await d.get("/v1/models")).status_code == 200  # cached in memory now
            r = await ops.post(f"/v1/admin/keys/{doomed['key_id']}/revoke")
            assert r.json()["status"] == "revoked"
            body = problem(await d.get("/v1/models"), 401, "unauthorized")
            assert "revoked" in body["detail"]
        # The name is free again.
        await make_key(ops, team, name=doomed["name"])


async def test_one_team_never_reads_another_teams_keys_teams_or_audit(gw, tmp_path) -> None:
    async with admin(gw, tmp_path) as ops:
        team_a, team_b = await make_team(ops), await make_team(ops)
        admin_a = await make_key(ops, team_a, scopes=["admin", "chat"])
        key_b = await make_key(ops, team_b)
    async with as_key(gw, admin_a["secret"]) as a:
        problem(await a.get(f"/v1/admin/keys/{key_b['key_id']}"), 404, "not_found")
        problem(await a.post(f"/v1/admin/keys/{key_b['key_id']}/revoke"), 404, "not_found")
        problem(await a.get(f"/v1/admin/teams/{team_b}"), 404, "not_found")
        listed = (await a.get("/v1/admin/keys/", params={"team_id": team_b})).json()["data"]
        assert listed == []
        mine = (await a.get("/v1/admin/keys/")).json()["data"]
        assert {k["team_id"] for k in mine} == {team_a}
        assert [t["team_id"] for t in (await a.get("/v1/admin/teams/")).json()["data"]] == [team_a]
        page = (await a.get("/v1/admin/audit/", params={"team_id": team_b})).json()
        assert page["data"] == []
        own = (await a.get("/v1/admin/audit/")).json()["data"]
        assert own and {e["team_id"] for e in own} == {team_a}
        # A team's admin issues keys in its own team only.
        r = await a.post("/v1/admin/keys/", json={"team_id": team_b, "name": "x"})
        assert r.status_code == 400
        made = await make_key(a, team_a, scopes=["chat"])
        assert made["team_id"] == team_a
    async with admin(gw, tmp_path) as ops:
        r = await ops.get(f"/v1/admin/keys/{key_b['key_id']}")
        assert r.status_code == 200  # it exists: the 404 above was about who asked


async def test_the_audit_trail_has_admin_actions_and_requests(gw, tmp_path) -> None:
    async with admin(gw, tmp_path) as ops:
        team = await make_team(ops)
        quiet = await make_key(ops, team)
        loud = await make_key(ops, team, audit_prompts=True)
        await ops.post(f"/v1/admin/keys/{quiet['key_id']}/revoke")
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
        async with as_key(gw, loud["secret"]) as user:
            r = await user.post(
                "/v1/chat/completions",
                json={
                    "model": "sim-fast",
                    "messages": [{"role": "user", "content": "secret plan"}],
                },
            )
            assert r.status_code == 200
            problem(
                await user.post("/v1/chat/completions", json={**CHAT, "model": "nope"}),
                404,
                "model_not_found",
            )
        await asyncio.sleep(0.2)  # the records are core publishes the stream stores
        actions = (await ops.get("/v1/admin/audit/", params={"team_id": team})).json()["data"]
        names = [e["action"] for e in actions]
        assert names[:4] == ["team.create", "key.create", "key.create", "key.revoke"]
        assert actions[3]["target"] == quiet["key_id"] and actions[3]["actor"] == "admin"

        page = (
            await ops.get(
                "/v1/admin/audit/",
                params={"key_id": loud["key_id"], "action": "request", "since": since, "limit": 1},
            )
        ).json()
        first = page["data"][0]
        assert first["status"] == 200 and first["model"] == "sim-fast"
        assert first["usage"]["input_tokens"] == 12 and first["cost_usd_nanos"] == 420000
        assert "secret plan" in first["prompt"]
        second = (
            await ops.get(
                "/v1/admin/audit/",
                params={"key_id": loud["key_id"], "action": "request", "after": page["next_after"]},
            )
        ).json()
        assert [e["status"] for e in second["data"]] == [404]
        assert second["data"][0]["code"] == "model_not_found"
        problem(
            await ops.get("/v1/admin/audit/", params={"since": "yesterday"}), 400, "invalid_request"
        )
        problem(
            await ops.get("/v1/admin/audit/", params={"team_id": "a.>"}), 400, "invalid_request"
        )
    # Without audit_prompts a record carries no prompt.
    async with gw.authed() as harness_key:
        await harness_key.post("/v1/chat/completions", json=CHAT)
    await asyncio.sleep(0.2)
    async with admin(gw, tmp_path) as ops:
        records = (
            await ops.get(
                "/v1/admin/audit/", params={"key_id": gw.record.key_id, "action": "request"}
            )
        ).json()["data"]
        assert records and all("prompt" not in e for e in records)


# --- JWT -------------------------------------------------------------------------------


def _jwk(private: Any, kid: str) -> dict[str, Any]:
    public = json.loads(
        jwt.algorithms.get_default_algorithms()[
            "RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256"
        ].to_jwk(private.public_key())
    )
    public["kid"] = kid
    return public


@pytest.fixture
async def jwks_server():
    """A JWKS served over HTTP on loopback, as an identity provider serves it."""
    document: dict[str, Any] = {"keys": []}

    async def handler(_request: web.Request) -> web.Response:
        return web.json_response(document)

    app = web.Application()
    app.router.add_get("/jwks.json", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield f"http://127.0.0.1:{port}/jwks.json", document
    await runner.cleanup()


@pytest.fixture
async def jwt_gw(bus, tmp_path, jwks_server):
    url, document = jwks_server
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks_file = tmp_path / "rsa-jwks.json"
    jwks_file.write_text(json.dumps({"keys": [_jwk(rsa_key, "rsa-1")]}))
    document["keys"] = [_jwk(ec_key, "ec-1")]
    issuers = [
        JwtIssuer(
            name="corp",
            issuer="https://corp.example",
            audience=["sluice"],
            jwks_file=jwks_file,
            default_scopes=["chat"],
        ),
        JwtIssuer(
            name="partner",
            issuer="https://partner.example",
            audience=["sluice-api"],
            jwks_url=url,
            team_claim="org.team",
            scopes_claim="scp",
        ),
    ]
    gateway = await build_gateway(bus, tmp_path, jwt_issuers=issuers)
    yield gateway, rsa_key, ec_key
    await gateway.close()


def _token(private: Any, kid: str, alg: str, **claims: Any) -> str:
    now = int(time.time())
    body = {"iat": now, "exp": now + 300, **claims}
    return jwt.encode(body, private, algorithm=alg, headers={"kid": kid})


async def test_jwts_from_configured_issuers_act_for_their_team_and_user(jwt_gw, tmp_path) -> None:
    gw, rsa_key, ec_key = jwt_gw
    async with admin(gw, tmp_path) as ops:
        team = await make_team(ops, tier="free")
    rsa_token = _token(
        rsa_key, "rsa-1", "RS256", iss="https://corp.example", aud="sluice", sub="alice", team=team
    )
    async with gw.http(authorization=f"Bearer {rsa_token}") as alice:
        r = await alice.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
    reserve = gw.fake.reserves[-1]
    assert (reserve.team_id, reserve.end_user, reserve.key_id) == (team, "alice", "jwt-corp")
    assert reserve.end_user_limits.requests_per_minute == 10  # the free tier's end user

    ec_token = _token(
        ec_key,
        "ec-1",
        "ES256",
        iss="https://partner.example",
        aud="sluice-api",
        sub="bob",
        org={"team": team},
        scp="chat jobs",
    )
    async with gw.http(authorization=f"Bearer {ec_token}") as bob:
        assert (await bob.post("/v1/chat/completions", json=CHAT)).status_code == 200
        # jobs is in the token's scopes, but the free tier offers no batch class.
        r = await bob.post("/v1/jobs", json={"request": CHAT})
        problem(r, 403, "forbidden")
    assert gw.fake.reserves[-1].end_user == "bob"
    await asyncio.sleep(0.2)
    async with admin(gw, tmp_path) as ops:
        records = (
            await ops.get("/v1/admin/audit/", params={"team_id": team, "action": "request"})
        ).json()["data"]
        assert {e["actor"] for e in records} == {
            "jwt:https://corp.example:alice",
            "jwt:https://partner.example:bob",
        }


async def test_bad_jwts_get_401_with_the_reason(jwt_gw, tmp_path) -> None:
    gw, rsa_key, ec_key = jwt_gw
    async with admin(gw, tmp_path) as ops:
        team = await make_team(ops)
    good = {"iss": "https://corp.example", "aud": "sluice", "sub": "alice", "team": team}
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        "expired": _token(rsa_key, "rsa-1", "RS256", **{**good, "exp": int(time.time()) - 120}),
        "wrong_audience": _token(rsa_key, "rsa-1", "RS256", **{**good, "aud": "other"}),
        "unknown_issuer": _token(rsa_key, "rsa-1", "RS256", **{**good, "iss": "https://evil"}),
        "bad_signature": _token(stranger, "rsa-1", "RS256", **good),
        "unknown_signing_key": _token(stranger, "rsa-9", "RS256", **good),
        "unknown_team": _token(rsa_key, "rsa-1", "RS256", **{**good, "team": "no-such-team"}),
        "algorithm_not_allowed": jwt.encode(
            good, "a shared secret of at least 32 bytes!", algorithm="HS256"
        ),
    }
    for reason, token in cases.items():
        async with gw.http(authorization=f"Bearer {token}") as caller:
            body = problem(
                await caller.post("/v1/chat/completions", json=CHAT), 401, "invalid_token"
            )
            assert body["details"]["reason"] == reason, (reason, body)
    # The EC key of one issuer does not sign for the other.
    wrong = _token(ec_key, "rsa-1", "ES256", **good)
    async with gw.http(authorization=f"Bearer {wrong}") as caller:
        r = await caller.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 401


async def test_the_admin_key_stored_is_only_its_hash(gw, tmp_path, bus) -> None:
    secret = (tmp_path / "admin-key").read_text().strip()
    kv = await bus.kv(Buckets.API_KEYS)
    pointer = await kv.get("id.admin")
    entry = await kv.get((pointer.value or b"").decode())
    assert secret.encode() not in (entry.value or b"")
