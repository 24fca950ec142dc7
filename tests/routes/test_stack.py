"""Routes through the whole product (every service a real process, the simulator as
provider): the route and the rule named in headers and usage, lifecycle headers and
410, the last resort (a stored answer, a template, or 503 with Retry-After) marked
degraded, the route's deadline, and /readyz saying degraded while a breaker is open."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sluice.devtools.embedded import free_port

from tests.support.full_stack import FullStack, full_stack, wait_for
from tests.support.stack import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROVIDERS = """
providers:
  sim:
    kind: openai
    base_url: ${{SLUICE_SIMULATOR_URL}}
  dead:
    kind: openai
    base_url: http://127.0.0.1:{dead_port}/v1
    connect_timeout_seconds: 0.5
models:
  main:
    chain:
      - {{name: main-sim, provider: sim, upstream_model: main-up}}
  cheap:
    chain:
      - {{name: cheap-sim, provider: sim, upstream_model: cheap-up}}
  old:
    provider: sim
    upstream_model: old-up
    deprecated_at: 2026-01-01T00:00:00Z
    sunset_at: 2099-01-01T00:00:00Z
    replacement: main
    deprecation_link: https://example.com/migrate
  gone:
    chain:
      - name: gone-pin
        provider: sim
        upstream_model: gone-up
        sunset_at: 2026-01-01T00:00:00Z
    sunset_at: 2026-01-01T00:00:00Z
    replacement: main
  flaky:
    last_resort: {{cache: true, template: "Busy; try later."}}
    chain:
      - {{name: flaky-sim, provider: sim, upstream_model: flaky-up, attempts: 1}}
  down:
    last_resort: {{cache: false, retry_after_seconds: 7}}
    chain:
      - {{name: down-dead, provider: dead, upstream_model: x, attempts: 1}}
  slow:
    deadline_seconds: 1
    chain:
      - name: slow-sim
        provider: sim
        upstream_model: slow-up
        params: {{sim: {{ttft_ms: 5000}}}}
rules:
  - {{name: cheap-hint, when: {{hint: cheap}}, route: cheap}}
