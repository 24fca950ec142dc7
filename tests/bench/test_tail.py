"""The tail section's count of admission round trips, from a gateway span file."""

from __future__ import annotations

import json
from pathlib import Path

from bench.tail import CHAT_SPAN, REFILL_SPAN, RESERVE_SPAN, round_trips, span_lines_after


def span(trace: str, name: str) -> str:
    return json.dumps({"trace_id": trace, "name": name})


def test_request_traces_with_a_limiter_round_trip_and_refills_are_counted(
    tmp_path: Path,
) -> None:
    before = [span("a", CHAT_SPAN), span("a", RESERVE_SPAN)]
    after = [
        span("b", CHAT_SPAN),
        span("b", "limiter.lease admit"),
        span("c", CHAT_SPAN),
        span("c", RESERVE_SPAN),
        span("d", REFILL_SPAN),
        span("d", RESERVE_SPAN),  # the refill's own round trip: not a request's
    ]
    path = tmp_path / "gateway.jsonl"
    path.write_text("\n".join(before) + "\n")
    offset = path.stat().st_size
    with path.open("a") as fh:
        fh.write("\n".join(after) + "\n")
    lines = span_lines_after(path, offset)
    assert len(lines) == len(after)
    row = round_trips(lines).splitlines()[-1]
    assert [cell.strip() for cell in row.strip("|").split("|")] == ["2", "1", "1"]
    assert span_lines_after(tmp_path / "missing.jsonl", 0) == []
