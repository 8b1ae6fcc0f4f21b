"""Train the learned checks' heads: `python -m services.trust.train [--data-dir DIR] [--out DIR]`.

Reads the dev splits in ../shared/data/trust/ and the support and materials texts as benign
sources, adds the templated prompts of services.trust.synth, and writes the heads (a few
hundred KB) to services/trust/weights/. Fixed seeds: a rerun writes the same weights."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.trust import corpus, learned, synth
from services.trust.corpus import Example, MODERATION_CATEGORIES
from services.trust.learned import LEAK_FEATURES, LinearHead, overlap_features, windows

SEED = 20261201
BENIGN_LIMIT = 1500          # tickets / KB docs used as benign text (a deterministic sample)
TASK_REQUEST_LIMIT = 600     # GSM8K + MMLU prompts among the injection head's benign requests
# Default operating points, chosen on training rows' out-of-fold scores (policies override):
MODERATION_FPR = 0.03        # of the moderation set's safe texts flagged
LOOKALIKE_FPR = 0.05         # of harmless look-alike requests (XSTest safe, templated) refused
# The moderation gate (learned.ModerationCheck.check_answer): an answer's window skips the
# encoder where the n-gram head alone scores it under the gate's cut. The cut is the largest
# that, out of fold, lets at most these shares of the moderation set's harmful texts, and of
# the texts the full head flags, skip the encoder.
GATE_SKIPPED_HARMFUL = 0.05
GATE_SKIPPED_FLAGGED = 0.002


@dataclass
class Task:
    """One head's training set: texts, labels, split groups, and the texts' embeddings."""

    examples: list[Example]
    vectors: np.ndarray
    grams: object = None
    kw: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def y(self) -> np.ndarray:
        return np.array([e.label for e in self.examples], dtype=np.int64)

    @property
    def groups(self) -> np.ndarray:
        return np.array([f"{e.source}:{e.group or e.text}" for e in self.examples])

    @property
    def sources(self) -> np.ndarray:
        return np.array([e.source for e in self.examples])

    def featurize(self, features: learned.Features) -> "Task":
        texts = [e.text for e in self.examples]
        self.vectors, self.grams, self.kw = features.batch(texts, self.vectors)
        return self

    def subset(self, index: np.ndarray) -> "Task":
        return Task([self.examples[i] for i in index], self.vectors[index],
                    self.grams[index], self.kw[index], self.meta)


# fitting
def _folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold
    k = max(2, min(k, int(min(np.bincount(y, minlength=2)))))
    return list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
                .split(np.zeros(len(y)), y, groups))


def _fit_base(task: Task, index, seed: int, use_hash: bool, c_vec: float, alpha_hash: float,
              use_vec: bool = True):
    """Logistic regression on the embedding; on the n-grams, logistic loss by SGD (liblinear
    takes ~10 s a fit on 16k sparse features on a shared core, SGD under one, same AUPRC)."""
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    y = task.y[index]
    vec_model = hash_model = None
    if use_vec:
        vec_model = LogisticRegression(C=c_vec, class_weight="balanced", max_iter=2000)
        vec_model.fit(task.vectors[index], y)
    if use_hash:
        hash_model = SGDClassifier(loss="log_loss", alpha=alpha_hash, max_iter=30, tol=None,
                                   class_weight="balanced", random_state=seed)
        hash_model.fit(task.grams[index], y)
    return vec_model, hash_model


def _base_logits(models, task: Task, index) -> np.ndarray:
    vec_model, hash_model = models
    cols = []
    if vec_model is not None:
        cols.append(vec_model.decision_function(task.vectors[index]))
    if hash_model is not None:
        cols.append(hash_model.decision_function(task.grams[index]))
    return np.column_stack(cols)


def fit_head(task: Task, index: np.ndarray | None = None, *, seed: int = SEED, use_hash=True,
             use_kw=True, c_vec: float = 1.0, alpha_hash: float = 1e-4,
             inner: int = 3, use_vec: bool = True) -> tuple[LinearHead, np.ndarray]:
    """A head fitted on task[index], and its out-of-fold probabilities on those rows (for
    choosing thresholds on training data only). The stacker is fitted on out-of-fold logits,
    which makes it the head's Platt calibration. `use_vec=False`: an n-gram head, which
    reads no embedding (the moderation gate)."""
    from sklearn.linear_model import LogisticRegression
    index = np.arange(len(task.examples)) if index is None else np.asarray(index)
    y = task.y[index]
    oof = np.zeros((len(index), int(use_vec) + int(use_hash)))
    for train, test in _folds(y, task.groups[index], inner, seed):
        models = _fit_base(task, index[train], seed, use_hash, c_vec, alpha_hash, use_vec)
        oof[test] = _base_logits(models, task, index[test])
    stack_x = np.hstack([oof, task.kw[index]]) if use_kw else oof
    stacker = LogisticRegression(C=1.0, max_iter=2000)  # the data's own prior: calibrated
    stacker.fit(stack_x, y)
    vec_model, hash_model = _fit_base(task, index, seed, use_hash, c_vec, alpha_hash, use_vec)
    head = LinearHead(w_vec=None if vec_model is None else vec_model.coef_[0].astype(np.float32),
                      b_vec=0.0 if vec_model is None else float(vec_model.intercept_[0]),
                      stack=stacker.coef_[0].astype(np.float64),
                      bias=float(stacker.intercept_[0]),
                      w_hash=None if hash_model is None else hash_model.coef_[0].astype(np.float32),
                      b_hash=0.0 if hash_model is None else float(hash_model.intercept_[0]),
                      keywords=use_kw)
    return head, stacker.predict_proba(stack_x)[:, 1]


def fit_gate(task: Task, index: np.ndarray, full_oof: np.ndarray, threshold: float,
             evaluated: np.ndarray) -> tuple[LinearHead, float]:
    """The moderation gate, an n-gram head fitted on task[index] with its cut as threshold,
    and the lowest moderation threshold a policy may set for the gate to serve it: the lowest
    at which the gate still lets at most GATE_SKIPPED_FLAGGED of the full head's flags skip
    the encoder. `full_oof`: the full head's out-of-fold scores on those rows; `evaluated`:
    which of them are the moderation set's."""
    gate, oof = fit_head(task, index, use_vec=False)
    y = task.y[index]
    harmful = oof[evaluated & (y == 1)]

    def skipped_flags(cut: float, t: float) -> float:
        flags = oof[evaluated & (full_oof >= t)]
        return float(np.mean(flags < cut)) if len(flags) else 0.0
    cut = 0.0
    for g in np.round(np.arange(0.01, 0.51, 0.01), 2):
        if np.mean(harmful < g) > GATE_SKIPPED_HARMFUL or \
                skipped_flags(g, threshold) > GATE_SKIPPED_FLAGGED:
            break
        cut = float(g)
    floor = threshold
    for t in np.round(np.arange(np.floor(threshold * 100) / 100, 0.0, -0.01), 2):
        if t <= cut or skipped_flags(cut, t) > GATE_SKIPPED_FLAGGED:
            break
        floor = min(floor, float(t))
    gate.threshold = cut
    return gate, floor


