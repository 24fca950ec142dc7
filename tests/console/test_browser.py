"""The console end to end in headless Chromium (Debian's package, driven by Playwright)
on the real stack: log in (a wrong key first), stream a prompt in the playground and
open its trace, submit and cancel a job, read spend with budget bars and the chart,
invalidate a cached answer, read the providers, and (as the admin) create, rotate and
revoke a key whose secret is shown once; then a service down shows as an error on the
page. Every page is kept as a screenshot in ``.artifacts/console/``. Load times and the
playground's first-token delay are printed (``-s``), not asserted."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
from sluice.topology import ServiceName

from tests.console.conftest import ADMIN_KEY, ARTIFACTS, ConsoleStack, chromium_path

pytestmark = [pytest.mark.integration, pytest.mark.slow]

READY = "() => document.getElementById('main')?.dataset.ready !== undefined"
# The keys panel with no listing on its way.
SETTLED = "#keys:not([data-loading])"


async def _new_key(stack: ConsoleStack, team: str) -> str:
    async with stack.client(ADMIN_KEY) as admin:
        r = await admin.post(
            "/v1/admin/teams",
            json={"team_id": team, "name": team.title(), "budgets": {"usd_per_day": "0.0005"}},
        )
        assert r.status_code == 201, r.text
        r = await admin.post(
            "/v1/admin/keys",
            json={"team_id": team, "name": "console-user", "scopes": ["chat", "jobs"]},
        )
        assert r.status_code == 201, r.text
        return str(r.json()["secret"])


class Timings:
    def __init__(self) -> None:
        self.loads: dict[str, float] = {}

    async def open(self, page: Any, url: str, name: str, *, ok: bool = True) -> None:
        """Navigates and waits until the page's content is in place (or its error)."""
        started = time.perf_counter()
        await page.goto(url)
        await page.wait_for_function(READY)
        self.loads[name] = (time.perf_counter() - started) * 1000
        ready = await page.eval_on_selector("#main", "m => m.dataset.ready")
        if ok:
            assert ready != "error", await page.inner_text("#main")


async def _shot(page: Any, name: str) -> None:
    await page.evaluate("window.scrollTo(0, 0)")
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def _gateway_first_byte_ms(stack: ConsoleStack, key: str, body: dict[str, Any]) -> float:
    async with stack.client(key) as c:
        started = time.perf_counter()
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            async for _chunk in r.aiter_raw():
                return (time.perf_counter() - started) * 1000
    raise AssertionError("no bytes")


async def test_a_late_key_listing_does_not_replace_a_newer_one(
    console_stack: ConsoleStack,
) -> None:
    """An operator picks one team, then another before the first listing came back: the
    page shows the team picked last, whatever order the answers arrive in."""
    executable = chromium_path()
    from playwright.async_api import Route, async_playwright

    slow_team, picked_team = (f"late-{n}-" + uuid.uuid4().hex[:6] for n in ("a", "b"))
    async with console_stack.client(ADMIN_KEY) as admin:
        for team in (slow_team, picked_team):
            r = await admin.post("/v1/admin/teams", json={"team_id": team, "name": team})
            assert r.status_code == 201, r.text
            r = await admin.post("/v1/admin/keys", json={"team_id": team, "name": f"key-of-{team}"})
            assert r.status_code == 201, r.text

    answered = asyncio.Event()

    async def late(route: Route) -> None:
        await asyncio.sleep(1.5)
        await route.continue_()
        answered.set()

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(executable), headless=True)
        page = await browser.new_page()
        await page.goto(f"{console_stack.url}/console")
        await page.fill("#api-key", ADMIN_KEY)
        await page.click("#login-button")
        await page.wait_for_url("**/console/playground")
        await page.goto(f"{console_stack.url}/console/keys")
        await page.wait_for_function(READY)
        await page.route(f"**/v1/admin/keys?team_id={slow_team}", late)
        await page.select_option("#key-team-filter", slow_team)
        await page.select_option("#key-team-filter", picked_team)
        await page.wait_for_selector(f"{SETTLED} #key-table tr[data-name='key-of-{picked_team}']")
        await answered.wait()
        await asyncio.sleep(0.5)  # the late answer has reached the page
        assert await page.query_selector(f"tr[data-name='key-of-{slow_team}']") is None
        assert await page.query_selector(f"tr[data-name='key-of-{picked_team}']") is not None
        assert await page.input_value("#key-team-filter") == picked_team
        await browser.close()


