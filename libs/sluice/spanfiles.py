"""Reading the local span files (``<state_dir>/spans/*.jsonl``, one JSON object a line,
written by ``sluice.telemetry.JsonLinesSpanProcessor`` when no OTLP endpoint is set).

``sluice trace`` and the gateway's console both read them: a trace's spans (a line is
parsed only when it names the trace id as text) and the recent spans that carry an
attribute (read backwards from each file's end, so the cost follows the window asked
for, not the file). Blocking file I/O: callers on an event loop run these in a thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from sluice.telemetry import spans_dir


def span_files(state_dir: Path) -> list[Path]:
    directory = spans_dir(state_dir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.jsonl") if p.is_file())


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None  # a partly written last line, or not ours
    return value if isinstance(value, dict) else None


def trace_spans(files: list[Path], trace_id: str) -> list[dict[str, Any]]:
    """Every span of the trace ``trace_id`` (32 lowercase hex digits)."""
    needle = trace_id.encode()
    found: list[dict[str, Any]] = []
    for path in files:
        try:
            with path.open("rb") as fh:
                for line in fh:
                    if needle not in line:
                        continue
                    span = _parse(line)
                    if span is not None and span.get("trace_id") == trace_id:
                        found.append(span)
        except OSError:
            continue  # a file rotated away between listing and opening
    return found


def reverse_lines(
    path: Path, limit_bytes: int | None = None, block: int = 64 * 1024
) -> Iterator[bytes]:
    """The lines of ``path``, last first, reading blocks from its end; at most
    ``limit_bytes`` of it when given."""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        pos = fh.tell()
        floor = 0 if limit_bytes is None else max(0, pos - limit_bytes)
        rest = b""
        while pos > floor:
            step = min(block, pos - floor)
            pos -= step
            fh.seek(pos)
            chunk = fh.read(step) + rest
            lines = chunk.split(b"\n")
            rest = lines.pop(0)  # may be cut: completed by the next block
            for line in reversed(lines):
                if line.strip():
                    yield line
        if pos == 0 and rest.strip():
            yield rest


def recent_spans(
    files: list[Path], marker: str, since_ns: int, *, limit_bytes: int = 8 * 1024 * 1024
) -> list[dict[str, Any]]:
    """Spans that ended at or after ``since_ns`` and whose line holds ``marker`` as text
    (an attribute's name), from the last ``limit_bytes`` of each file."""
    needle = marker.encode()
    found: list[dict[str, Any]] = []
    for path in files:
        try:
            for line in reverse_lines(path, limit_bytes):
                if needle not in line:
                    continue
                span = _parse(line)
                if span is None:
                    continue
                if int(span.get("end_ns") or 0) < since_ns:
                    # Spans are appended as they end: older ones only from here on.
                    break
                found.append(span)
        except OSError:
            continue
    return found