def threshold_at_fpr(scores: np.ndarray, y: np.ndarray, fpr: float) -> float:
    """The lowest threshold whose false-positive rate on the negatives stays within `fpr`."""
    neg = np.sort(scores[y == 0])[::-1]
    if len(neg) == 0:
        return 0.5
    allowed = int(np.floor(fpr * len(neg)))
    return float(neg[allowed] + 1e-9) if allowed < len(neg) else float(neg[-1])


def threshold_max_f1(scores: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import precision_recall_curve
    p, r, t = precision_recall_curve(y, scores)
    f1 = 2 * p * r / np.maximum(p + r, 1e-12)
    return float(t[int(np.argmax(f1[:-1]))]) if len(t) else 0.5


# task assembly
def dedup_clusters(vectors: np.ndarray, sim: float = 0.92) -> np.ndarray:
    """Near-duplicate attacks share a group, so no split puts one copy on each side."""
    parent = list(range(len(vectors)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    close = np.argwhere(np.triu(vectors @ vectors.T, 1) > sim)
    for i, j in close:
        parent[find(i)] = find(j)
    return np.array([find(i) for i in range(len(vectors))])


@dataclass
class Sources:
    """Every text the heads learn from, read once, embedded once (through the cache)."""

    data_dir: Path
    cache: corpus.VectorCache
    benign_limit: int | None = BENIGN_LIMIT

    def __post_init__(self):
        d = self.data_dir
        self.moderation = corpus.moderation(d)
        self.xstest = corpus.xstest(d)
        self.attacks = corpus.injections(d)
        self.leaks = corpus.prompt_leaks(d)
        self.bipia = corpus.bipia(d)
        self.tickets = corpus.tickets(d, self.benign_limit)
        self.kb = corpus.kb_docs(d, self.benign_limit)
        self.abstracts = corpus.abstracts(d, self.benign_limit)
        self.task_requests = corpus.task_requests(d, TASK_REQUEST_LIMIT)
        self.tasks = [Example(t, 0, "synthetic") for t in synth.task_requests()
                      + synth.account_help()]
        self.harmful = [Example(t, 1, "synthetic", f"harm:{c}") for t, c in synth.harmful_requests()]
        self.lookalike = [Example(t, 0, "synthetic", f"safe:{c}")
                          for t, c in synth.benign_lookalikes()]
        self.direct = [Example(t, 1, "synthetic", "direct") for t in synth.direct_attacks()]
        self.injected = [Example(t, 1, "synthetic", "injected") for t in synth.injected_instructions()]
        # A template can coincide with a benchmark prompt ("What is identity theft?"): such
        # prompts are dropped, so no evaluated text is trained on as a templated one.
        taken = {e.text.lower().strip() for e in self.xstest + self.attacks + self.moderation}
        for name in ("harmful", "lookalike", "direct", "injected", "tasks"):
            setattr(self, name, [e for e in getattr(self, name)
                                 if e.text.lower().strip() not in taken])
        focus = {r["id"]: (r.get("focus") or r["id"])
                 for r in corpus.read_jsonl(Path(d) / "xstest_dev.jsonl")}
        for e in self.xstest:  # contrast pairs share their trigger word: keep them together
            e.group = focus.get(e.group, e.group)
        vecs = self.cache.embed([e.text for e in self.attacks])
        for e, c in zip(self.attacks, dedup_clusters(vecs)):
            e.group = f"cluster{c}"

    def task(self, examples: list[Example], features: learned.Features) -> Task:
        vectors = self.cache.embed([e.text for e in examples])
        return Task(list(examples), vectors).featurize(features)


def harmful_examples(s: Sources) -> list[Example]:
    """Requests for serious harm vs everything a guard must let through. The moderation set's
    toxic texts are not requests, so they are left out rather than called either."""
    benign_mod = [e for e in s.moderation if e.label == 0]
    return s.xstest + s.harmful + s.lookalike + s.tickets + benign_mod + s.kb[:500]


def moderation_examples(s: Sources) -> list[Example]:
    extra = [Example(e.text, 0, e.source, e.group) for e in s.tickets[:500] + s.kb[:500]]
    return s.moderation + extra


ANSWER_PROSE_LIMIT = 1500    # benign sentence windows the moderation gate also learns from


def gate_examples(s: Sources) -> list[Example]:
    """The moderation gate's rows: moderation_examples (first, in the same order), then
    benign prose cut as an answer is read (`answer_windows` of the KB and the abstracts,
    source "prose_windows"). The moderation set has few short plain sentences, so a gate
    without them found "Certainly!" uncertain and sent a fifth of benign answer windows to
    the encoder. The full head does not train on them: they cost its AUPRC 0.01."""
    prose = [Example(piece, 0, "prose_windows", e.group) for e in s.kb + s.abstracts
             for piece in dict.fromkeys(learned.answer_windows(e.text))]
    return moderation_examples(s) + corpus.sample(prose, ANSWER_PROSE_LIMIT, lambda e: e.text)


def injection_examples(s: Sources) -> list[Example]:
    """Attacks vs ordinary prompts, harmful or not (a harmful request is no injection), and
    plain work in the attacks' imperative voice (write, summarise, translate)."""
    requests = s.xstest + s.moderation + s.harmful + s.lookalike
    return (s.attacks + s.direct + _relabel(requests, 0) + s.tickets + s.task_requests
            + s.tasks)


def _relabel(examples: list[Example], label: int) -> list[Example]:
    return [Example(e.text, label, e.source, e.group, e.extra) for e in examples]


def window_examples(docs: list[Example]) -> list[Example]:
    """Each document cut into windows; in a poisoned document only the windows that hold part
    of the attack are positives (the rest is the clean email around it)."""
    out, seen = [], set()
    for doc in docs:
        attack = doc.extra.get("attack", "") if doc.label else ""
        key = learned._norm(attack)[:40]
        for piece in windows(doc.text):
            positive = bool(key) and (key[:20] in learned._norm(piece)
                                      or learned._norm(piece)[:20] in learned._norm(attack))
            group = doc.group if positive else f"{doc.source}:{doc.extra.get('context_id') or doc.group}"
            if (piece, positive, group) not in seen:  # a clean email recurs in 15 poisoned ones
                seen.add((piece, positive, group))
                out.append(Example(piece, int(positive), doc.source, group))
    return out


def indirect_docs(s: Sources) -> list[Example]:
    return s.bipia + s.kb + s.abstracts


def indirect_windows(s: Sources, docs: list[Example]) -> list[Example]:
    return window_examples(docs) + s.injected


def doc_scale(window_logits: list[np.ndarray], y: np.ndarray) -> tuple[float, float]:
    """Platt scaling of a document's worst window logit to the document's label."""
    from sklearn.linear_model import LogisticRegression
    worst = np.array([[w.max()] for w in window_logits])
    model = LogisticRegression(C=1.0, max_iter=1000).fit(worst, y)
    return float(model.coef_[0][0]), float(model.intercept_[0])


def leak_matrix(examples: list[Example], head_logits: np.ndarray) -> np.ndarray:
    return np.array([[z, *overlap_features(e.text, e.extra["access_code"])]
                     for e, z in zip(examples, head_logits)])


def fit_leak(task: Task, index: np.ndarray, seed: int = SEED):
    """The output head (out-of-fold logits) and the stacker over [head logit, overlaps]."""
    from sklearn.linear_model import LogisticRegression
    head, oof = fit_head(task, index, seed=seed, use_kw=False, alpha_hash=1e-3)
    z = np.log(np.clip(oof, 1e-6, 1 - 1e-6) / np.clip(1 - oof, 1e-6, 1))
    x = leak_matrix([task.examples[i] for i in index], z)
    stacker = LogisticRegression(C=1.0, max_iter=2000).fit(x, task.y[index])
    coef = np.concatenate([stacker.coef_[0], stacker.intercept_])
    return head, coef


def train(data_dir: Path, out: Path, embedder, benign_limit: int | None = BENIGN_LIMIT,
          log=print) -> dict:
    started = time.monotonic()
    cache = corpus.VectorCache(embedder)
    s = Sources(Path(data_dir), cache, benign_limit)
    features = learned.Features()
    heads: dict[str, LinearHead] = {}
    thresholds: dict[str, float] = {}

    mod = s.task(moderation_examples(s), features)
    heads["moderation"], oof = fit_head(mod)
    is_mod = mod.sources == "moderation"
    thresholds["moderation"] = threshold_at_fpr(oof[is_mod], mod.y[is_mod], MODERATION_FPR)
    gated = s.task(gate_examples(s), features)
    full_oof = np.concatenate([oof, np.zeros(len(gated.examples) - len(mod.examples))])
    heads["moderation_gate"], gate_floor = fit_gate(gated, np.arange(len(gated.examples)),
                                                    full_oof, thresholds["moderation"],
                                                    gated.sources == "moderation")
    thresholds["moderation_gate"] = heads["moderation_gate"].threshold
    for cat in MODERATION_CATEGORIES:
        cat_task = s.task([Example(e.text, int(cat in e.extra["categories"]), "moderation", e.group)
                           for e in s.moderation], features)
        heads[f"moderation/{cat}"], _ = fit_head(cat_task, use_hash=False, use_kw=False)
    log(f"moderation heads: {time.monotonic() - started:.0f} s")

    harm = s.task(harmful_examples(s), features)
    heads["harmful_request"], oof = fit_head(harm)
    lookalikes = np.isin(harm.sources, ["xstest", "synthetic"])
    thresholds["harmful_request"] = threshold_at_fpr(oof[lookalikes], harm.y[lookalikes],
                                                     LOOKALIKE_FPR)

    inj = s.task(injection_examples(s), features)
    heads["injection"], oof = fit_head(inj)
    thresholds["injection"] = threshold_at_fpr(oof, inj.y, 0.01)
    log(f"request and injection heads: {time.monotonic() - started:.0f} s")

    docs = indirect_docs(s)
    win = s.task(indirect_windows(s, docs), features)
    heads["indirect_injection"], _ = fit_head(win)
    doc_logits = [heads["indirect_injection"].logits(*features.batch(
        pieces := windows(d.text), cache.embed(pieces))) for d in docs]
    y_docs = np.array([d.label for d in docs])
    a, b = doc_scale(doc_logits, y_docs)
    doc_scores = learned.sigmoid(a * np.array([w.max() for w in doc_logits]) + b)
    thresholds["indirect_injection"] = threshold_at_fpr(doc_scores, y_docs, 0.01)

    leak = s.task(s.leaks, features)
    heads["leak"], leak_coef = fit_leak(leak, np.arange(len(s.leaks)))
    thresholds["leak"] = 0.5
    for name, head in heads.items():
        head.threshold = thresholds.get(name, 0.5)
    log(f"indirect and leak heads: {time.monotonic() - started:.0f} s")

    meta = {"dim": int(mod.vectors.shape[1]), "embedder": getattr(embedder, "name", ""),
            "heads": sorted(heads), "categories": list(MODERATION_CATEGORIES),
            "thresholds": {k: round(v, 6) for k, v in thresholds.items()},
            "hash_features": learned.HASH_FEATURES, "hash_ngrams": list(learned.HASH_NGRAMS),
            "hash_word_ngrams": list(learned.HASH_WORD_NGRAMS),
            "window_words": learned.WINDOW_WORDS, "leak_features": list(LEAK_FEATURES),
            "seed": SEED, "benign_limit": benign_limit,
            "moderation_gate_floor": round(gate_floor, 6),
            "training_rows": {"moderation": len(mod.examples), "moderation_gate": len(gated.examples),
                              "harmful_request": len(harm.examples),
                              "injection": len(inj.examples), "indirect_windows": len(win.examples),
                              "leak": len(leak.examples)}}
    learned.save(out, heads, {"indirect_injection.doc_scale": np.array([a, b]),
                              "leak.coef": leak_coef}, meta)
    return meta


def digest(directory: Path) -> str:
    return hashlib.sha256((directory / "heads.npz").read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.trust.train", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=corpus.DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=learned.WEIGHTS_DIR)
    parser.add_argument("--benign-limit", type=int, default=BENIGN_LIMIT)
    args = parser.parse_args(argv)
    if not (args.data_dir / "moderation_dev.jsonl.gz").exists():
        print(f"error: no trust data in {args.data_dir} (want moderation_dev.jsonl.gz etc.)",
              file=sys.stderr)
        return 2
    from vfmos_runtime.embed import TransformerEmbedder
    # float32, which every CPU computes alike (the daemons use bfloat16 where it is native;
    # the heads' figures move by at most 0.004 between the two)
    meta = train(args.data_dir, args.out, TransformerEmbedder(dtype="float32"),
                 args.benign_limit)
    print(json.dumps({"out": str(args.out), "thresholds": meta["thresholds"],
                      "sha256": digest(args.out)}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
