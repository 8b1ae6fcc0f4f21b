"""`python -m bench routing [--data-dir DIR] [--quick] [--folds K]`: the learned router on
held-out prompts, against the simple routers, in one run.

Two-model sets (RouteLLM MMLU and GSM8K, GPT-4 strong vs Mixtral weak; contaminated prompts
dropped): k-fold, each fold's router trained on the training folds of both sets (one router, as
shipped) and scored on each set's held-out fold. Rows: ours, a random router, always-strong,
always-weak, the per-prompt oracle, a kNN router on the same embeddings (mean strong-minus-weak
label of the 50 nearest training prompts) and a logistic regression on the embeddings alone.
APGR and CPT(x%) as RouteLLM defines them (10-quantile thresholds, trapezoid area).

RouterBench (eleven models, three tasks): k-fold per task, a router with one head per model
picks per prompt the model with the best predicted score minus λ × its mean training cost; λ is
chosen on a validation part of the training folds as the cheapest whose validation score
reaches the best single model's. Reported: score and cost per query beside every single model
and the oracle, and AIQ (area under the non-decreasing convex hull of the λ sweep's
cost-quality points, over the single models' cost range).

Online learning: two tenants share a router; tenant A asks half of GSM8K, tenant B half of MMLU
(2 folds). Each gives feedback (the answer's 0/1 outcome, from the model that answered, routed
by the shared router at half strong calls) on its first N requests; the gain is its APGR on
its later requests with its correction minus with the shared router alone. Two shared routers:
"seen", trained on the other half of both sets (the shipped router's situation), and "unseen",
trained on RouterBench's GPT-4 and Mixtral columns, which hold neither workload."""

from __future__ import annotations

import argparse
import ast
import csv
import gzip
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import report
from services.model.route_features import feature_matrix
from services.model.router import TenantCorrection, fit
from services.model.train_router import (DEFAULT_DATA, HEADS, SEED, LabelledSet, default_cache,
                                         embed_cached, load_routellm)

ROUTERBENCH_TASKS = ("arc_challenge", "mbpp", "winograde")
KNN_BASELINE_K = 50
ONLINE_N = 200


# ---- RouteLLM metrics -----------------------------------------------------------------------