"""


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FullStack]:
    root = tmp_path_factory.mktemp("routes")
    config = root / "config"
    shutil.copytree(REPO / "config", config)
    (config / "providers.yaml").write_text(PROVIDERS.format(dead_port=free_port()))
    async with full_stack(
        root,
        gateway_env={"SLUICE_CONFIG_DIR": str(config)},
        worker_env={"SLUICE_WORKER_CIRCUIT_FAILURE_THRESHOLD": "1"},
    ) as running:
        yield running


def body(model: str, text: str = "hello routes", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "max_tokens": 16,
        **extra,
    }


async def chaos(stack: FullStack, models: dict[str, Any]) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        resp = await http.post(
            stack.sim_url.removesuffix("/v1") + "/_sim/chaos", json={"models": models}
        )
        resp.raise_for_status()


async def test_route_rule_and_deployment_are_named(stack: FullStack) -> None:
    async with stack.client() as http:
        plain = await http.post("/v1/chat/completions", json=body("main"))
        assert plain.status_code == 200, plain.text
        assert plain.headers["x-sluice-route"] == "main"
        assert "x-sluice-route-rule" not in plain.headers
        assert plain.headers["x-sluice-deployment"] == "main-sim"
        assert plain.json()["sluice"]["deployment"] == "main-sim"
        async with http.stream(
            "POST", "/v1/chat/completions", json=body("main", "streamed", stream=True)
        ) as streamed:
            assert streamed.headers["x-sluice-deployment"] == "main-sim"
            await streamed.aread()
        hinted = await http.post(
            "/v1/chat/completions", json=body("main"), headers={"x-sluice-route": "cheap"}
        )
        assert hinted.headers["x-sluice-route"] == "cheap"
        assert hinted.headers["x-sluice-route-rule"] == "cheap-hint"
        # The same body on another route is not the first route's cached answer.
        assert hinted.headers["x-sluice-cache"] == "miss"
        assert hinted.headers["x-sluice-deployment"] == "cheap-sim"
        assert hinted.json()["model"] == "cheap"


async def test_deprecated_route_headers_and_a_retired_pin(stack: FullStack) -> None:
    async with stack.client() as http:
        old = await http.post("/v1/chat/completions", json=body("old"))
        assert old.status_code == 200
        assert old.headers["deprecation"] == "@1767225600"
        assert old.headers["sunset"] == "Thu, 01 Jan 2099 00:00:00 GMT"
        assert old.headers["link"] == '<https://example.com/migrate>; rel="deprecation"'
        assert old.headers["x-sluice-warning"].startswith("model_deprecated:")
        moved = await http.post("/v1/chat/completions", json=body("gone"))
        assert moved.status_code == 200 and moved.headers["x-sluice-route"] == "main"
        assert "sunset" in moved.headers
        pinned = await http.post("/v1/chat/completions", json=body("gone-pin"))
        assert pinned.status_code == 410
        problem = pinned.json()
        assert problem["code"] == "model_retired" and problem["trace_id"]


async def test_last_resort_stored_answer_then_template_then_503(stack: FullStack) -> None:
    request = body("flaky", "a question asked before the outage")
    async with stack.client() as http:
        first = await http.post("/v1/chat/completions", json=request)
        assert first.status_code == 200 and "x-sluice-status" not in first.headers
        answer = first.json()["choices"][0]["message"]["content"]

        async def stored() -> bool:
            again = await http.post("/v1/chat/completions", json=request)
            return again.headers.get("x-sluice-cache") == "hit"

        await wait_for(stored, what="the answer in the exact cache")
        await chaos(stack, {"flaky-up": {"error_rate": 1.0}})
        try:
            # no-cache: the gateway does not answer from the cache; the route's last
            # resort finds the stored answer once its deployment failed.
            resp = await http.post(
                "/v1/chat/completions", json=request, headers={"cache-control": "no-cache"}
            )
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-sluice-status"] == "degraded"
            assert resp.headers["x-sluice-deployment"] == "last_resort:cache"
            assert resp.json()["sluice"]["status"] == "degraded"
            assert resp.json()["choices"][0]["message"]["content"] == answer
            # Nothing stored for this one: the template, streamed as well.
            other = body("flaky", "a question nobody asked before")
            resp = await http.post("/v1/chat/completions", json=other)
            assert resp.headers["x-sluice-status"] == "degraded"
            assert resp.json()["choices"][0]["message"]["content"] == "Busy; try later."
            async with http.stream(
                "POST", "/v1/chat/completions", json={**other, "stream": True}
            ) as streamed:
                assert streamed.headers["x-sluice-status"] == "degraded"
                assert streamed.headers["x-sluice-deployment"] == "last_resort:template"
                text = (await streamed.aread()).decode()
            assert "Busy; try later." in text and "[DONE]" in text
        finally:
            await chaos(stack, {})
        down = await http.post("/v1/chat/completions", json=body("down"))
        assert down.status_code == 503 and down.json()["code"] == "upstream_unavailable"
        assert down.headers["retry-after"] == "7"


async def test_route_deadline_is_504_model_timeout(stack: FullStack) -> None:
    async with stack.client() as http:
        resp = await http.post("/v1/chat/completions", json=body("slow"))
    assert resp.status_code == 504
    problem = resp.json()
    assert problem["code"] == "model_timeout"
    assert problem["details"]["deadline_ms"] == "1000"
    assert int(problem["details"]["elapsed_ms"]) >= 1000


async def test_readyz_is_degraded_while_a_breaker_is_open(stack: FullStack) -> None:
    async with stack.client() as http:
        await http.post("/v1/chat/completions", json=body("down"))

        async def degraded() -> dict[str, Any] | None:
            ready = await http.get("/readyz")
            found: dict[str, Any] = ready.json()
            return found if ready.status_code == 200 and found["status"] == "degraded" else None

        report = await wait_for(degraded, what="/readyz degraded")
    opened = {d["deployment"]: d for d in report["open_deployments"]}
    assert opened["down-dead"]["state"] == "open" and opened["down-dead"]["reason"] == "errors"
    assert "down" in report["routes_down"] and "main" not in report["routes_down"]


async def test_a_rule_never_opens_a_route_the_key_may_not_use(stack: FullStack) -> None:
    secret = "sk-sluice-routes-allow-" + "0" * 16
    await stack.add_key(
        secret, key_id="routes-allow", team_id="routes-other", scopes=["chat"], model_allow=["main"]
    )
    async with stack.client(secret) as http:

        async def allowed() -> httpx.Response | None:
            resp = await http.post("/v1/chat/completions", json=body("main", "allow-list"))
            return resp if resp.status_code == 200 else None

        await wait_for(allowed, what="the new key")
        hinted = await http.post(
            "/v1/chat/completions",
            json=body("main", "allow-list"),
            headers={"x-sluice-route": "cheap"},
        )
    assert hinted.status_code == 403
    assert hinted.json()["code"] == "model_not_allowed" and "cheap" in hinted.json()["detail"]


async def test_jobs_follow_routes_and_lifecycle(stack: FullStack) -> None:
    async with stack.client() as http:
        retired = await http.post("/v1/jobs", json={"request": body("gone-pin")})
        assert retired.status_code == 410 and retired.json()["code"] == "model_retired"
        job = await http.post("/v1/jobs", json={"request": body("gone", "a job")})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]

        async def done() -> dict[str, Any] | None:
            found: dict[str, Any] = (await http.get(f"/v1/jobs/{job_id}")).json()
            return found if found["status"] in {"completed", "failed"} else None

        finished = await wait_for(done, what="the job")
    assert finished["status"] == "completed", finished
    assert finished["result"]["model"] == "main"
