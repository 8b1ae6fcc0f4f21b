"""`python -m services.trust.train_grounding [--data-dir DIR]`: trains the grounding check's
combiner on the HaluEval dev split, reports grouped cross-validation figures per pairing, and
writes the weights trained on all dev data to services/trust/weights/grounding.npz."""

from __future__ import annotations

import argparse
import gzip
import json
import pickle
import sys
from pathlib import Path

import numpy as np

from services.trust.grounding import (FEATURES, SIGNS, WEIGHTS, Combiner, entity_offsets, features,
                                      load_tagger, texts_to_embed)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "trust"
GROUNDED = ("right", "right-padded")
UNSUPPORTED = ("one-turn", "multi-turn", "swap")
FOLDS = 5
C = 1.0  # logistic regression's inverse regularisation; not tuned per item


def load_records(data_dir: Path) -> list[dict]:
    path = Path(data_dir) / "grounding_dev.jsonl.gz"
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def embed_all(records: list[dict], embed, cache: Path | None = None) -> dict[str, np.ndarray]:
    """One batch for every text the features need (a pickle cache outside the repo, if given)."""
    texts = sorted({t for r in records for t in texts_to_embed(r["text"], [r["context"]],
                                                                r["question"])})
    known: dict[str, np.ndarray] = {}
    if cache and cache.exists():
        known = pickle.loads(cache.read_bytes())
    missing = [t for t in texts if t not in known]
    if missing:
        known.update(zip(missing, embed(missing)))
        if cache:
            cache.write_bytes(pickle.dumps(known))
    return known


def feature_matrix(records: list[dict], vectors: dict[str, np.ndarray], nlp=None) -> np.ndarray:
    nlp = nlp or load_tagger()
    docs = nlp.pipe([r["text"] for r in records], batch_size=64)
    rows = [features(r["text"], [r["context"]], r["question"], vectors, entity_offsets(doc))
            for r, doc in zip(records, docs)]
    return np.array([[row[name] for name in FEATURES] for row in rows], dtype=np.float64)


def labels(records: list[dict]) -> np.ndarray:
    return np.array([r["label"] == "hallucinated" for r in records])


def fit(X: np.ndarray, y: np.ndarray) -> Combiner:
    """Class-balanced L2 logistic regression on standardised features, each weight held to
    its sign in SIGNS (L-BFGS-B with bounds)."""
    from scipy.optimize import minimize

    mean, scale = X.mean(0), X.std(0)
    scale[scale == 0] = 1.0
    Z = (X - mean) / scale
    target = y.astype(np.float64)
    weight = np.where(y, 0.5 / max(1, y.sum()), 0.5 / max(1, (~y).sum())) * len(y)

    def loss(params):
        w, b = params[:-1], params[-1]
        margin = Z @ w + b
        p = 1.0 / (1.0 + np.exp(-margin))
        # log(1 + e^m) - y m, stable
        nll = np.sum(weight * (np.logaddexp(0, margin) - target * margin))
        grad = Z.T @ (weight * (p - target))
        return nll + 0.5 / C * w @ w, np.append(grad + w / C, np.sum(weight * (p - target)))

    bounds = [(0, None) if SIGNS.get(n) == 1 else (None, 0) if SIGNS.get(n) == -1 else
              (None, None) for n in FEATURES] + [(None, None)]
    result = minimize(loss, np.zeros(len(FEATURES) + 1), jac=True, method="L-BFGS-B",
                      bounds=bounds, options={"maxiter": 5000})
    return Combiner(mean, scale, result.x[:-1], float(result.x[-1]), threshold=0.5)


def out_of_fold(X: np.ndarray, y: np.ndarray, groups: list[str]) -> np.ndarray:
    """Scores from combiners that never saw the record's question (grouped k-fold)."""
    from sklearn.model_selection import GroupKFold

    scores = np.zeros(len(y))
    for train, test in GroupKFold(FOLDS).split(X, y, groups):
        scores[test] = fit(X[train], y[train]).score(X[test])
    return scores


def pairing_aurocs(scores: np.ndarray, categories: list[str],
                   grounded: tuple[str, ...] = GROUNDED) -> dict[str, float]:
    """AUROC of the "unsupported" score for each {grounded kind} x {unsupported kind}."""
    from sklearn.metrics import roc_auc_score

    kinds = np.array(categories)
    out = {}
    for good in grounded:
        for bad in UNSUPPORTED:
            mask = (kinds == good) | (kinds == bad)
            if mask.any() and len(set(kinds[mask])) == 2:
                out[f"{good}/{bad}"] = float(roc_auc_score(kinds[mask] == bad, scores[mask]))
    return out


def balanced_accuracy(scores: np.ndarray, y: np.ndarray, threshold: float) -> float:
    flagged = scores >= threshold
    return float((flagged[y].mean() + (~flagged[~y]).mean()) / 2)


def save(combiner: Combiner, path: Path = WEIGHTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, features=np.array(FEATURES), mean=combiner.mean.astype(np.float32),
             scale=combiner.scale.astype(np.float32), coef=combiner.coef.astype(np.float32),
             intercept=np.float32(combiner.intercept), threshold=np.float32(combiner.threshold))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.trust.train_grounding",
                                     description=__doc__)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default=str(WEIGHTS))
    parser.add_argument("--cache", help="pickle of embeddings to reuse (keep it outside the repo)")
    args = parser.parse_args(argv)
    from vfmos_runtime.embed import load_embedder

    records = load_records(Path(args.data_dir))
    vectors = embed_all(records, load_embedder().embed, Path(args.cache) if args.cache else None)
    X, y = feature_matrix(records, vectors), labels(records)
    categories = [r["categories"][0] for r in records]
    scores = out_of_fold(X, y, [r["question"] for r in records])
    for pairing, value in pairing_aurocs(scores, categories).items():
        print(f"cv AUROC {pairing:<26} {value:.3f}")
    worst = min(pairing_aurocs(scores, categories).values())
    print(f"cv worst pairing AUROC {worst:.3f}, balanced accuracy "
          f"{balanced_accuracy(scores, y, 0.5):.3f} ({FOLDS}-fold grouped by question)")
    combiner = fit(X, y)
    save(combiner, Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