async def test_console_in_a_browser(console_stack: ConsoleStack) -> None:
    executable = chromium_path()
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    base = console_stack.url
    team = "console-" + uuid.uuid4().hex[:6]
    key = await _new_key(console_stack, team)
    timings = Timings()
    sim = {"ttft_ms": 30, "tokens_per_second": 60, "output_tokens": 24}

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(executable), headless=True)
        page = await browser.new_page(viewport={"width": 1320, "height": 900})
        page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))

        # A wrong key: the login page says why, it does not go blank.
        await timings.open(page, f"{base}/console", "login")
        await page.fill("#api-key", "sk-not-a-key-of-this-gateway")
        await page.click("#login-button")
        await page.wait_for_selector("#login-status .error-box")
        assert "401" in await page.inner_text("#login-status")
        await _shot(page, "login-error")

        await page.fill("#api-key", key)
        await page.click("#login-button")
        await page.wait_for_url("**/console/playground")
        await page.wait_for_function(READY)
        # Not an admin key: no keys page in the navigation.
        assert await page.is_hidden("nav a[data-page=keys]")

        # Playground: a streamed answer, its first token on screen, its status and trace.
        await timings.open(page, f"{base}/console/playground", "playground")
        await page.select_option("#model", "sim-fast")
        await page.fill("#extra", json.dumps({"sim": sim}))
        # Twice: the first request of a new key also warms its caches on the way.
        for _ in range(2):
            await page.click("#send")
            await page.wait_for_selector("#output[data-first-token-ms]")
            await page.wait_for_selector("#output[data-done]")
        assert await page.inner_text("#output")
        assert await page.inner_text("#s-status") == "success"
        assert (await page.inner_text("#s-cost")).startswith("$")
        browser_first_byte = float(
            await page.get_attribute("#output", "data-first-byte-ms") or "nan"
        )
        browser_first_token = float(
            await page.get_attribute("#output", "data-first-token-ms") or "nan"
        )
        body = {
            "model": "sim-fast",
            "stream": True,
            "messages": [{"role": "user", "content": "first byte " + uuid.uuid4().hex}],
            "sim": sim,
        }
        gateway_first_byte = await _gateway_first_byte_ms(console_stack, key, body)
        await _shot(page, "playground")

        # The trace tree of that request (spans reach their files within a flush).
        href = await page.get_attribute("#trace-link", "href")
        assert href and href.startswith("/console/trace?id=")
        for _ in range(50):
            await timings.open(page, base + href, "trace", ok=False)
            if await page.query_selector("#span-count"):
                break
            await asyncio.sleep(0.1)
        assert int(await page.inner_text("#span-count")) >= 3
        await _shot(page, "trace")

        # Jobs: a slow job, listed, followed and cancelled.
        await timings.open(page, f"{base}/console/jobs", "jobs")
        assert await page.is_visible("#job-list .empty")
        await page.fill(
            "#job-extra",
            '{"max_tokens": 400, "sim": {"tokens_per_second": 4, "output_tokens": 400}}',
        )
        await page.click("#job-submit")
        await page.wait_for_selector("#job-list tr[data-job]")
        job_id = await page.get_attribute("#job-list tr[data-job]", "data-job")
        await page.wait_for_selector("#job-cancel:not([disabled])")
        await page.click("#job-cancel")
        await page.wait_for_function(
            "() => document.querySelector('#job-status')?.innerText.includes('cancelled')",
            timeout=30_000,
        )
        await page.click("#job-refresh")
        await page.wait_for_selector(f"#job-list tr[data-job='{job_id}'] .badge.cancelled")
        await _shot(page, "jobs")

        # Spend: the ledger has the playground's request (recorded after the answer).
        async with console_stack.client(key) as c:
            for _ in range(100):
                usage = (await c.get("/v1/usage", params={"group_by": "model"})).json()
                if usage["totals"]["cost_usd_nanos"] > 0:
                    break
                await asyncio.sleep(0.1)
        await timings.open(page, f"{base}/console/spend", "spend")
        assert await page.is_visible("#spend-chart")
        share = float(await page.get_attribute("#budget-team-day", "data-share") or "0")
        assert share > 0
        assert await page.is_visible("#budget-team-day .mark")
        assert "sim-fast" in await page.inner_text("table[data-by=model]")
        await _shot(page, "spend")

        # Cache: an answer cached for the team, then invalidated from the page.
        prompt = "cache this " + uuid.uuid4().hex
        cached = {
            "model": "sim-fast",
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 8,
        }
        async with console_stack.client(key) as c:
            await c.post("/v1/chat/completions", json=cached)
            for _ in range(100):
                r = await c.post("/v1/chat/completions", json=cached)
                if r.headers["x-sluice-cache"] == "hit":
                    break
                await asyncio.sleep(0.05)
            assert r.headers["x-sluice-cache"] == "hit"
            for _ in range(100):  # the hit's ledger row (recorded after the answer)
                usage = (await c.get("/v1/usage")).json()
                if usage["totals"]["cache_hits"] > 0:
                    break
                await asyncio.sleep(0.1)
        await timings.open(page, f"{base}/console/cache", "cache")
        assert await page.inner_text("#team-hits") != "0"
        await page.fill("#inv-prompt", prompt)
        await page.fill("#inv-extra", '{"temperature": 0, "max_tokens": 8}')
        await page.click("#inv-submit")
        await page.wait_for_selector("#inv-result .notice")
        assert "Removed 1" in await page.inner_text("#inv-result")
        async with console_stack.client(key) as c:
            r = await c.post("/v1/chat/completions", json=cached)
            assert r.headers["x-sluice-cache"] == "miss"
        await _shot(page, "cache")

        # Providers: the routes, their breakers and the calls just made.
        await timings.open(page, f"{base}/console/providers", "providers")
        row = "[data-route='sim-fast'] tr[data-deployment='sim-fast']"
        assert "closed" in await page.inner_text(row)
        await _shot(page, "providers")

        # Keys and teams, with the admin key: the secret is shown once.
        await page.click("#logout")
        await page.wait_for_url("**/console/login")
        await page.fill("#api-key", ADMIN_KEY)
        await page.click("#login-button")
        await page.wait_for_url("**/console/playground")
        # An operator also reads the cache service's exact and semantic hit rates.
        await timings.open(page, f"{base}/console/cache", "cache-operator")
        assert (await page.inner_text("#exact-hit-rate")).endswith("%")
        await _shot(page, "cache-operator")
        await timings.open(page, f"{base}/console/keys", "keys")
        await page.select_option("#key-team-filter", team)
        # The listing the selection asked for, drawn: typing into the form before it is
        # would type into a form about to be replaced.
        await page.wait_for_selector(f"{SETTLED} #key-table tr[data-name='console-user']")
        await page.fill("#key-name", "made-in-console")
        await page.click("#key-create")
        await page.wait_for_selector("#new-secret")
        secret = await page.inner_text("#new-secret")
        assert secret.startswith("sk-")
        async with console_stack.client(secret) as c:
            assert (await c.get("/v1/me")).json()["team_id"] == team
        await _shot(page, "keys-created")
        await page.click("#secret-dismiss")
        await page.reload()
        await page.wait_for_function(READY)
        assert secret not in await page.content()

        await page.select_option("#key-team-filter", team)
        made = f"{SETTLED} #key-table tr[data-name='made-in-console']"
        await page.wait_for_selector(made)
        await page.click(f"{made} [data-action=rotate]")
        await page.wait_for_selector("#new-secret")
        rotated = await page.inner_text("#new-secret")
        assert rotated.startswith("sk-") and rotated != secret
        async with console_stack.client(secret) as c:
            for _ in range(50):  # every gateway drops the old key as the change arrives
                if (await c.get("/v1/me")).status_code == 401:
                    break
                await asyncio.sleep(0.05)
            assert (await c.get("/v1/me")).status_code == 401
        live = f"{made}:has(.badge.active)"
        await page.wait_for_selector(live)
        new_id = await page.get_attribute(live, "data-key")
        await page.click(f"{live} [data-action=revoke]")
        await page.wait_for_selector(f"tr[data-key='{new_id}'] .badge.revoked")
        async with console_stack.client(rotated) as c:
            for _ in range(50):
                if (await c.get("/v1/me")).status_code == 401:
                    break
                await asyncio.sleep(0.05)
            assert (await c.get("/v1/me")).status_code == 401
        await _shot(page, "keys")

        # The stack fails: the page says so instead of going blank.
        console_stack.stack.processes[ServiceName.COST_TRACKER].stop()
        await timings.open(page, f"{base}/console/spend", "spend-down", ok=False)
        error = await page.inner_text("#main .error-box")
        assert "This page could not load" in error and "503" in error
        await _shot(page, "spend-error")
        await browser.close()

    print("\nconsole page load (navigation to content visible), ms:")
    for name, elapsed in timings.loads.items():
        print(f"  {name:<11} {elapsed:7.1f}")
    print(
        f"playground: first SSE byte in the browser {browser_first_byte:.1f} ms, first token "
        f"painted {browser_first_token:.1f} ms (+{browser_first_token - browser_first_byte:.1f});"
        f" the gateway's first SSE byte to a plain client {gateway_first_byte:.1f} ms"
    )
