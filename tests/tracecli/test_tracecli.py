"""``sluice trace`` on synthetic span files (exact layout, orphans, lookups, errors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sluice.devtools import cli, tracecli
from sluice.spanfiles import reverse_lines

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
OTHER = "4bf92f35aaaaaaaaaaaaaaaaaaaaaaaa"  # shares an 8-digit prefix with TRACE
LATER = "0123456789abcdef0123456789abcdef"
MS = 1_000_000
T0 = 1_700_000_000_000 * MS


def span(
    trace_id: str,
    span_id: str,
    parent: str,
    name: str,
    service: str,
    start_ms: float,
    dur_ms: float,
    status: str = "UNSET",
    attrs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "trace_id": trace_id,
        "span_id": span_id,
        "parent_span_id": parent,
        "name": name,
        "kind": "INTERNAL",
        "service": service,
        "start_ns": T0 + int(start_ms * MS),
        "end_ns": T0 + int((start_ms + dur_ms) * MS),
        "status": status,
        "attributes": attrs or {},
    }


def write(state: Path, service: str, spans: list[dict[str, Any]], tail: str = "") -> None:
    path = state / "spans" / f"{service}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for s in spans:
            fh.write(json.dumps(s, separators=(",", ":")) + "\n")
        fh.write(tail)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    # Spans are written in end order per service, as the exporter does: roots last.
    write(
        tmp_path,
        "gateway",
        [
            span(
                TRACE,
                "b" * 16,
                "a" * 16,
                "sluice.v1.limiter.reserve request",
                "gateway",
                1.0,
                2.0,
                attrs={"messaging.destination.name": "sluice.v1.limiter.reserve"},
            ),
            span(OTHER, "1" * 16, "", "GET /v1/models", "gateway", -50.0, 1.0),
            span(
                TRACE,
                "a" * 16,
                "",
                "POST /v1/chat/completions",
                "gateway",
                0.0,
                120.5,
                attrs={
                    "http.route": "/v1/chat/completions",
                    "http.response.status_code": 200,
                    "gen_ai.prompt": "SECRET PROMPT TEXT",
                    "user.id": "nobody",
                },
            ),
        ],
    )
    write(
        tmp_path,
        "inference-worker",
        [
            span(
                TRACE,
                "c" * 16,
                "a" * 16,
                "sluice.v1.infer.interactive process",
                "inference-worker",
                5.0,
                100.0,
                attrs={"gen_ai.request.model": "sim-fast", "gen_ai.usage.output_tokens": 42},
            ),
            span(
                TRACE,
                "d" * 16,
                "c" * 16,
                "chat sim-fast",
                "inference-worker",
                10.0,
                80.25,
                "ERROR",
                attrs={"gen_ai.output.messages": "SECRET ANSWER", "error.type": "timeout"},
            ),
        ],
    )
    write(
        tmp_path,
        "cost-tracker",
        [
            span(
                TRACE,
                "e" * 16,
                "c" * 16,
                "sluice.v1.usage.> process",
                "cost-tracker",
                106.0,
                1.5,
                attrs={
                    "sluice.cost_usd": 0.00029,
                    "messaging.destination.name": "sluice.v1.usage.k1",
                },
            ),
            span(
                TRACE,
                "f" * 16,
                "9" * 16,
                "sluice.v1.cost.recorded process",
                "cost-tracker",
                108.0,
                0.5,
            ),
        ],
        tail='{"trace_id":"' + TRACE + '","span_id":"trunc',  # a partly written last line
    )
    return tmp_path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = tracecli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_tree_order_offsets_and_orphans(state, capsys):
    code, out, err = run(capsys, TRACE, "--state-dir", str(state))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"trace {TRACE}  6 spans, 3 services")
    assert "120.500 ms" in lines[0]
    assert lines[1].split() == [
        "SERVICE",
        "SPAN",
        "START",
        "ms",
        "DUR",
        "ms",
        "STATUS",
        "ATTRIBUTES",
    ]
    body = lines[2:]
    names = [line.split("  ", 1)[1].strip() for line in body]
    # Depth-first, children by start time; the orphan hangs under the root, marked.
    assert [n.split("  ")[0] for n in names] == [
        "POST /v1/chat/completions",
        "sluice.v1.limiter.reserve request",
        "sluice.v1.infer.interactive process",
        "chat sim-fast",
        "sluice.v1.usage.> process",
        "⤷ orphan sluice.v1.cost.recorded process",
    ]
    span_col = lines[1].index("SPAN")
    indents = [len(line[span_col:]) - len(line[span_col:].lstrip(" ")) for line in body]
    assert indents == [0, 2, 2, 4, 4, 2]

    def cells(needle: str) -> list[str]:
        return next(line for line in body if needle in line).split()

    root = cells("POST /v1/chat")
    assert root[0] == "gateway"
    assert root[3:6] == ["0.000", "120.500", "UNSET"]
    assert "http.route=/v1/chat/completions" in root
    assert "http.response.status_code=200" in root
    chat = cells("chat sim-fast")
    assert chat[0] == "inference-worker"
    assert chat[3:6] == ["10.000", "80.250", "ERROR"]
    usage = cells("sluice.v1.usage.> process")
    assert usage[:1] == ["cost-tracker"] and usage[3:5] == ["106.000", "1.500"]
    assert "sluice.cost_usd=0.00029" in usage
    assert "messaging.destination.name=sluice.v1.usage.k1" in usage
    # Never prompt or answer text, and only the chosen attribute families.
    assert "SECRET" not in out
    assert "user.id" not in out and "error.type" not in out
    assert OTHER not in out


def test_accepts_traceparent_and_unique_prefix(state, capsys):
    expected = run(capsys, TRACE, "--state-dir", str(state))[1]
    assert run(capsys, f"00-{TRACE}-{'a' * 16}-01", "--state-dir", str(state))[1] == expected
    assert run(capsys, TRACE[:12].upper(), "--state-dir", str(state))[1] == expected


def test_ambiguous_prefix_lists_candidates(state, capsys):
    code, out, err = run(capsys, TRACE[:8], "--state-dir", str(state))
    assert code == 1 and out == ""
    assert "matches 2 traces" in err and TRACE in err and OTHER in err


def test_not_found_exit_code_and_collector_hint(state, capsys, monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    code, out, err = run(capsys, "f" * 32, "--state-dir", str(state))
    assert code == 1 and out == ""
    assert f"trace {'f' * 32} not found" in err
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in err
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    code, _, err = run(capsys, "f" * 32, "--state-dir", str(state))
    assert code == 1 and "http://collector:4317" in err


def test_no_span_files(tmp_path, capsys):
    code, _, err = run(capsys, TRACE, "--state-dir", str(tmp_path / "empty"))
    assert code == 1 and "no span files" in err


@pytest.mark.parametrize("bad", ["xyz", "0" * 33, "00-short-01"])
def test_malformed_ids_are_usage_errors(state, capsys, bad):
    code, _, err = run(capsys, bad, "--state-dir", str(state))
    assert code == 2 and "not a trace id" in err


def test_needs_exactly_one_of_id_or_last(state, capsys):
    assert run(capsys, "--state-dir", str(state))[0] == 2
    assert run(capsys, TRACE, "--last", "--state-dir", str(state))[0] == 2


def test_json_output_holds_only_the_trace(state, capsys):
    code, out, _ = run(capsys, TRACE, "--json", "--state-dir", str(state))
    assert code == 0
    spans = json.loads(out)
    assert len(spans) == 6
    assert {s["trace_id"] for s in spans} == {TRACE}
    assert [s["start_ns"] for s in spans] == sorted(s["start_ns"] for s in spans)
    assert spans[0]["attributes"]["http.route"] == "/v1/chat/completions"


def test_last_is_the_latest_root(state, capsys):
    assert "POST /v1/chat/completions" in run(capsys, "--last", "--state-dir", str(state))[1]
    write(
        state, "gateway", [span(LATER, "7" * 16, "", "POST /v1/embeddings", "gateway", 500.0, 3.0)]
    )
    code, out, _ = run(capsys, "--last", "--state-dir", str(state))
    assert code == 0 and out.startswith(f"trace {LATER}  1 spans")


def test_missing_root_is_reported_and_spans_still_shown(tmp_path, capsys):
    write(
        tmp_path,
        "cost-tracker",
        [
            span(LATER, "2" * 16, "1" * 16, "late child", "cost-tracker", 20.0, 1.0),
            span(LATER, "3" * 16, "2" * 16, "grandchild", "cost-tracker", 20.5, 0.2),
            span(LATER, "4" * 16, "1" * 16, "early child", "cost-tracker", 10.0, 1.0),
        ],
    )
    code, out, _ = run(capsys, LATER, "--state-dir", str(tmp_path))
    assert code == 0
    assert "root span not found" in out
    body = out.splitlines()[3:]
    assert ["early child" in body[0], "late child" in body[1], "grandchild" in body[2]] == [
        True
    ] * 3
    # Offsets are from the earliest span when there is no root.
    assert body[0].split()[-3:] == ["0.000", "1.000", "UNSET"]


def test_only_lines_naming_the_trace_are_parsed(state, capsys, monkeypatch):
    # Pad the files with many spans of other traces: none of them may be parsed.
    noise = [
        span(f"{n:032x}", f"{n:016x}", "", "noise", "gateway", float(n), 1.0)
        for n in range(1, 2000)
    ]
    write(state, "noise", noise)
    parsed: list[bytes] = []
    real_parse = tracecli._parse

    def counting(line: bytes):
        parsed.append(line)
        return real_parse(line)

    monkeypatch.setattr(tracecli, "_parse", counting)
    assert run(capsys, TRACE, "--state-dir", str(state))[0] == 0
    # 6 spans plus the truncated line, which names the trace but does not parse.
    assert len(parsed) == 7


def test_state_dir_from_environment_and_cli_dispatch(state, capsys, monkeypatch):
    monkeypatch.setenv("SLUICE_STATE_DIR", str(state))
    assert cli.main(["trace", TRACE]) == 0
    assert "POST /v1/chat/completions" in capsys.readouterr().out


def test_reverse_reading_across_block_boundaries(state):
    path = state / "spans" / "gateway.jsonl"
    forward = [line.rstrip(b"\n") for line in path.read_bytes().splitlines() if line.strip()]
    for block in (1, 7, 64, 10_000):
        assert list(reverse_lines(path, block=block)) == forward[::-1]


def test_last_without_any_root_is_the_last_span_written(tmp_path, capsys):
    write(
        tmp_path, "cost-tracker", [span(LATER, "2" * 16, "1" * 16, "child", "cost-tracker", 1, 1)]
    )
    code, out, _ = run(capsys, "--last", "--state-dir", str(tmp_path))
    assert code == 0 and out.startswith(f"trace {LATER}  1 spans")
