"""The pinned API version (``Sluice-Version``): resolved from the header or the key,
echoed on every answer (errors and streams included), refused with a stable code when
unknown, malformed or retired, and announced with ``Deprecation`` / ``Sunset`` once
deprecated; the admin API stores a key's version. Through the real gateway app on a
test NATS (limiter, cache and worker scripted by the harness)."""

from __future__ import annotations

import secrets
from datetime import UTC, date, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sluice.keys.v1 import keys_pb2
from sluice.topology import Buckets, Streams

from services.gateway.domain.keys import hash_secret
from services.gateway.domain.versions import VERSIONS, ApiVersion, VersionRegistry
from services.gateway.handlers.http.application import create_app
from services.gateway.handlers.http.middleware import Edge
from tests.gateway.harness import BASE_URL, Gateway, build_gateway

CHAT = {"model": "sim-fast", "messages": [{"role": "user", "content": "hi"}]}
CURRENT = VERSIONS.current.name

# A registry with history: an old version past its sunset, one deprecated with a sunset
# far ahead, and the current one.
OLD = ApiVersion("2025-01-15", ("old",), deprecated=date(2025, 3, 1), sunset=date(2025, 6, 1))
DEPRECATED = ApiVersion(
    "2026-02-01",
    ("middle",),
    deprecated=date(2026, 5, 1),
    sunset=date(2099, 1, 1),
    link="https://sluice.dev/docs/versions",
)
HISTORY = VersionRegistry([OLD, DEPRECATED, ApiVersion(CURRENT, ("now",))])


@pytest.fixture
async def gw(bus, tmp_path):
    gateway = await build_gateway(bus, tmp_path)
    yield gateway
    await gateway.close()
    await gateway.parts.api.keys.keys.stop()  # type: ignore[attr-defined]


def client(edge: Edge, secret: str | None = None, **headers: str) -> httpx.AsyncClient:
    if secret is not None:
        headers["authorization"] = f"Bearer {secret}"
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=edge), base_url=BASE_URL, headers=headers, timeout=10
    )


def history_edge(gw: Gateway) -> Edge:
    return Edge(create_app(gw.parts.api), gw.deps.instruments, gw.parts.audit, versions=HISTORY)


async def stored_key(gw: Gateway, api_version: str, team: str | None = None) -> str:
    """A key stored as the admin API would, pinned to ``api_version``."""
    kv = await gw.fake.bus.kv(Buckets.API_KEYS)
    secret = "sk-test-" + secrets.token_hex(8)
    record = keys_pb2.ApiKeyRecord(
        key_id="k" + secrets.token_hex(4),
        secret_sha256=hash_secret(secret),
        team_id=team or gw.record.team_id,
        tokens_per_minute=5000,
        requests_per_minute=60,
        scopes=["*"],
        api_version=api_version,
    )
    await kv.put(record.secret_sha256, record.SerializeToString())
    return secret


def refused(r: httpx.Response, reason: str, supported: list[str]) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["code"] == "unsupported_api_version"
    assert body["type"].endswith("/unsupported_api_version")
    assert body["trace_id"] and body["request_id"] == r.headers["x-request-id"]
    assert body["details"]["reason"] == reason
    assert body["details"]["supported"] == supported
    for name in supported:
        assert name in body["detail"]
    return body


async def work_published(gw: Gateway) -> int:
    info = await gw.fake.bus.js.stream_info(Streams.INFER.name)
    return int(info.state.messages)


# --- the registry ---------------------------------------------------------------------


def test_the_registry_resolves_by_name_and_refuses_the_rest() -> None:
    assert HISTORY.current.name == CURRENT and HISTORY.first is OLD
    assert HISTORY.resolve(DEPRECATED.name) is DEPRECATED
    assert HISTORY.resolve(f" {CURRENT} ").name == CURRENT
    assert HISTORY.supported() == [DEPRECATED.name, CURRENT]
    assert [HISTORY.status(v) for v in HISTORY.versions] == ["retired", "deprecated", "current"]
    for raw, reason in [
        ("2026-13-45", "unknown"),
        ("1999-01-01", "unknown"),
        ("latest", "malformed"),
        ("2026/12/04", "malformed"),
        ("", "malformed"),
        (OLD.name, "retired"),
    ]:
        with pytest.raises(Exception) as caught:
            HISTORY.resolve(raw)
        err = caught.value
        assert getattr(err, "code", None) == "unsupported_api_version", raw
        assert err.details["reason"] == reason, raw  # type: ignore[attr-defined]
    # A key made before versions existed answers in the first one.
    assert VERSIONS.of_key("") is VERSIONS.first
    with pytest.raises(ValueError):
        ApiVersion("2026-2-1", ())
    with pytest.raises(ValueError):
        VersionRegistry([ApiVersion(CURRENT, ()), ApiVersion(CURRENT, ())])


