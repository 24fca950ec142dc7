"""The OpenAPI document's guard: a committed snapshot per API version
(``docs/openapi/<version>.json``) and the changes between two documents that would break
a client written against the older one.

Not additive, so a new API version (``services/gateway/domain/versions.py``): a path or
an operation removed; a parameter removed, newly required, or added as required; a
request body newly required; a response status or media type removed; in a schema, a
property removed, a type changed, an enum value removed, a request property newly
required or a response property no longer required. Anything else (a new path,
operation, optional parameter, property, response) is additive.

    python -m services.gateway.handlers.http.openapi write [DIR]   refresh the current
        version's snapshot (``make openapi``); refuses a breaking change to an existing one
    python -m services.gateway.handlers.http.openapi check [DIR]   fail on a breaking change
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from services.gateway.domain.versions import VERSIONS

SNAPSHOTS = Path(__file__).resolve().parents[4] / "docs" / "openapi"
# Real responses per operation and per error code (`make openapi-examples`,
# scripts/openapi_examples.py), merged into the document the gateway serves.
EXAMPLES = Path(__file__).resolve().with_name("openapi_examples.json")
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

Doc = Mapping[str, Any]


def snapshot_path(version: str, folder: Path = SNAPSHOTS) -> Path:
    return folder / f"{version}.json"


def dumps(document: Doc) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def current_document() -> dict[str, Any]:
    """The document's contract: the routes' declarations without the examples (which
    change with every capture and promise nothing). Imported here so that the
    comparison alone needs no app."""
    from services.gateway.handlers.http.application import openapi_document

    return openapi_document()


def load_examples(path: Path = EXAMPLES) -> dict[str, Any]:
    if not path.exists():
        return {}
    data: dict[str, Any] = orjson.loads(path.read_bytes())
    return data


def _operations(document: Doc) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in document.get("paths", {}).values():
        for method in METHODS:
            op = item.get(method)
            if isinstance(op, dict) and op.get("operationId"):
                out[op["operationId"]] = op
    return out


def with_api_version(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with the ``Sluice-Version`` request header declared on every
    operation and echoed on every response (the edge handles both, so no route
    declares them)."""
    supported = ", ".join(VERSIONS.supported())
    parameter = {
        "name": "Sluice-Version",
        "in": "header",
        "required": False,
        "description": "The API version to answer in (YYYY-MM-DD); without it, the "
        f"key's own. Served: {supported}. Another is a 400 unsupported_api_version.",
        "schema": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
    }
    header = {
        "description": "The API version this answer follows. A deprecated version's "
        "answers also carry Deprecation (RFC 9745) and Sunset (RFC 8594).",
        "schema": {"type": "string"},
    }
    for op in _operations(document).values():
        params = op.setdefault("parameters", [])
        if not any(p.get("name") == "Sluice-Version" for p in params):
            params.append(dict(parameter))
        for response in op.get("responses", {}).values():
            response.setdefault("headers", {})["sluice-version"] = dict(header)
    return document


def _example(op: dict[str, Any], status: int, media: str, name: str, example: Any) -> None:
    response = op.setdefault("responses", {}).setdefault(
        str(status), {"description": "See the example."}
    )
    content = response.setdefault("content", {}).setdefault(media, {})
    content.setdefault("examples", {})[name] = example


