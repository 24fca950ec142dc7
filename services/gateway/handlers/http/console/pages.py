"""``GET /console/...``: the console's pages and static assets.

Only these routes serve the console: nothing is added to the API's other requests. A
page is a small HTML shell (navigation, a main element, the page's module); what it
shows comes from the JSON API, called from the browser with the caller's key, so a
page never holds data the key could not read itself."""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar import Controller, Request, Response, get
from litestar.params import FromPath, FromQuery
from sluice.errors import ErrorCode, SluiceError

STATIC_DIR = Path(__file__).parent / "static"
_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
# Asset URLs carry their content hash: a new release is a new URL.
IMMUTABLE = "public, max-age=31536000, immutable"
SHARED = "console.js"
# Pages are tiny and name the current assets: always revalidated.
PAGE_CACHE = "no-cache"


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def _asset(body: bytes, media: str) -> Asset:
    return Asset(body, media, hashlib.sha256(body).hexdigest()[:16])


def _load_assets() -> dict[str, Asset]:
    assets = {}
    for path in sorted(STATIC_DIR.iterdir()):
        media = _TYPES.get(path.suffix)
        if media is not None and path.is_file():
            assets[path.name] = _asset(path.read_bytes(), media)
    # Page modules import the shared module by its hashed URL (the one the page
    # preloads), so that a new console.js is a new URL for them too.
    shared = f"/console/static/{SHARED}?v={assets[SHARED].etag}".encode()
    for name, asset in list(assets.items()):
        if name.endswith(".js") and name != SHARED:
            body = asset.body.replace(b'"./' + SHARED.encode() + b'"', b'"' + shared + b'"')
            assets[name] = _asset(body, asset.media_type)
    return assets


ASSETS = _load_assets()


def asset_url(name: str) -> str:
    return f"/console/static/{name}?v={ASSETS[name].etag}"


@dataclass(frozen=True)
class Page:
    slug: str
    title: str
    module: str
    admin: bool = False
    nav: bool = True


PAGES = (
    Page("playground", "Playground", "playground.js"),
    Page("jobs", "Jobs", "jobs.js"),
    Page("spend", "Spend", "spend.js"),
    Page("cache", "Cache", "cache.js"),
    Page("providers", "Providers", "providers.js"),
    Page("keys", "Keys & teams", "keys.js", admin=True),
    Page("trace", "Trace", "trace.js", nav=False),
)
_BY_SLUG = {p.slug: p for p in PAGES}


def _nav(current: str) -> str:
    links = []
    for page in PAGES:
        if not page.nav:
            continue
        attrs = ' aria-current="page"' if page.slug == current else ""
        admin = ' data-admin="1" hidden' if page.admin else ""
        links.append(
            f'<a href="/console/{page.slug}" data-page="{page.slug}"{attrs}{admin}>'
            f"{html.escape(page.title)}</a>"
        )
    return "".join(links)


def render(title: str, slug: str, module: str, *, signed_in: bool = True) -> bytes:
    """A page's shell: the page module renders into ``main``; ``console.js`` shows an
    error in place of the content when anything fails."""
    nav = _nav(slug) if signed_in else ""
    account = (
        '<div class="account"><span id="who"></span>'
        '<button type="button" id="logout" class="ghost">Log out</button></div>'
        if signed_in
        else ""
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} · Sluice console</title>
<link rel="icon" href="{asset_url("logo.svg")}">
<link rel="stylesheet" href="{asset_url("console.css")}">
<link rel="modulepreload" href="{asset_url("console.js")}">
<script type="module" src="{asset_url(module)}"></script>
</head>
<body data-page="{slug}">
<header class="top">
<a class="brand" href="/console/playground"><img src="{asset_url("logo.svg")}" alt="" width="22"
 height="22">Sluice</a>
<nav>{nav}</nav>
{account}
</header>
<main id="main" aria-live="polite"><p class="loading">Loading…</p></main>
<noscript><p class="error-box">The console needs JavaScript.</p></noscript>
</body>
</html>
""".encode()


def _page(body: bytes) -> Response[bytes]:
    return Response(
        body, media_type="text/html", headers={"cache-control": PAGE_CACHE}
    )


class ConsoleController(Controller):
    path = "/console"
    include_in_schema = False

    @get(["/", "/login"])
    async def login(self) -> Response[bytes]:
        return _page(render("Log in", "login", "login.js", signed_in=False))

    @get("/{slug:str}")
    async def page(self, slug: FromPath[str]) -> Response[bytes]:
        page = _BY_SLUG.get(slug)
        if page is None:
            raise SluiceError(
                ErrorCode.NOT_FOUND,
                f"No console page '{slug[:40]}': see /console for the pages.",
            )
        return _page(render(page.title, page.slug, page.module))

    @get("/static/{name:str}")
    async def static(
        self, request: Request[Any, Any, Any], name: FromPath[str], v: FromQuery[str] = ""
    ) -> Response[Any]:
        asset = ASSETS.get(name)
        if asset is None:
            raise SluiceError(ErrorCode.NOT_FOUND, f"No console asset '{name[:60]}'.")
        # A URL without the current hash (an old page) is served, but not kept.
        cache = IMMUTABLE if v == asset.etag else PAGE_CACHE
        headers = {"cache-control": cache, "etag": f'"{asset.etag}"'}
        if request.headers.get("if-none-match") == headers["etag"]:
            return Response(b"", status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)