def curve(score: np.ndarray, strong: np.ndarray, weak: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(strong-call %, mean result) at the 10-quantile thresholds of the scores, ascending."""
    points = {(0.0, float(weak.mean()))}
    for t in np.quantile(score, np.linspace(0, 1, 11)):
        to_strong = score >= t
        points.add((100.0 * to_strong.mean(), float(np.where(to_strong, strong, weak).mean())))
    pts = sorted(points)
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def apgr(score, strong, weak) -> float:
    pct, perf = curve(score, strong, weak)
    gap = strong.mean() - weak.mean()
    return float((np.trapezoid(perf, pct / 100) - weak.mean()) / gap)


def cpt(score, strong, weak, x: float) -> float:
    """Least strong-call % whose result recovers x of the gap (linear between the points)."""
    pct, perf = curve(score, strong, weak)
    target = weak.mean() + x * (strong.mean() - weak.mean())
    for i in range(1, len(pct)):
        if perf[i] >= target:
            lo, hi = perf[i - 1], perf[i]
            share = (target - lo) / (hi - lo) if hi > lo else 1.0
            return float(pct[i - 1] + share * (pct[i] - pct[i - 1]))
    return 100.0


def folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::k] for i in range(k)]


# ---- the two-model sets -----------------------------------------------------------------------

def knn_scores(train_emb, train_labels, test_emb, k: int = KNN_BASELINE_K) -> np.ndarray:
    sims = test_emb @ train_emb.T
    idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    diff = train_labels[:, 0] - train_labels[:, 1]
    return diff[idx].mean(1)


def lr_scores(train_emb, train_labels, test_emb) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    out = []
    for h in range(2):
        lr = LogisticRegression(max_iter=3000).fit(train_emb, train_labels[:, h].astype(int))
        out.append(lr.predict_proba(test_emb)[:, 1])
    return out[0] - out[1]


def two_model(sets: list[LabelledSet], embs: list[np.ndarray], feats: list[np.ndarray],
              k: int) -> dict[str, dict[str, np.ndarray]]:
    """Held-out scores per set and router: {set: {router: (N,) score}}."""
    splits = [folds(len(s.prompts), k, SEED + i) for i, s in enumerate(sets)]
    scores = {s.name: {r: np.zeros(len(s.prompts)) for r in ("ours", "knn", "lr")} for s in sets}
    for f in range(k):
        started = time.monotonic()
        train_idx = [np.setdiff1d(np.arange(len(s.prompts)), splits[i][f]) for i, s in enumerate(sets)]
        emb = np.vstack([embs[i][t] for i, t in enumerate(train_idx)])
        fts = np.vstack([feats[i][t] for i, t in enumerate(train_idx)])
        lab = np.vstack([sets[i].labels[t] for i, t in enumerate(train_idx)])
        model = fit(emb, fts, lab, HEADS, seed=SEED + f)
        for i, s in enumerate(sets):
            test = splits[i][f]
            p = model.predict(embs[i][test], feats[i][test])
            scores[s.name]["ours"][test] = p[:, 0] - p[:, 1]
            scores[s.name]["knn"][test] = knn_scores(emb, lab, embs[i][test])
            scores[s.name]["lr"][test] = lr_scores(emb, lab, embs[i][test])
        print(f"  fold {f + 1}/{k}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return scores


def two_model_rows(sets, scores) -> tuple[list[tuple], dict]:
    rows, figures = [], {}
    rng = np.random.default_rng(SEED)
    for s in sets:
        strong, weak = s.labels[:, 0], s.labels[:, 1]
        table = {
            "ours": scores[s.name]["ours"],
            "knn (k=50)": scores[s.name]["knn"],
            "logistic on embeddings": scores[s.name]["lr"],
            "random": rng.random(len(strong)),
            "oracle": (strong - weak) + 1e-3 * rng.random(len(strong)),
        }
        for name, sc in table.items():
            rows.append((s.name, name, f"{apgr(sc, strong, weak):.3f}",
                         f"{cpt(sc, strong, weak, 0.2):.1f}", f"{cpt(sc, strong, weak, 0.5):.1f}",
                         f"{cpt(sc, strong, weak, 0.8):.1f}", ""))
        rows.append((s.name, "always-strong", "", "100", "100", "100", f"{strong.mean():.3f}"))
        rows.append((s.name, "always-weak", "", "", "", "", f"{weak.mean():.3f}"))
        ours = table["ours"]
        figures[f"{s.name}_apgr"] = round(apgr(ours, strong, weak), 4)
        figures[f"{s.name}_cpt50"] = round(cpt(ours, strong, weak, 0.5), 2)
        figures[f"{s.name}_cpt80"] = round(cpt(ours, strong, weak, 0.8), 2)
        figures[f"knn_{s.name}_apgr"] = round(apgr(table["knn (k=50)"], strong, weak), 4)
        figures[f"lr_{s.name}_apgr"] = round(apgr(table["logistic on embeddings"], strong, weak), 4)
    return rows, figures


# ---- RouterBench ------------------------------------------------------------------------------

def load_routerbench(data_dir: Path, task: str) -> LabelledSet:
    """Rows with every model's score and cost (arc_challenge has 20 rows missing one model's)."""
    csv.field_size_limit(1 << 30)
    with gzip.open(Path(data_dir) / "routerbench" / f"{task}_train.csv.gz", "rt", newline="") as fh:
        reader = csv.DictReader(fh)
        models = tuple(c for c in reader.fieldnames or () if c and "|" not in c and c not in
                       ("sample_id", "prompt", "eval_name", "oracle_model_to_route_to"))
        prompts, labels, costs = [], [], []
        for row in reader:
            try:
                score = [float(row[m]) for m in models]
                cost = [float(row[f"{m}|total_cost"]) for m in models]
            except (KeyError, ValueError):
                continue  # a missing score or cost
            try:
                parts = ast.literal_eval(row["prompt"])
                text = "\n".join(map(str, parts)) if isinstance(parts, list) else str(parts)
            except (ValueError, SyntaxError):
                text = row["prompt"]
            prompts.append(text)
            labels.append(score)
            costs.append(cost)
    return LabelledSet(task, prompts, np.array(labels, np.float32), models,
                       np.array(costs, np.float64))


def pick(pred: np.ndarray, mean_cost: np.ndarray, lam: float) -> np.ndarray:
    return np.argmax(pred - lam * mean_cost[None, :], axis=1)


LAMBDAS = np.concatenate([[0.0], np.geomspace(1, 1e5, 60)])


def aiq(points: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Area under the non-decreasing convex hull of (cost, score) points over [lo, hi], / (hi-lo)."""
    pts = sorted(points)
    hull: list[tuple[float, float]] = []
    for c, q in pts:
        if hull and q <= hull[-1][1]:
            continue  # non-decreasing: a dearer point must score more
        while len(hull) >= 2:
            (c1, q1), (c2, q2) = hull[-2], hull[-1]
            if (q2 - q1) * (c - c1) <= (q - q1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append((c, q))
    xs = np.array([lo] + [c for c, _ in hull] + [hi])
    ys = np.array([hull[0][1]] + [q for _, q in hull] + [hull[-1][1]])
    inside = (xs >= lo) & (xs <= hi)
    xs, ys = xs[inside], ys[inside]
    return float(np.trapezoid(ys, xs) / (hi - lo)) if hi > lo else float(ys.max())


def routerbench_task(data: LabelledSet, emb: np.ndarray, k: int) -> tuple[list[tuple], dict]:
    n, models = len(data.prompts), data.heads
    feats = feature_matrix(data.prompts)
    split = folds(n, k, SEED)
    chosen = np.zeros(n, dtype=int)
    sweep_choice = np.zeros((len(LAMBDAS), n), dtype=int)
    for f in range(k):
        test = split[f]
        train = np.setdiff1d(np.arange(n), test)
        rng = np.random.default_rng(SEED + f)
        val = rng.choice(train, size=max(1, len(train) // 5), replace=False)
        fit_part = np.setdiff1d(train, val)
        model = fit(emb[fit_part], feats[fit_part], data.labels[fit_part], models, seed=SEED + f)
        mean_cost = data.costs[fit_part].mean(0)
        best_single = int(np.argmax(data.labels[fit_part].mean(0)))
        p_val = model.predict(emb[val], feats[val])
        target = data.labels[val, best_single].mean()
        lam_pick = 0.0
        for lam in sorted(LAMBDAS, reverse=True):   # cheapest first
            c = pick(p_val, mean_cost, lam)
            if data.labels[val, c].mean() >= target:
                lam_pick = lam
                break
        model = fit(emb[train], feats[train], data.labels[train], models, seed=SEED + f)
        p = model.predict(emb[test], feats[test])
        chosen[test] = pick(p, data.costs[train].mean(0), lam_pick)
        for j, lam in enumerate(LAMBDAS):
            sweep_choice[j, test] = pick(p, data.costs[train].mean(0), lam)
    rows_idx = np.arange(n)
    score = float(data.labels[rows_idx, chosen].mean())
    cost = float(data.costs[rows_idx, chosen].mean())
    singles = [(m, float(data.labels[:, j].mean()), float(data.costs[:, j].mean()))
               for j, m in enumerate(models)]
    best = max(singles, key=lambda t: (t[1], -t[2]))
    sweep = [(float(data.costs[rows_idx, c].mean()), float(data.labels[rows_idx, c].mean()))
             for c in sweep_choice]
    lo, hi = min(s[2] for s in singles), max(s[2] for s in singles)
    best_pred = np.argmax(np.where(data.labels == data.labels.max(1, keepdims=True),
                                   -data.costs, -np.inf), axis=1)
    oracle = (float(data.labels.max(1).mean()), float(data.costs[rows_idx, best_pred].mean()))
    rows = [(data.name, "ours (λ from validation)", f"{score:.3f}", f"{cost * 1e6:.0f}",
             f"{aiq(sweep, lo, hi):.3f}")]
    rows += [(data.name, m.split("/")[-1], f"{q:.3f}", f"{c * 1e6:.0f}",
              f"{aiq([(c, q)], lo, hi):.3f}") for m, q, c in singles]
    rows.append((data.name, "oracle", f"{oracle[0]:.3f}", f"{oracle[1] * 1e6:.0f}", ""))
    return rows, {"score_ratio": score / best[1], "cost_ratio": cost / best[2], "best": best[0],
                  "aiq": aiq(sweep, lo, hi)}


# ---- online learning --------------------------------------------------------------------------

def tenant_gain(model, s: LabelledSet, emb, feats, stream, n_feedback: int) -> tuple[float, float, bool]:
    """(shared APGR, gain, correction adopted) of one tenant streaming `stream`: feedback on
    its first n requests (the answering model's 0/1 outcome, routed at half strong calls),
    APGR on the rest."""
    first, later = stream[:n_feedback], stream[n_feedback:]
    shared = model.predict(emb[stream], feats[stream])
    margin = shared[:, 0] - shared[:, 1]
    cut = np.median(margin[:n_feedback])
    tenant = TenantCorrection()
    for j in range(len(first)):
        head = 0 if margin[j] >= cut else 1
        tenant.add(shared[j], head, bool(s.labels[first[j], head]))
    strong, weak = s.labels[later, 0], s.labels[later, 1]
    base = shared[n_feedback:]
    adjusted = tenant.adjust(base)
    a0 = apgr(base[:, 0] - base[:, 1], strong, weak)
    a1 = apgr(adjusted[:, 0] - adjusted[:, 1], strong, weak)
    return a0, a1 - a0, bool(tenant.thetas(2))


def online(sets: list[LabelledSet], embs, feats, n_feedback: int,
           rb: list[tuple[LabelledSet, np.ndarray]]) -> tuple[list[tuple], dict]:
    """Tenant A streams GSM8K, tenant B MMLU. Shared router seen: trained on the other half of
    both sets (2 folds). Shared router unseen: trained on RouterBench's three tasks (GPT-4 and
    Mixtral-8x7B columns), which holds neither workload."""
    halves = [folds(len(s.prompts), 2, SEED + 7 + i) for i, s in enumerate(sets)]
    results: dict[tuple[str, str], list] = {}
    for f in range(2):
        train = [h[1 - f] for h in halves]
        model = fit(np.vstack([e[t] for e, t in zip(embs, train)]),
                    np.vstack([x[t] for x, t in zip(feats, train)]),
                    np.vstack([s.labels[t] for s, t in zip(sets, train)]), HEADS, seed=SEED + f)
        for i, s in enumerate(sets):
            results.setdefault((s.name, "seen"), []).append(
                tenant_gain(model, s, embs[i], feats[i], halves[i][f], n_feedback))
    columns = [(d.heads.index("gpt-4-1106-preview"), d.heads.index("mistralai/mixtral-8x7b-chat"))
               for d, _ in rb]
    model = fit(np.vstack([e for _, e in rb]),
                np.vstack([feature_matrix(d.prompts) for d, _ in rb]),
                np.vstack([d.labels[:, list(c)] for (d, _), c in zip(rb, columns)]), HEADS, seed=SEED)
    for i, s in enumerate(sets):
        for f in range(2):
            results.setdefault((s.name, "unseen"), []).append(
                tenant_gain(model, s, embs[i], feats[i], halves[i][f], n_feedback))
    rows, gains = [], {}
    for (name, kind), runs in results.items():
        base = float(np.mean([r[0] for r in runs]))
        gain = float(np.mean([r[1] for r in runs]))
        adopted = sum(r[2] for r in runs)
        rows.append((name, kind, f"{base:.3f}", f"{base + gain:.3f}", f"{gain:+.3f}",
                     f"{adopted}/{len(runs)}"))
        gains[(name, kind)] = gain
    return rows, gains


# ---- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                        help="folder in the format of shared/data/routing")
    parser.add_argument("--quick", action="store_true",
                        help="3 folds, 3,000 MMLU prompts (about a third of the time)")
    parser.add_argument("--folds", type=int, default=0, help="k of the k-fold (default 5; quick 3)")
    parser.add_argument("--feedback", type=int, default=ONLINE_N,
                        help=f"requests each simulated tenant gives feedback on (default {ONLINE_N})")
    args = parser.parse_args(argv)
    k = args.folds or (3 if args.quick else 5)
    try:
        sets = [load_routellm(args.data_dir, name) for name in ("mmlu", "gsm8k")]
    except OSError as exc:
        print(f"error: cannot read the routing data: {exc}", file=sys.stderr)
        return 2
    if args.quick:
        keep = np.sort(np.random.default_rng(SEED).permutation(len(sets[0].prompts))[:3000])
        sets[0] = LabelledSet("mmlu", [sets[0].prompts[i] for i in keep], sets[0].labels[keep], HEADS)
    import torch

    torch.set_num_threads(1)
    started = time.monotonic()
    cache = default_cache()
    embs = [embed_cached(s.prompts, cache) for s in sets]
    feats = [feature_matrix(s.prompts) for s in sets]
    print(f"two-model sets, {k}-fold ...", file=sys.stderr, flush=True)
    scores = two_model(sets, embs, feats, k)
    rows, figures = two_model_rows(sets, scores)

    print("RouterBench ...", file=sys.stderr, flush=True)
    rb_rows, rb, rb_sets = [], {}, []
    for task in ROUTERBENCH_TASKS:
        data = load_routerbench(args.data_dir, task)
        rb_sets.append((data, embed_cached(data.prompts, cache)))
        task_rows, rb[task] = routerbench_task(data, rb_sets[-1][1], k)
        rb_rows += task_rows

    print("online learning ...", file=sys.stderr, flush=True)
    online_rows, gains = online([sets[1], sets[0]], [embs[1], embs[0]], [feats[1], feats[0]],
                                args.feedback, rb_sets)
    figures.update({
        "routerbench_score_ratio": round(min(t["score_ratio"] for t in rb.values()), 4),
        "routerbench_cost_ratio": round(max(t["cost_ratio"] for t in rb.values()), 4),
        "routerbench_aiq": {t: round(v["aiq"], 4) for t, v in rb.items()},
        "routerbench_per_task": {t: {"score_ratio": round(v["score_ratio"], 4),
                                     "cost_ratio": round(v["cost_ratio"], 4), "best": v["best"]}
                                 for t, v in rb.items()},
        "online_gain_a": round(gains[("gsm8k", "seen")], 4),
        "online_gain_b": round(gains[("mmlu", "seen")], 4),
        "online_gain_a_unseen": round(gains[("gsm8k", "unseen")], 4),
        "online_gain_b_unseen": round(gains[("mmlu", "unseen")], 4),
        "online_feedback_n": args.feedback,
        "folds": k,
        "seconds": round(time.monotonic() - started, 1),
        "goals": {"mmlu_apgr": ">= 0.65", "mmlu_cpt50": "<= 25", "gsm8k_apgr": ">= 0.70",
                  "routerbench_score_ratio": ">= 1.0", "routerbench_cost_ratio": "<= 0.30",
                  "online_gain_a/b": "> 0 with N <= 200"},
    })
    print("Two-model routing (held out, RouteLLM metrics; CPT in % of strong calls)")
    report("", rows, ("set", "router", "APGR", "CPT20", "CPT50", "CPT80", "accuracy"), None)
    print()
    report("RouterBench (held out; cost in micro-dollars per query)", rb_rows,
           ("task", "router", "score", "cost", "AIQ"), None)
    print()
    report(f"Online learning (feedback on the first {args.feedback} requests of each tenant; "
           "APGR on the later ones)", online_rows,
           ("tenant's workload", "shared router trained on it", "shared APGR",
            "with its feedback", "gain", "correction adopted"), figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