def test_a_deprecated_versions_headers_are_made_once() -> None:
    names = dict(DEPRECATED.headers)
    assert names[b"sluice-version"] == DEPRECATED.name.encode()
    # RFC 9745: a structured-field date, @<unix seconds>.
    at = int(names[b"deprecation"].decode().removeprefix("@"))
    assert datetime.fromtimestamp(at, UTC).date() == date(2026, 5, 1)
    # RFC 8594: an HTTP-date.
    assert parsedate_to_datetime(names[b"sunset"].decode()).date() == date(2099, 1, 1)
    assert names[b"link"] == b'<https://sluice.dev/docs/versions>; rel="deprecation"'
    assert dict(VERSIONS.current.headers) == {b"sluice-version": CURRENT.encode()}


# --- on the wire ----------------------------------------------------------------------


async def test_every_answer_names_its_version(gw: Gateway) -> None:
    async with gw.authed() as http:
        plain = await http.post("/v1/chat/completions", json=CHAT)
        assert plain.status_code == 200, plain.text
        # The harness's key stores no version: made before versions, it has the first.
        assert plain.headers["sluice-version"] == VERSIONS.first.name
        asked = await http.post(
            "/v1/chat/completions", json=CHAT, headers={"Sluice-Version": CURRENT}
        )
        assert asked.headers["sluice-version"] == CURRENT
        async with http.stream(
            "POST",
            "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"Sluice-Version": CURRENT},
        ) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["sluice-version"] == CURRENT
            assert [line async for line in stream.aiter_lines()][-2:] == ["data: [DONE]", ""]
        missing = await http.get("/v1/no-such-route")
        assert missing.status_code == 404
        assert missing.headers["sluice-version"] == CURRENT
        for path in ("/v1/models", "/healthz", "/docs/openapi.json"):
            assert (await http.get(path)).headers["sluice-version"], path
    async with gw.http() as anon:
        unauthorized = await anon.post("/v1/chat/completions", json=CHAT)
        assert unauthorized.status_code == 401
        assert unauthorized.headers["sluice-version"] == CURRENT


async def test_an_unknown_or_malformed_version_is_a_400_before_anything_runs(
    gw: Gateway,
) -> None:
    before = await work_published(gw)
    async with gw.authed() as http:
        for raw, reason in [("2019-01-01", "unknown"), ("v2", "malformed")]:
            r = await http.post("/v1/chat/completions", json=CHAT, headers={"Sluice-Version": raw})
            body = refused(r, reason, [CURRENT])
            assert body["details"]["requested"] == raw
            assert body["error"]["param"] == "Sluice-Version"
            assert r.headers["sluice-version"] == CURRENT
            assert r.headers["x-should-retry"] == "false"
        long = "x" * 500
        r = await http.get("/v1/models", headers={"Sluice-Version": long})
        assert refused(r, "malformed", [CURRENT])["details"]["requested"] == long[:40]
        # The Anthropic route answers in Anthropic's error shape.
        r = await http.post(
            "/v1/messages",
            json={
                "model": "sim-fast",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}],
            },
            headers={"Sluice-Version": "2019-01-01", "anthropic-version": "2023-06-01"},
        )
        assert r.status_code == 400
        error = r.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert "2019-01-01" in error["error"]["message"]
    assert await work_published(gw) == before


