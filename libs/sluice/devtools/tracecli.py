"""``sluice trace``: one request's spans, read from the local span files, as a tree.

Spans are read from ``<state_dir>/spans/*.jsonl`` (written by
``sluice.telemetry.JsonLinesSpanProcessor`` when no OTLP endpoint is set). Files are
streamed line by line, and a line is parsed only when it contains the wanted trace id
(or prefix) as plain text, so large files cost little more than reading them.

    sluice trace 4bf92f3577b34da6a3ce929d0e0e4736
    sluice trace 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01   # a traceparent
    sluice trace 4bf92f35                                                  # a unique prefix
    sluice trace --last [--json] [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sluice.spanfiles import reverse_lines
from sluice.telemetry import spans_dir

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2

_HEX = re.compile(r"^[0-9a-f]+$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
# Attributes worth a glance; anything that could hold prompt or answer text is left out.
_ATTR_PREFIXES = ("gen_ai.", "http.", "sluice.")
_ATTR_EXACT = frozenset({"messaging.destination.name"})
_TEXT_MARKERS = ("prompt", "completion", "messages", "content", "instructions", "text", "body")
_MAX_ATTR_CHARS = 60


class TraceCliError(Exception):
    """A user-facing failure: message for stderr, and the exit code."""

    def __init__(self, message: str, code: int = EXIT_NOT_FOUND) -> None:
        super().__init__(message)
        self.code = code


# Identity, not field, equality: spans link to each other and can repeat their fields.
@dataclass(eq=False)
class SpanRecord:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    service: str
    start_ns: int
    end_ns: int
    status: str
    attributes: dict[str, Any]
    raw: dict[str, Any]
    children: list[SpanRecord] = field(default_factory=list)
    orphan: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpanRecord:
        start = int(d.get("start_ns") or 0)
        return cls(
            trace_id=str(d.get("trace_id", "")),
            span_id=str(d.get("span_id", "")),
            parent_span_id=str(d.get("parent_span_id") or ""),
            name=str(d.get("name", "")),
            kind=str(d.get("kind", "")),
            service=str(d.get("service", "")),
            start_ns=start,
            end_ns=int(d.get("end_ns") or start),
            status=str(d.get("status", "UNSET")),
            attributes=dict(d.get("attributes") or {}),
            raw=d,
        )

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


# --- reading ------------------------------------------------------------------------


def span_files(state_dir: Path) -> list[Path]:
    directory = spans_dir(state_dir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.jsonl") if p.is_file())


def _lines(files: list[Path]) -> Iterator[bytes]:
    for path in files:
        try:
            with path.open("rb") as fh:
                yield from fh
        except OSError:
            continue  # a file rotated away between listing and opening


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None  # a partly written last line, or not ours
    return value if isinstance(value, dict) else None


def normalize_trace_id(text: str) -> str:
    """A full trace id, a traceparent, or a prefix, as lowercase hex."""
    value = text.strip().lower()
    match = _TRACEPARENT.match(value)
    if match:
        return match.group(1)
    if not value or len(value) > 32 or not _HEX.match(value):
        raise TraceCliError(
            f"not a trace id: {text!r} (expected up to 32 hex digits or a traceparent)",
            EXIT_USAGE,
        )
    return value


def find_spans(files: list[Path], trace_id: str) -> list[SpanRecord]:
    """Spans of the trace ``trace_id`` (full id or unique prefix).

    A line is parsed only if it contains the id as text: for a full id almost no other
    line does, so parsing cost follows the size of the trace, not of the files.
    """
    needle = trace_id.encode()
    full = len(trace_id) == 32
    by_trace: dict[str, list[SpanRecord]] = {}
    for line in _lines(files):
        if needle not in line:
            continue
        d = _parse(line)
        if d is None:
            continue
        tid = str(d.get("trace_id", ""))
        if (tid == trace_id) if full else tid.startswith(trace_id):
            by_trace.setdefault(tid, []).append(SpanRecord.from_dict(d))
    if len(by_trace) > 1:
        shown = ", ".join(sorted(by_trace)[:5])
        raise TraceCliError(
            f"trace id prefix {trace_id!r} matches {len(by_trace)} traces: {shown}"
            + (", ..." if len(by_trace) > 5 else "")
        )
    return next(iter(by_trace.values()), [])


def last_trace_id(files: list[Path]) -> str | None:
    """The trace whose root span finished last; without any root, the trace of the last
    span written.

    A root span ends after its children, and exporters append spans as they end, so the
    last root line of each file is found by reading that file backwards: the cost does
    not grow with the file.
    """
    best: tuple[int, str] | None = None
    newest: tuple[float, str] | None = None
    for path in files:
        last_written: str | None = None
        try:
            for line in reverse_lines(path):
                d = _parse(line)
                if d is None or not d.get("trace_id"):
                    continue
                last_written = last_written or str(d["trace_id"])
                if not d.get("parent_span_id"):
                    key = (int(d.get("end_ns") or d.get("start_ns") or 0), str(d["trace_id"]))
                    best = key if best is None or key > best else best
                    break
            mtime = path.stat().st_mtime
        except OSError:
            continue  # a file rotated away between listing and reading
        if last_written is not None and (newest is None or mtime > newest[0]):
            newest = (mtime, last_written)
    if best is not None:
        return best[1]
    return newest[1] if newest is not None else None


# --- the tree -----------------------------------------------------------------------


@dataclass
class TraceTree:
    root: SpanRecord | None
    # Top-level spans when the root is missing (the root's process has not flushed yet).
    tops: list[SpanRecord]
    spans: list[SpanRecord]

    @property
    def origin_ns(self) -> int:
        if self.root is not None:
            return self.root.start_ns
        return min(s.start_ns for s in self.spans)


def build_tree(spans: list[SpanRecord]) -> TraceTree:
    """Link spans parent to child. The earliest root is the trace's root; spans whose
    parent was not found (and any other root) hang under it, marked as orphans."""
    ordered = sorted(spans, key=lambda s: (s.start_ns, s.span_id))
    by_id = {s.span_id: s for s in ordered}
    roots = [s for s in ordered if not s.parent_span_id]
    root = roots[0] if roots else None
    loose: list[SpanRecord] = []
    for span in ordered:
        if span is root:
            continue
        parent = by_id.get(span.parent_span_id) if span.parent_span_id else None
        if parent is not None and parent is not span:
            parent.children.append(span)
        else:
            span.orphan = True
            loose.append(span)
    # Spans whose parent chain never reaches a top (a cycle in a corrupt file) would
    # vanish from the output: show them as orphans too.
    reached: set[int] = set()
    stack = [root] if root is not None else list(loose)
    while stack:
        span = stack.pop()
        if id(span) not in reached:
            reached.add(id(span))
            stack.extend(span.children)
    for span in ordered:
        if id(span) not in reached and span not in loose:
            span.orphan = True
            loose.append(span)
    if root is not None:
        root.children.extend(s for s in loose if s not in root.children)
        root.children.sort(key=lambda s: (s.start_ns, s.span_id))
        return TraceTree(root, [root], ordered)
    return TraceTree(None, loose, ordered)


def key_attributes(attributes: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key in sorted(attributes):
        if not (key in _ATTR_EXACT or key.startswith(_ATTR_PREFIXES)):
            continue
        if any(marker in key.lower() for marker in _TEXT_MARKERS):
            continue
        value = attributes[key]
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        if len(text) > _MAX_ATTR_CHARS:
            text = text[: _MAX_ATTR_CHARS - 1] + "…"
        out.append((key, text))
    return out


def render(tree: TraceTree, trace_id: str) -> str:
    rows: list[tuple[str, str, str, str, str, str]] = []
    # Guards against parent cycles in corrupt files, which would otherwise recurse forever.
    seen: set[int] = set()

    def walk(span: SpanRecord, depth: int) -> None:
        if id(span) in seen:
            return
        seen.add(id(span))
        marker = "⤷ orphan " if span.orphan else ""
        attrs = " ".join(f"{k}={v}" for k, v in key_attributes(span.attributes))
        # A link names another trace to read (a lease admission: the lease's grant).
        for link in span.raw.get("links") or ():
            attrs += f" link={link.get('trace_id', '')}"
        rows.append(
            (
                span.service or "?",
                "  " * depth + marker + span.name,
                f"{(span.start_ns - tree.origin_ns) / 1e6:.3f}",
                f"{span.duration_ms:.3f}",
                span.status,
                attrs,
            )
        )
        for child in sorted(span.children, key=lambda s: (s.start_ns, s.span_id)):
            walk(child, depth + 1)

    for top in tree.tops:
        walk(top, 0)

    services = sorted({s.service for s in tree.spans if s.service})
    end = max(s.end_ns for s in tree.spans)
    header = (
        f"trace {trace_id}  {len(tree.spans)} spans, {len(services)} services "
        f"({', '.join(services)}), {(end - tree.origin_ns) / 1e6:.3f} ms"
    )
    lines = [header]
    if tree.root is None:
        lines.append("(root span not found: its process may not have flushed yet)")
    titles = ("SERVICE", "SPAN", "START ms", "DUR ms", "STATUS", "ATTRIBUTES")
    widths = [max(len(r[i]) for r in [titles, *rows]) for i in range(5)]
    right = {2, 3}

    def fmt(row: tuple[str, ...]) -> str:
        cells = [
            row[i].rjust(widths[i]) if i in right else row[i].ljust(widths[i]) for i in range(5)
        ]
        return "  ".join([*cells, row[5]]).rstrip()

    lines.append(fmt(titles))
    lines.extend(fmt(r) for r in rows)
    return "\n".join(lines) + "\n"


def render_json(tree: TraceTree) -> str:
    return json.dumps([s.raw for s in tree.spans], indent=2) + "\n"


# --- command ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice trace",
        description="Print one request's spans, from the local span files, as a tree.",
    )
    parser.add_argument(
        "trace_id", nargs="?", help="trace id, traceparent, or a unique prefix of a trace id"
    )
    parser.add_argument("--last", action="store_true", help="show the most recent trace")
    parser.add_argument("--json", action="store_true", help="print the spans as JSON")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("SLUICE_STATE_DIR", ".sluice")),
        help="Sluice state directory (default: $SLUICE_STATE_DIR or .sluice)",
    )
    return parser


def _not_found_hint() -> str:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint:
        return (
            f"\nOTEL_EXPORTER_OTLP_ENDPOINT is set ({endpoint}): services export spans to "
            "that collector instead of local files; look the trace up there."
        )
    return ""


def run(args: argparse.Namespace) -> str:
    if bool(args.trace_id) == bool(args.last):
        raise TraceCliError("give a trace id or --last (one of them)", EXIT_USAGE)
    files = span_files(args.state_dir)
    if not files:
        raise TraceCliError(f"no span files in {spans_dir(args.state_dir)}" + _not_found_hint())
    if args.last:
        found = last_trace_id(files)
        if found is None:
            raise TraceCliError(f"no spans in {spans_dir(args.state_dir)}" + _not_found_hint())
        trace_id = found
    else:
        trace_id = normalize_trace_id(args.trace_id)
    spans = find_spans(files, trace_id)
    if not spans:
        raise TraceCliError(
            f"trace {trace_id} not found in {spans_dir(args.state_dir)}" + _not_found_hint()
        )
    tree = build_tree(spans)
    if args.json:
        return render_json(tree)
    return render(tree, spans[0].trace_id)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        output = run(args)
    except TraceCliError as exc:
        sys.stderr.write(f"sluice trace: {exc}\n")
        return exc.code
    sys.stdout.write(output)
    return EXIT_OK