def with_examples(document: dict[str, Any], examples: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` with each captured example on its operation: the request body's,
    the response's under its status and media type, and each error code's problem
    under its status (``application/problem+json``; Anthropic's error body on
    ``createMessage``)."""
    ops = _operations(document)
    for op_id, entries in examples.get("operations", {}).items():
        op = ops.get(op_id)
        if op is None:
            continue
        for entry in entries:
            if "request" in entry:
                body = op.setdefault("requestBody", {"content": {}})
                media = body.setdefault("content", {}).setdefault("application/json", {})
                media.setdefault("examples", {})[entry["name"]] = {
                    "summary": entry["summary"],
                    "value": entry["request"],
                }
            _example(
                op,
                entry["status"],
                entry["media_type"],
                entry["name"],
                {"summary": entry["summary"], "value": entry["value"]},
            )
    for code, entry in examples.get("errors", {}).items():
        op = ops.get(entry["operation"])
        if op is None:
            continue
        _example(
            op,
            entry["status"],
            entry["media_type"],
            code,
            {"summary": f"{code} ({entry['status']})", "value": entry["value"]},
        )
    return document


class _Schemas:
    """Both documents' components, to follow ``$ref``s."""

    def __init__(self, old: Doc, new: Doc) -> None:
        self.old = old.get("components", {}).get("schemas", {})
        self.new = new.get("components", {}).get("schemas", {})

    @staticmethod
    def _resolve(schema: Any, table: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
        if not isinstance(schema, Mapping):
            return {}, ""
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            return table.get(name, {}), name
        return schema, ""

    def compare(
        self, old: Any, new: Any, where: str, *, request: bool, out: list[str], seen: set[str]
    ) -> None:
        old_s, old_ref = self._resolve(old, self.old)
        new_s, new_ref = self._resolve(new, self.new)
        if old_ref or new_ref:
            pair = f"{old_ref}>{new_ref}:{request}"
            if pair in seen:
                return
            seen = seen | {pair}
        if not old_s:
            return  # the old one promised nothing
        if not new_s:
            out.append(f"{where}: schema removed")
            return
        old_type, new_type = old_s.get("type"), new_s.get("type")
        if old_type is not None and new_type is not None:
            olds = set(old_type) if isinstance(old_type, list) else {old_type}
            news = set(new_type) if isinstance(new_type, list) else {new_type}
            # A request may accept more types; a response may return fewer.
            if (request and not olds <= news) or (not request and not news <= olds):
                out.append(f"{where}: type {sorted(olds)} became {sorted(news)}")
        if "enum" in old_s:
            gone = [v for v in old_s["enum"] if v not in new_s.get("enum", old_s["enum"])]
            if gone:
                out.append(f"{where}: enum values {gone} removed")
        old_props = old_s.get("properties", {}) or {}
        new_props = new_s.get("properties", {}) or {}
        for name, sub in old_props.items():
            if name not in new_props:
                out.append(f"{where}.{name}: property removed")
            else:
                self.compare(
                    sub, new_props[name], f"{where}.{name}", request=request, out=out, seen=seen
                )
        old_req = set(old_s.get("required", []) or [])
        new_req = set(new_s.get("required", []) or [])
        if request:
            for name in sorted(new_req - old_req):
                out.append(f"{where}.{name}: newly required")
        else:
            for name in sorted(old_req - new_req):
                if name in new_props:
                    out.append(f"{where}.{name}: no longer always present")
        if "items" in old_s:
            self.compare(
                old_s["items"],
                new_s.get("items"),
                f"{where}[]",
                request=request,
                out=out,
                seen=seen,
            )
        for key in ("allOf", "anyOf", "oneOf"):
            for i, (a, b) in enumerate(zip(old_s.get(key, []), new_s.get(key, []), strict=False)):
                self.compare(a, b, f"{where}.{key}[{i}]", request=request, out=out, seen=seen)


def _params(op: Mapping[str, Any]) -> dict[tuple[str, str], Mapping[str, Any]]:
    return {(p.get("in", ""), p.get("name", "")): p for p in op.get("parameters", []) or []}


def _operation(
    schemas: _Schemas, old: Mapping[str, Any], new: Mapping[str, Any], where: str, out: list[str]
) -> None:
    old_params, new_params = _params(old), _params(new)
    for key, param in old_params.items():
        label = f"{where} parameter {key[1]} ({key[0]})"
        if key not in new_params:
            out.append(f"{label}: removed")
            continue
        if new_params[key].get("required") and not param.get("required"):
            out.append(f"{label}: newly required")
        schemas.compare(
            param.get("schema"),
            new_params[key].get("schema"),
            label,
            request=True,
            out=out,
            seen=set(),
        )
    for key, param in new_params.items():
        if key not in old_params and param.get("required"):
            out.append(f"{where} parameter {key[1]} ({key[0]}): added as required")
    old_body, new_body = old.get("requestBody") or {}, new.get("requestBody") or {}
    if new_body.get("required") and not old_body.get("required"):
        out.append(f"{where} request body: newly required")
    for media, content in (old_body.get("content") or {}).items():
        new_content = (new_body.get("content") or {}).get(media)
        if new_content is None:
            out.append(f"{where} request body {media}: no longer accepted")
            continue
        schemas.compare(
            content.get("schema"),
            new_content.get("schema"),
            f"{where} body",
            request=True,
            out=out,
            seen=set(),
        )
    new_responses = new.get("responses") or {}
    for status, response in (old.get("responses") or {}).items():
        if status not in new_responses:
            out.append(f"{where} response {status}: removed")
            continue
        new_content = new_responses[status].get("content") or {}
        for media, content in (response.get("content") or {}).items():
            if media not in new_content:
                out.append(f"{where} response {status} {media}: removed")
                continue
            schemas.compare(
                content.get("schema"),
                new_content[media].get("schema"),
                f"{where} response {status}",
                request=False,
                out=out,
                seen=set(),
            )


def breaking_changes(old: Doc, new: Doc) -> list[str]:
    """What in ``new`` breaks a client of ``old`` (empty: ``new`` is additive)."""
    out: list[str] = []
    schemas = _Schemas(old, new)
    new_paths = new.get("paths", {})
    for path, item in old.get("paths", {}).items():
        if path not in new_paths:
            out.append(f"{path}: path removed")
            continue
        for method in METHODS:
            if method not in item:
                continue
            where = f"{method.upper()} {path}"
            if method not in new_paths[path]:
                out.append(f"{where}: operation removed")
                continue
            _operation(schemas, item[method], new_paths[path][method], where, out)
    return out


def _say(text: str, stream: Any = None) -> None:
    (stream or sys.stdout).write(text + "\n")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("write", "check"):
        _say(__doc__ or "")
        return 2
    folder = Path(argv[1]) if len(argv) > 1 else SNAPSHOTS
    version = VERSIONS.current.name
    path = snapshot_path(version, folder)
    document = current_document()
    breaking: list[str] = []
    if path.exists():
        breaking = breaking_changes(orjson.loads(path.read_bytes()), document)
    if breaking:
        _say(f"The OpenAPI document breaks API version {version}:", sys.stderr)
        for line in breaking:
            _say(f"  {line}", sys.stderr)
        _say(
            "Declare a new version in services/gateway/domain/versions.py (and deprecate "
            "this one), then run `make openapi` to snapshot it.",
            sys.stderr,
        )
        return 1
    if argv[0] == "write":
        folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(dumps(document))
        _say(f"wrote {path.name}")
    elif not path.exists():
        _say(f"No snapshot for API version {version}: run `make openapi`.", sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