async def test_a_keys_version_applies_unless_the_request_names_one(gw: Gateway) -> None:
    edge = history_edge(gw)
    deprecated_key = await stored_key(gw, DEPRECATED.name)
    async with client(edge, deprecated_key) as http:
        r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        assert r.headers["sluice-version"] == DEPRECATED.name
        assert r.headers["deprecation"] == dict(DEPRECATED.headers)[b"deprecation"].decode()
        assert parsedate_to_datetime(r.headers["sunset"]).date() == date(2099, 1, 1)
        assert r.headers["link"] == '<https://sluice.dev/docs/versions>; rel="deprecation"'
        # The header wins over the key's version: the current one has no deprecation.
        r = await http.post("/v1/chat/completions", json=CHAT, headers={"Sluice-Version": CURRENT})
        assert r.headers["sluice-version"] == CURRENT
        assert "deprecation" not in r.headers and "sunset" not in r.headers
        # A deprecated version still named explicitly is served, announced.
        r = await http.get("/v1/models", headers={"Sluice-Version": DEPRECATED.name})
        assert r.status_code == 200 and r.headers["sunset"]
        # Past its sunset a version is refused, named or not.
        r = await http.get("/v1/models", headers={"Sluice-Version": OLD.name})
        refused(r, "retired", [DEPRECATED.name, CURRENT])
    retired_key = await stored_key(gw, OLD.name)
    async with client(edge, retired_key) as http:
        r = await http.post("/v1/chat/completions", json=CHAT)
        body = refused(r, "retired", [DEPRECATED.name, CURRENT])
        assert body["error"]["param"] == "api_version"
        # Naming a supported version gets the key through.
        r = await http.post("/v1/chat/completions", json=CHAT, headers={"Sluice-Version": CURRENT})
        assert r.status_code == 200, r.text


# --- the admin API --------------------------------------------------------------------


def admin(gw: Gateway, tmp_path: Path) -> httpx.AsyncClient:
    secret = (tmp_path / "admin-key").read_text().strip()
    return gw.http(authorization=f"Bearer {secret}")


async def test_keys_get_the_current_version_and_the_admin_api_checks_it(
    gw: Gateway, tmp_path: Path
) -> None:
    async with admin(gw, tmp_path) as ops:
        teams = []
        for _ in range(2):
            team = "t-" + secrets.token_hex(4)
            assert (await ops.post("/v1/admin/teams/", json={"team_id": team})).status_code == 201
            teams.append(team)
        made = await ops.post("/v1/admin/keys/", json={"team_id": teams[0], "name": "default"})
        assert made.status_code == 201, made.text
        key = made.json()
        assert key["api_version"] == CURRENT
        pinned = await ops.post(
            "/v1/admin/keys/", json={"team_id": teams[0], "name": "pinned", "api_version": CURRENT}
        )
        assert pinned.json()["api_version"] == CURRENT
        before = (await ops.get(f"/v1/admin/keys/{key['key_id']}")).json()
        for raw, reason in [("2019-01-01", "unknown"), ("soon", "malformed")]:
            r = await ops.post(
                "/v1/admin/keys/", json={"team_id": teams[0], "name": raw, "api_version": raw}
            )
            assert refused(r, reason, [CURRENT])["error"]["param"] == "api_version"
            r = await ops.patch(f"/v1/admin/keys/{key['key_id']}", json={"api_version": raw})
            refused(r, reason, [CURRENT])
        assert (await ops.get(f"/v1/admin/keys/{key['key_id']}")).json() == before
        r = await ops.patch(f"/v1/admin/keys/{key['key_id']}", json={"api_version": CURRENT})
        assert r.status_code == 200 and r.json()["api_version"] == CURRENT
        other = (
            await ops.post(
                "/v1/admin/keys/",
                json={"team_id": teams[1], "name": "other", "scopes": ["admin", "chat"]},
            )
        ).json()
        rotated = await ops.post(f"/v1/admin/keys/{key['key_id']}/rotate", json={})
        assert rotated.json()["api_version"] == CURRENT
    # One team's admin neither reads nor changes another team's key version.
    async with gw.http(authorization=f"Bearer {other['secret']}") as b:
        r = await b.patch(f"/v1/admin/keys/{key['key_id']}", json={"api_version": CURRENT})
        assert r.status_code == 404 and r.json()["code"] == "not_found"
        assert (await b.get(f"/v1/admin/keys/{key['key_id']}")).status_code == 404
    # A request with the new key answers in its version.
    async with gw.http(authorization=f"Bearer {rotated.json()['secret']}") as http:
        r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        assert r.headers["sluice-version"] == CURRENT
