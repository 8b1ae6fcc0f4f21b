"""The trust bench's grounding section: HaluEval QA answers against their context, AUROC per
pairing of {right, right-padded} x {one-turn, multi-turn, swap} and balanced accuracy, beside
the length-only and word-overlap baselines and system 1 (which has no grounding check).

"ours" is the combiner scored out of fold (5-fold, grouped by question), since the file is the
split the shipped weights were trained on; the shipped weights' figure is shown beside it, and
on right answers in framings no training record has ("framing unseen")."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from bench.common import percentile
from services.trust import train_grounding as training
from services.trust.grounding import Combiner, GroundingCheck

GOALS = {"grounding_auroc_worst": ">= 0.90", "grounding_bacc": ">= 0.85"}
QUICK_QUESTIONS = 70
LATENCY_SAMPLE = 20
# Framings of a right answer that no training record uses: a check that learned the padding
# sentence instead of grounding fails here.
UNSEEN_FRAMINGS = ("The sources indicate that the correct response is {}.",
                   "From what I can tell, it is {}.")
_WORD = re.compile(r"[A-Za-z0-9]+")


def length_only(record: dict) -> float:
    return float(len(record["text"]))


def word_overlap(record: dict) -> float:
    """Share of the answer's words absent from the context (the README's overlap baseline)."""
    words = [w.lower() for w in _WORD.findall(record["text"])]
    context = {w.lower() for w in _WORD.findall(record["context"])}
    return sum(w not in context for w in words) / max(1, len(words))


def _quick_subset(records: list[dict]) -> list[dict]:
    order = sorted({r["question"] for r in records},
                   key=lambda q: hashlib.sha1(q.encode()).hexdigest())
    keep = set(order[:QUICK_QUESTIONS])
    return [r for r in records if r["question"] in keep]


def _reframed(records: list[dict]) -> list[dict]:
    out = []
    for record in records:
        if record["categories"][0] == "right":
            for index, framing in enumerate(UNSEEN_FRAMINGS):
                out.append(dict(record, text=framing.format(record["text"]),
                                categories=[f"reframed-{index}"], label="grounded"))
    return out


def _best_threshold_bacc(scores: np.ndarray, y: np.ndarray) -> float:
    """A baseline's balanced accuracy at its best threshold (an upper bound for it)."""
    return max(training.balanced_accuracy(scores, y, t) for t in np.unique(scores))


def evaluate(data_dir: Path, quick: bool) -> tuple[dict, list[tuple]]:
    from vfmos_runtime.embed import load_embedder

    records = training.load_records(Path(data_dir))
    if quick:
        records = _quick_subset(records)
    reframed = _reframed(records)
    cache = os.environ.get("VFM_GROUNDING_EMBED_CACHE")  # for reruns; keep it outside the repo
    embedder = load_embedder()
    vectors = training.embed_all(records + reframed, embedder.embed,
                                 Path(cache) if cache else None)
    X = training.feature_matrix(records, vectors)
    y = training.labels(records)
    categories = [r["categories"][0] for r in records]
    ours = training.out_of_fold(X, y, [r["question"] for r in records])
    shipped = Combiner.load()
    shipped_scores = shipped.score(X)
    baselines = {"length": np.array([length_only(r) for r in records]),
                 "overlap": np.array([word_overlap(r) for r in records])}
    pairs = training.pairing_aurocs(ours, categories)
    pairs_shipped = training.pairing_aurocs(shipped_scores, categories)
    pairs_base = {k: training.pairing_aurocs(v, categories) for k, v in baselines.items()}
    figures = {"grounding_auroc_worst": round(min(pairs.values()), 4),
               "grounding_bacc": round(training.balanced_accuracy(ours, y, 0.5), 4),
               "grounding_records": len(records)}
    rows = []
    for pairing, value in pairs.items():
        rows.append(("grounding", f"AUROC {pairing} (length-only "
                     f"{pairs_base['length'][pairing]:.3f}, shipped {pairs_shipped[pairing]:.3f})",
                     round(value, 4), round(pairs_base["overlap"][pairing], 4), 0.5, ""))
    worst_base = {k: min(v.values()) for k, v in pairs_base.items()}
    rows.append(("grounding", f"AUROC worst pairing (length-only {worst_base['length']:.3f})",
                 figures["grounding_auroc_worst"], round(worst_base["overlap"], 4), 0.5,
                 GOALS["grounding_auroc_worst"]))
    overlap_bacc = _best_threshold_bacc(baselines["overlap"], y)
    rows.append(("grounding", "balanced accuracy (overlap at its best threshold)",
                 figures["grounding_bacc"], round(overlap_bacc, 4), 0.5, GOALS["grounding_bacc"]))
    rows += _unseen_framing_rows(records, reframed, vectors, shipped, shipped_scores,
                                 categories, figures)
    rows += _latency_rows(records, figures, embedder.embed)
    return figures, rows


def _unseen_framing_rows(records, reframed, vectors, shipped, shipped_scores, categories,
                         figures) -> list[tuple]:
    """The shipped weights on right answers in framings no training record has."""
    X = training.feature_matrix(reframed, vectors)
    scores = np.concatenate([shipped_scores, shipped.score(X)])
    kinds = categories + [r["categories"][0] for r in reframed]
    rows = []
    for index in range(len(UNSEEN_FRAMINGS)):
        kind = f"reframed-{index}"
        keep = [i for i, k in enumerate(kinds) if k in (kind, "one-turn", "multi-turn", "swap")]
        pairs = training.pairing_aurocs(scores[keep], [kind if kinds[i] == kind else kinds[i]
                                                       for i in keep], grounded=(kind,))
        worst = min(pairs.values())
        flagged = float(np.mean(scores[[i for i, k in enumerate(kinds) if k == kind]] >= 0.5))
        figures[f"grounding_unseen_framing_{index}_auroc_worst"] = round(worst, 4)
        rows.append(("grounding", f"framing unseen {index}: worst AUROC, shipped "
                     f"({flagged:.0%} flagged)", round(worst, 4), "", "", ""))
    return rows


def _latency_rows(records: list[dict], figures: dict, embed) -> list[tuple]:
    """The whole check (embedding, tagging, combiner) on a few answers, one at a time."""
    check = GroundingCheck(embed)
    check.check(records[0]["text"], [records[0]["context"]], records[0]["question"])  # warm
    times = [check.check(r["text"], [r["context"]], r["question"]).elapsed_ms
             for r in records[:LATENCY_SAMPLE]]
    figures["grounding_p50_ms"] = round(percentile(times, 50), 1)
    return [("grounding", f"p50 ms per check ({len(times)} answers)",
             figures["grounding_p50_ms"], "", "", "")]


def main(argv: list[str] | None = None) -> int:
    from bench.trust import run_section

    return run_section("trust_grounding", "trust: grounding (HaluEval QA)", evaluate, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
