"""``sluice usage``: where the money goes, as a table (or ``--json``), from the gateway's
``GET /v1/usage`` with an API key: the same view, and the same rule for who reads what,
as any client (a key reads its own team; a key with ``usage:read`` every team).

    sluice usage                                  # this month, by key and model
    sluice usage --since 2026-12-01 --group-by day,model
    sluice usage --group-by tag --tag eval --json

The key is ``--key``, else ``SLUICE_API_KEY``, else the local dev key
(``<state>/dev-key``); the gateway is ``--url``, else ``SLUICE_GATEWAY_URL``, else where
the local settings put it (``SLUICE_GATEWAY_HOST``/``PORT``, 127.0.0.1:8080), as for
``sluice teams``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sluice.devtools.admin import default_url

AMOUNT_COLUMNS = (
    ("requests", "requests"),
    ("input_tokens", "input"),
    ("output_tokens", "output"),
    ("cache_hits", "cache hits"),
    ("cost_usd", "cost USD"),
    ("saved_usd", "saved USD"),
)
GROUP_COLUMNS = {
    "key": "key_id",
    "team": "team_id",
    "end_user": "end_user",
    "model": "model",
    "provider": "provider",
    "tag": "tag",
    "day": "day",
    "hour": "hour",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice usage",
        description="Cost, tokens, requests and cache savings from the gateway (GET /v1/usage).",
    )
    parser.add_argument("--url", help="the gateway (default $SLUICE_GATEWAY_URL, else local)")
    parser.add_argument("--key", help="API key (default $SLUICE_API_KEY, else <state>/dev-key)")
    parser.add_argument(
        "--state-dir", type=Path, default=Path(os.environ.get("SLUICE_STATE_DIR", ".sluice"))
    )
    parser.add_argument(
        "--since",
        help="RFC 3339 time or date, inclusive (default: the start of this UTC month)",
    )
    parser.add_argument("--until", help="RFC 3339 time or date, exclusive (default: now)")
    parser.add_argument(
        "--all-time", action="store_true", help="no lower bound (ignores the default --since)"
    )
    parser.add_argument(
        "--group-by",
        default="key,model",
        help="comma-separated: key, team, end_user, model, provider, tag, day, hour",
    )
    for name in ("key-id", "team-id", "model", "provider", "end-user", "tag"):
        parser.add_argument(f"--{name}", help=f"only this {name.replace('-', ' ')}")
    parser.add_argument("--limit", type=int, help="rows at most (1-10000; default 1000)")
    parser.add_argument("--json", action="store_true", help="print the answer as it came")
    return parser


def _key(args: argparse.Namespace) -> str:
    if args.key:
        return str(args.key)
    env = os.environ.get("SLUICE_API_KEY")
    if env:
        return env
    path: Path = args.state_dir / "dev-key"
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    raise SystemExit(f"no API key: pass --key, set SLUICE_API_KEY, or run `sluice up` ({path})")


def query_of(args: argparse.Namespace, now: datetime | None = None) -> dict[str, str]:
    params: dict[str, str] = {"group_by": args.group_by}
    since = args.since
    if since is None and not args.all_time:
        moment = now or datetime.now(tz=UTC)
        since = moment.strftime("%Y-%m-01")
    if since:
        params["since"] = since
    if args.until:
        params["until"] = args.until
    for name in ("key_id", "team_id", "model", "provider", "end_user", "tag"):
        value = getattr(args, name)
        if value:
            params[name] = value
    if args.limit is not None:
        params["limit"] = str(args.limit)
    return params


def render(answer: dict[str, Any]) -> str:
    groups = list(answer.get("group_by") or [])
    headers = [GROUP_COLUMNS.get(g, g) for g in groups] + [h for _, h in AMOUNT_COLUMNS]
    rows = [
        [str(row.get(GROUP_COLUMNS.get(g, g), "")) or "-" for g in groups]
        + [str(row[f]) for f, _ in AMOUNT_COLUMNS]
        for row in answer.get("data", [])
    ]
    totals = answer["totals"]
    rows.append(
        ["total"] + [""] * (len(groups) - 1) + [str(totals[f]) for f, _ in AMOUNT_COLUMNS]
        if groups
        else [str(totals[f]) for f, _ in AMOUNT_COLUMNS]
    )
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for i, row in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
        cells = [
            c.ljust(w) if j < len(groups) else c.rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
    span = f"{answer.get('since') or 'the start'} to {answer.get('until') or 'now'}"
    scope = f"team {answer['team_id']}" if answer.get("team_id") else "every team"
    footer = f"{scope}, {span}"
    if answer.get("has_more"):
        footer += "; more rows than shown (raise --limit or narrow the range)"
    return "\n".join([*lines, footer])


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    base = (args.url or default_url()).rstrip("/")
    url = f"{base}/v1/usage?{urllib.parse.urlencode(query_of(args))}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {_key(args)}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            answer = json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        try:
            problem = json.loads(exc.read())
            print(f"{exc.code} {problem.get('code')}: {problem.get('detail')}", file=sys.stderr)
        except ValueError:
            print(f"{exc.code} from {base}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"the gateway at {base} did not answer ({exc})", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2) if args.json else render(answer))
    return 0
