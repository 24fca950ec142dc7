"""``bench/semcache.py``'s threshold rule and data loading, on pairs made here (the real
labelled pairs take minutes to embed: ``python -m bench.semcache``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import semcache
from bench.semcache import Scored, choose, data_dir, read_pairs


def scored(rows: list[tuple[float, int, str]]) -> Scored:
    return Scored(
        np.array([r[0] for r in rows]),
        np.array([r[1] for r in rows]),
        np.array([r[2] for r in rows]),
    )


def test_the_lowest_threshold_from_which_precision_stays_high() -> None:
    rows = [(0.995, 1, "spider-dev")] * 19 + [(0.991, 0, "spider-dev")]
    rows += [(0.990, 1, "spider-dev")] * 5 + [(0.95, 0, "spider-dev")] * 10
    # Precision stays >= 0.95 down to 0.951 (24 of 25 from 0.990); at 0.950 it falls.
    assert choose(scored(rows), None) == 0.951


def test_a_lucky_step_below_a_bad_one_does_not_count() -> None:
    # At 0.997 one false hit alone (precision 0); below it enough true hits to lift
    # precision again: the rule stops at the first bad step from the top.
    rows = [(0.997, 0, "spider-dev")] + [(0.99, 1, "spider-dev")] * 50
    assert choose(scored(rows), None) is None


def test_sources_narrow_the_rule() -> None:
    rows = [(0.999, 0, "paws-wiki"), (0.999, 1, "paws-wiki")]
    rows += [(0.98, 1, "spider-dev")] * 30 + [(0.97, 0, "ambignq-dev")] * 5
    assert choose(scored(rows), None) is None
    assert choose(scored(rows), semcache.QUESTION_LIKE) == 0.971


def test_pairs_are_read_from_the_shared_folder_or_the_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(semcache.DATA_ENV, raising=False)
    assert data_dir() == semcache.REPO.parent / "shared" / "data" / "semcache"
    monkeypatch.setenv(semcache.DATA_ENV, str(tmp_path))
    assert data_dir() == tmp_path
    (tmp_path / "pairs-dev.tsv").write_text(
        "source\tid\tlabel\ttext_a\ttext_b\n"
        'spider-dev\tdb:pos-1-2\t1\tHow many "singers"?\tCount the singers.\n',
        encoding="utf-8",
    )
    (pair,) = read_pairs(tmp_path / "pairs-dev.tsv")
    assert (pair.source, pair.label, pair.a, pair.b) == (
        "spider-dev",
        1,
        'How many "singers"?',
        "Count the singers.",
    )
