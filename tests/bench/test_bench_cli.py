"""``python -m bench`` options: sections to run and the quick presets (no product)."""

from __future__ import annotations

import pytest

from bench.__main__ import FULL, QUICK, SECTIONS, parse_args


def test_every_section_runs_by_default_with_the_full_figures() -> None:
    args = parse_args([])
    assert args.only == set(SECTIONS)
    assert (args.batch_jobs, args.streams, args.seconds) == (FULL[3], FULL[5], FULL[0])


def test_only_picks_sections_and_quick_shortens_what_is_not_given() -> None:
    args = parse_args(["--only", "jobs,resume,streams", "--quick", "--streams", "50"])
    assert args.only == {"jobs", "resume", "streams"}
    assert args.streams == 50
    assert (args.batch_jobs, args.stream_seconds, args.seconds) == (QUICK[3], QUICK[7], QUICK[0])


@pytest.mark.parametrize("value", ["", "jobs,nope", ","])
def test_unknown_sections_are_refused(value: str) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--only", value])


def test_span_table_times_both_tracers_and_writes_their_spans() -> None:
    from bench import spans

    text = spans.spans_table(rounds=1, spans=50)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()[2:4]}
    assert set(rows) == {"sdk", "local"}
    assert "local / sdk:" in text
