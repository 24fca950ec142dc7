"""``sluice teams``, ``sluice keys`` and ``sluice audit``: the gateway's admin API
(``/v1/admin``) from a terminal. Tables for people, ``--json`` for scripts. The admin
key comes from ``--admin-key``, ``SLUICE_ADMIN_API_KEY`` or ``<state>/admin-key`` (what
a local gateway generates); the gateway from ``--url`` or ``SLUICE_GATEWAY_URL``
(default: ``SLUICE_GATEWAY_HOST``/``PORT``, 127.0.0.1:8080). Errors print the problem's
detail and how to fix it, and exit 1."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any


def default_url() -> str:
    """``SLUICE_GATEWAY_URL``, else the gateway the local settings name (the address
    `sluice up` started it on: ``SLUICE_GATEWAY_HOST``/``PORT``, 127.0.0.1:8080)."""
    explicit = os.environ.get("SLUICE_GATEWAY_URL")
    if explicit:
        return explicit
    host = os.environ.get("SLUICE_GATEWAY_HOST", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{os.environ.get('SLUICE_GATEWAY_PORT', '8080')}"


class AdminError(Exception):
    pass


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=default_url(), help="the gateway (default: %(default)s)")
    parser.add_argument("--admin-key", default=os.environ.get("SLUICE_ADMIN_API_KEY"))
    parser.add_argument(
        "--state-dir", type=Path, default=Path(os.environ.get("SLUICE_STATE_DIR", ".sluice"))
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _key(args: argparse.Namespace) -> str:
    if args.admin_key:
        return str(args.admin_key)
    path = args.state_dir / "admin-key"
    try:
        text: str = path.read_text(encoding="utf-8")
    except OSError:
        raise AdminError(
            f"no admin key: pass --admin-key, set SLUICE_ADMIN_API_KEY, or start the gateway "
            f"locally so that it writes {path}"
        ) from None
    return text.strip()


def call(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: Any = None,
    query: dict[str, Any] | None = None,
) -> Any:
    url = args.url.rstrip("/") + path
    if query:
        url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("authorization", f"Bearer {_key(args)}")
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            problem = json.loads(exc.read())
        except ValueError:
            raise AdminError(f"{method} {path}: HTTP {exc.code}") from None
        fix = problem.get("fix") or ""
        raise AdminError(
            f"{problem.get('code', exc.code)}: {problem.get('detail', '')}"
            + (f" ({fix})" if fix else "")
        ) from None
    except urllib.error.URLError as exc:
        raise AdminError(f"cannot reach the gateway at {args.url}: {exc.reason}") from None


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def text(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, list):
            return ",".join(str(x) for x in v) or "-"
        if isinstance(v, dict):
            return " ".join(f"{k}={x}" for k, x in v.items() if x not in (0, "0", None, "")) or "-"
        return str(v)

    cells = [[text(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _limits(args: argparse.Namespace, prefix: str = "") -> dict[str, Any] | None:
    names = (
        "requests_per_minute",
        "input_tokens_per_minute",
        "output_tokens_per_minute",
        "concurrent_requests",
    )
    out = {n: getattr(args, prefix + n) for n in names if getattr(args, prefix + n) is not None}
    return out or None


def _budgets(args: argparse.Namespace, prefix: str = "") -> dict[str, Any] | None:
    out = {
        n: getattr(args, prefix + n)
        for n in ("usd_per_day", "usd_per_month")
        if getattr(args, prefix + n) is not None
    }
    return out or None


def _limit_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    flag = prefix.replace("_", "-")
    for name in (
        "requests-per-minute",
        "input-tokens-per-minute",
        "output-tokens-per-minute",
        "concurrent-requests",
    ):
        parser.add_argument(f"--{flag}{name}", type=int, dest=prefix + name.replace("-", "_"))
    for name in ("usd-per-day", "usd-per-month"):
        parser.add_argument(f"--{flag}{name}", dest=prefix + name.replace("-", "_"))


def _metadata(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise AdminError(f"--meta takes KEY=VALUE, not {pair!r}")
        out[key] = value
    return out


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


TEAM_COLUMNS = ["team_id", "name", "tier", "limits", "budgets", "disabled"]
KEY_COLUMNS = [
    "key_id",
    "name",
    "team_id",
    "status",
    "secret_prefix",
    "scopes",
    "model_allow",
    "expires_at",
]
AUDIT_COLUMNS = [
    "at",
    "team_id",
    "actor",
    "action",
    "target",
    "model",
    "status",
    "code",
    "cost_usd_nanos",
]


def teams(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sluice teams", description="Teams (admin API).")
    sub = parser.add_subparsers(dest="verb", required=True)
    create = sub.add_parser("create", help="create a team")
    create.add_argument("team_id")
    create.add_argument("--name")
    create.add_argument("--tier", help="a tier of config/tiers.yaml")
    update = sub.add_parser("update", help="change a team")
    update.add_argument("team_id")
    update.add_argument("--name")
    update.add_argument("--tier")
    update.add_argument("--disable", action="store_true")
    update.add_argument("--enable", action="store_true")
    for p in (create, update):
        _limit_options(p)
        _limit_options(p, "end_user_")
        p.add_argument("--meta", action="append", metavar="KEY=VALUE")
        _common(p)
    show = sub.add_parser("show", help="one team, with what applies to it")
    show.add_argument("team_id")
    listing = sub.add_parser("list", help="every team")
    for p in (show, listing):
        _common(p)
    args = parser.parse_args(argv)
    if args.verb == "list":
        data = call(args, "GET", "/v1/admin/teams/")["data"]
        print(json.dumps(data, indent=2) if args.json else table(data, TEAM_COLUMNS))
        return 0
    if args.verb == "show":
        found = call(args, "GET", f"/v1/admin/teams/{args.team_id}")
    else:
        body = _drop_none(
            {
                "name": args.name,
                "tier": args.tier,
                "limits": _limits(args),
                "budgets": _budgets(args),
                "end_user_limits": _limits(args, "end_user_"),
                "end_user_budgets": _budgets(args, "end_user_"),
                "metadata": _metadata(args.meta),
            }
        )
        if args.verb == "create":
            found = call(args, "POST", "/v1/admin/teams/", {"team_id": args.team_id, **body})
        else:
            if args.disable or args.enable:
                body["disabled"] = bool(args.disable)
            found = call(args, "PATCH", f"/v1/admin/teams/{args.team_id}", body)
    print(json.dumps(found, indent=2) if args.json else table([found], TEAM_COLUMNS))
    return 0


def keys(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sluice keys", description="API keys (admin API).")
    sub = parser.add_subparsers(dest="verb", required=True)
    create = sub.add_parser("create", help="create a key (its secret is shown once)")
    create.add_argument("--team", required=True)
    create.add_argument("--name", required=True)
    create.add_argument("--scope", action="append", help="chat, jobs, usage:read, admin, ...")
    create.add_argument("--model", action="append", help="allowed model name or glob")
    create.add_argument("--expires-in", type=int, metavar="SECONDS")
    create.add_argument("--audit-prompts", action="store_true")
    create.add_argument(
        "--api-version", metavar="YYYY-MM-DD", help="its requests' API version (default: current)"
    )
    create.add_argument("--meta", action="append", metavar="KEY=VALUE")
    _limit_options(create)
    listing = sub.add_parser("list", help="keys, of one team with --team")
    listing.add_argument("--team")
    show = sub.add_parser("show", help="one key")
    show.add_argument("key_id")
    rotate = sub.add_parser("rotate", help="a new key; the old one works for --grace seconds")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace", type=int, default=3600, metavar="SECONDS")
    revoke = sub.add_parser("revoke", help="the key stops working on every gateway at once")
    revoke.add_argument("key_id")
    for p in (create, listing, show, rotate, revoke):
        _common(p)
    args = parser.parse_args(argv)
    if args.verb == "list":
        data = call(args, "GET", "/v1/admin/keys/", query={"team_id": args.team})["data"]
        print(json.dumps(data, indent=2) if args.json else table(data, KEY_COLUMNS))
        return 0
    if args.verb == "create":
        body = _drop_none(
            {
                "team_id": args.team,
                "name": args.name,
                "scopes": args.scope,
                "model_allow": args.model,
                "expires_in_seconds": args.expires_in,
                "audit_prompts": args.audit_prompts or None,
                "api_version": args.api_version,
                "limits": _limits(args),
                "budgets": _budgets(args),
                "metadata": _metadata(args.meta),
            }
        )
        found = call(args, "POST", "/v1/admin/keys/", body)
    elif args.verb == "show":
        found = call(args, "GET", f"/v1/admin/keys/{args.key_id}")
    elif args.verb == "rotate":
        found = call(
            args, "POST", f"/v1/admin/keys/{args.key_id}/rotate", {"grace_seconds": args.grace}
        )
    else:
        found = call(args, "POST", f"/v1/admin/keys/{args.key_id}/revoke")
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(table([found], KEY_COLUMNS))
    if "secret" in found:
        print(f"\nsecret (shown once, store it now): {found['secret']}")
    return 0


def audit(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sluice audit", description="The audit trail.")
    parser.add_argument("--team")
    parser.add_argument("--key")
    parser.add_argument("--action", help="request, key.create, key.revoke, team.update, ...")
    parser.add_argument("--since", help="ISO 8601 time, e.g. 2026-01-31T00:00:00Z")
    parser.add_argument("--until")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--after", type=int, help="the cursor printed by the previous page")
    _common(parser)
    args = parser.parse_args(argv)
    page = call(
        args,
        "GET",
        "/v1/admin/audit/",
        query={
            "team_id": args.team,
            "key_id": args.key,
            "action": args.action,
            "since": args.since,
            "until": args.until,
            "limit": args.limit,
            "after": args.after,
        },
    )
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    print(table(page["data"], AUDIT_COLUMNS))
    if page.get("next_after"):
        print(f"\nmore: --after {page['next_after']}")
    return 0


def run(command: str, argv: list[str]) -> int:
    try:
        return {"teams": teams, "keys": keys, "audit": audit}[command](argv)
    except AdminError as exc:
        print(f"sluice {command}: {exc}", file=sys.stderr)
        return 1


def main_teams(argv: list[str]) -> int:
    return run("teams", argv)


def main_keys(argv: list[str]) -> int:
    return run("keys", argv)


def main_audit(argv: list[str]) -> int:
    return run("audit", argv)
