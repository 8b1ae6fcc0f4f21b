"""The learned router's domain: predict each model's chance of a good answer from a prompt, and
turn a process's target (quality, cost budget, first-token SLO, allowed models) into a choice.

A `QualityModel` has one *head* per kind of model it was trained on ("strong" and "weak" from
RouteLLM's GPT-4/Mixtral labels; RouterBench's eleven models in the bench). Each head's
probability is the mean of three predictors over the prompt's MiniLM embedding and its cheap
features (`route_features`): a logistic regression, a small two-layer network trained on all
heads at once, and the labels of the prompt's nearest training prompts. The registry says which
head stands for which physical model. Pure numpy at inference; training (scikit-learn, torch)
is imported only by `fit` (and scikit-learn's AUC by a tenant's correction)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vfmos_runtime.errors import InvalidArgument, NotFound

KNN_K = 50          # neighbours whose labels vote (measured on MMLU/GSM8K dev: 20 < 50 ≈ 100)
KNN_PRIOR = 5.0     # pseudo-count of the head's mean accuracy in the vote
LR_C = 0.3          # logistic regression's inverse regularisation
MLP_HIDDEN = 128
MLP_EPOCHS = 10
MLP_DROPOUT = 0.2
MLP_WEIGHT_DECAY = 1e-3
MLP_LR = 1e-3


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


@dataclass
class QualityModel:
    heads: tuple[str, ...]
    feat_mean: np.ndarray            # (F,)
    feat_std: np.ndarray             # (F,)
    lr_w: np.ndarray                 # (H, D)
    lr_b: np.ndarray                 # (H,)
    mlp_w1: np.ndarray               # (D, hidden)
    mlp_b1: np.ndarray
    mlp_w2: np.ndarray               # (hidden, H)
    mlp_b2: np.ndarray
    keys: np.ndarray                 # (N, E) float32 unit embeddings of the training prompts
    labels: np.ndarray               # (N, H) 0/1, NaN where a head has no label
    prior: np.ndarray                # (H,) each head's mean accuracy in training

    def scaled(self, feats: np.ndarray) -> np.ndarray:
        return ((np.asarray(feats, np.float32) - self.feat_mean) / self.feat_std).astype(np.float32)

    def inputs(self, emb: np.ndarray, feats: np.ndarray) -> np.ndarray:
        return np.hstack([np.asarray(emb, np.float32), self.scaled(feats)]).astype(np.float32)

    def predict(self, emb: np.ndarray, feats: np.ndarray) -> np.ndarray:
        """(n, H) probabilities that each head's model answers each prompt well."""
        z = self.inputs(emb, feats)
        p_lr = _sigmoid(z @ self.lr_w.T + self.lr_b)
        hidden = z @ self.mlp_w1 + self.mlp_b1
        hidden = 0.5 * hidden * (1.0 + np.tanh(0.7978845608 * (hidden + 0.044715 * hidden ** 3)))
        p_mlp = _sigmoid(hidden @ self.mlp_w2 + self.mlp_b2)
        return (p_lr + p_mlp + self._knn(np.asarray(emb, np.float32))) / 3.0

    def _knn(self, emb: np.ndarray) -> np.ndarray:
        sims = emb @ self.keys.T
        k = min(KNN_K, sims.shape[1])
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        votes = self.labels[idx]                            # (n, k, H)
        known = ~np.isnan(votes)
        hits = np.where(known, votes, 0.0).sum(1)
        return (hits + KNN_PRIOR * self.prior) / (known.sum(1) + KNN_PRIOR)

    def head(self, name: str) -> int:
        try:
            return self.heads.index(name)
        except ValueError:
            raise NotFound(f"the router has no head {name!r}; it has {', '.join(self.heads)}")

    def save(self, path: Path) -> None:
        # Training keys are stored as int8 (unit vectors, one scale): a quarter of the size.
        scale = float(np.abs(self.keys).max()) or 1.0
        np.savez_compressed(
            path, heads=np.array(self.heads), feat_mean=self.feat_mean, feat_std=self.feat_std,
            lr_w=self.lr_w, lr_b=self.lr_b, mlp_w1=self.mlp_w1, mlp_b1=self.mlp_b1,
            mlp_w2=self.mlp_w2, mlp_b2=self.mlp_b2, prior=self.prior,
            keys_q=np.round(self.keys / scale * 127).astype(np.int8), keys_scale=scale,
            labels=np.where(np.isnan(self.labels), -1, self.labels).astype(np.int8))

    @classmethod
    def load(cls, path: Path) -> "QualityModel":
        with np.load(path) as data:
            labels = data["labels"].astype(np.float32)
            labels[labels < 0] = np.nan
            keys = data["keys_q"].astype(np.float32) * (float(data["keys_scale"]) / 127)
            keys /= np.linalg.norm(keys, axis=1, keepdims=True).clip(1e-9)
            return cls(heads=tuple(str(h) for h in data["heads"]),
                       feat_mean=data["feat_mean"], feat_std=data["feat_std"],
                       lr_w=data["lr_w"], lr_b=data["lr_b"], mlp_w1=data["mlp_w1"],
                       mlp_b1=data["mlp_b1"], mlp_w2=data["mlp_w2"], mlp_b2=data["mlp_b2"],
                       keys=keys, labels=labels, prior=data["prior"])


def fit(emb: np.ndarray, feats: np.ndarray, labels: np.ndarray, heads: tuple[str, ...],
        seed: int = 0) -> QualityModel:
    """Train the three predictors on prompts (embeddings, cheap features) and their 0/1 labels
    per head (NaN: no label). Deterministic for a seed on a given machine."""
    import torch
    from sklearn.linear_model import LogisticRegression

    emb = np.asarray(emb, np.float32)
    labels = np.asarray(labels, np.float32)
    if len(emb) < 10 or labels.shape != (len(emb), len(heads)):
        raise InvalidArgument("the router needs at least 10 labelled prompts, one label per head")
    feats = np.asarray(feats, np.float32)
    mean = feats.mean(0)
    std = feats.std(0) + 1e-6
    model = QualityModel(heads=tuple(heads), feat_mean=mean, feat_std=std,
                         lr_w=np.zeros((len(heads), emb.shape[1] + feats.shape[1]), np.float32),
                         lr_b=np.zeros(len(heads), np.float32), mlp_w1=None, mlp_b1=None,
                         mlp_w2=None, mlp_b2=None, keys=emb, labels=labels,
                         prior=np.nanmean(labels, axis=0).astype(np.float32))
    z = model.inputs(emb, feats)
    for h in range(len(heads)):
        known = ~np.isnan(labels[:, h])
        y = labels[known, h].astype(int)
        if len(set(y)) < 2:              # a head always right (or wrong) in training
            model.lr_b[h] = math.log((y.mean() + 1e-3) / (1 - y.mean() + 1e-3))
            continue
        lr = LogisticRegression(C=LR_C, max_iter=3000).fit(z[known], y)
        model.lr_w[h] = lr.coef_[0]
        model.lr_b[h] = lr.intercept_[0]

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(z.shape[1], MLP_HIDDEN), torch.nn.GELU(approximate="tanh"),
                              torch.nn.Dropout(MLP_DROPOUT), torch.nn.Linear(MLP_HIDDEN, len(heads)))
    opt = torch.optim.AdamW(net.parameters(), lr=MLP_LR, weight_decay=MLP_WEIGHT_DECAY)
    x_t = torch.from_numpy(z)
    y_t = torch.from_numpy(np.nan_to_num(labels, nan=0.0))
    m_t = torch.from_numpy((~np.isnan(labels)).astype(np.float32))
    for _ in range(MLP_EPOCHS):
        perm = torch.randperm(len(x_t), generator=gen)
        for start in range(0, len(perm), 64):
            b = perm[start:start + 64]
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                net(x_t[b]), y_t[b], weight=m_t[b], reduction="sum") / m_t[b].sum().clamp(min=1)
            loss.backward()
            opt.step()
    first, last = net[0], net[3]
    model.mlp_w1 = first.weight.detach().numpy().T.copy()
    model.mlp_b1 = first.bias.detach().numpy().copy()
    model.mlp_w2 = last.weight.detach().numpy().T.copy()
    model.mlp_b2 = last.bias.detach().numpy().copy()
    return model


# ---- per-tenant correction -------------------------------------------------------------------

TENANT_MAX = 4096       # feedback entries kept per tenant (oldest dropped first)
TENANT_MIN = 20         # a head's feedback entries before its correction is considered
TENANT_L2 = 0.01        # ridge toward "no correction"
TENANT_FOLDS = 5
TENANT_MIN_GAIN = 0.03  # held-out AUC a correction must add (on 4 of 5 folds) to be used


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def _recalibration(u: np.ndarray, y: np.ndarray, base: np.ndarray) -> np.ndarray:
    """θ of logit' = base + u·θ, by Newton's method on the ridge-penalised log-loss."""
    theta = np.zeros(u.shape[1])
    for _ in range(25):
        p = _sigmoid(base + u @ theta)
        grad = u.T @ (p - y) / len(y) + TENANT_L2 * theta
        hess = (u.T * (p * (1 - p))) @ u / len(y) + TENANT_L2 * np.eye(len(theta))
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-6:
            break
    return theta


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@dataclass
class TenantCorrection:
    """A tenant's feedback on top of the shared model. Each entry holds the shared model's
    probabilities for the prompt, the head whose model answered and whether the answer was
    good. Per head, a ridge logistic recalibration (logit' = logit + θ·[logits of every head,
    1]) is fitted to the tenant's outcomes, and used only while it ranks the tenant's held-out
    feedback clearly better than the shared model does (k-fold AUC): a tenant whose workload the
    shared model already knows keeps the shared model. (Measured by `bench routing`: richer
    corrections, on the cheap features or the tenant's nearest prompts, fitted 200 labels'
    noise and lowered APGR.)"""

    rows: list[np.ndarray] = field(default_factory=list)     # the shared probabilities
    heads: list[int] = field(default_factory=list)
    outcomes: list[float] = field(default_factory=list)
    asks: list[str] = field(default_factory=list)            # whose judgement each entry is
    _thetas: dict | None = field(default=None, repr=False)

    def add(self, shared: np.ndarray, head: int, good: bool, ask_id: str = "") -> None:
        """A judged answer; a second judgement of the same Ask replaces the first."""
        self._thetas = None
        if ask_id and ask_id in self.asks:
            self.outcomes[self.asks.index(ask_id)] = 1.0 if good else 0.0
            return
        self.rows.append(np.asarray(shared, np.float32))
        self.heads.append(int(head))
        self.outcomes.append(1.0 if good else 0.0)
        self.asks.append(ask_id)
        if len(self.rows) > TENANT_MAX:
            for seq in (self.rows, self.heads, self.outcomes, self.asks):
                del seq[0]

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def _design(shared: np.ndarray) -> np.ndarray:
        return np.hstack([_logit(shared), np.ones((len(shared), 1))])

    def thetas(self, n_heads: int) -> dict[int, np.ndarray]:
        """Per head, the adopted recalibration (absent: the shared model stands)."""
        if self._thetas is not None:
            return self._thetas
        from sklearn.metrics import roc_auc_score

        self._thetas = {}
        if not self.rows:
            return self._thetas
        shared = np.stack(self.rows).astype(np.float64)[:, :n_heads]
        heads, y = np.asarray(self.heads), np.asarray(self.outcomes)
        u = self._design(shared)
        for h in range(n_heads):
            mine = np.flatnonzero(heads == h)
            if len(mine) < TENANT_MIN or len(set(y[mine])) < 2:
                continue
            base, um, ym = _logit(shared[mine, h]), u[mine], y[mine]
            split = np.arange(len(mine)) % TENANT_FOLDS
            ours, theirs = [], []
            for f in range(TENANT_FOLDS):
                tr, te = split != f, split == f
                if len(set(ym[te])) < 2:
                    continue
                theta = _recalibration(um[tr], ym[tr], base[tr])
                ours.append(roc_auc_score(ym[te], base[te] + um[te] @ theta))
                theirs.append(roc_auc_score(ym[te], base[te]))
            better = np.array(ours) - np.array(theirs)
            if len(better) and better.mean() > TENANT_MIN_GAIN and (better > 0).mean() >= 0.8:
                self._thetas[h] = _recalibration(um, ym, base)
        return self._thetas

    def adjust(self, shared: np.ndarray) -> np.ndarray:
        """The shared model's (n, H) probabilities corrected by this tenant's feedback."""
        thetas = self.thetas(shared.shape[1])
        if not thetas:
            return shared
        u = self._design(shared.astype(np.float64))
        out = shared.copy()
        for h, theta in thetas.items():
            out[:, h] = _sigmoid(_logit(shared[:, h]) + u @ theta)
        return out

    def to_dict(self) -> dict:
        return {"rows": np.stack(self.rows).astype(np.float32).tobytes() if self.rows else b"",
                "width": int(self.rows[0].shape[0]) if self.rows else 0,
                "heads": self.heads, "outcomes": self.outcomes, "asks": self.asks}

    @classmethod
    def from_dict(cls, data: dict) -> "TenantCorrection":
        width = int(data.get("width") or 0)
        raw = np.frombuffer(data.get("rows") or b"", np.float32)
        rows = [r.copy() for r in raw.reshape(-1, width)] if width else []
        heads = list(data["heads"])
        return cls(rows=rows, heads=heads, outcomes=list(data["outcomes"]),
                   asks=list(data.get("asks") or [""] * len(heads)))


# ---- policy ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoutePolicy:
    """What a process wants. quality: the share (0..1] of the best allowed model's predicted
    quality an answer must be predicted to reach (0: no target, the best within the budget);
    cost_budget: the most one Ask may cost (0: none); ttft_slo_ms: the first token wanted
    within (0: none); allowed: the models `auto` may pick (empty: every routable model)."""

    quality: float = 0.0
    cost_budget: float = 0.0
    ttft_slo_ms: float = 0.0
    allowed: tuple[str, ...] = ()

    def validate(self) -> "RoutePolicy":
        if not 0.0 <= self.quality <= 1.0:
            raise InvalidArgument(f"quality must be 0..1, got {self.quality}")
        if self.cost_budget < 0 or self.ttft_slo_ms < 0:
            raise InvalidArgument("cost budget and first-token SLO must not be negative")
        if len(self.allowed) > 32:
            raise InvalidArgument("at most 32 allowed models")
        return self


@dataclass(frozen=True)
class ModelProfile:
    """A routable physical model: its head in the quality model, its price, its speed."""

    name: str
    head: str
    cost_per_1k_tokens: float
    prefill_tokens_per_s: float


@dataclass
class Candidate:
    model: str
    quality: float        # predicted chance of a good answer
    cost: float           # predicted cost of the Ask
    ttft_ms: float        # predicted first-token time
    eligible: bool = True
    note: str = ""


@dataclass
class RouteChoice:
    model: str
    reason: str
    candidates: list[Candidate]


def estimate(profile: ModelProfile, quality: float, prompt_tokens: int,
             answer_tokens: int) -> Candidate:
    cost = (prompt_tokens + answer_tokens) * profile.cost_per_1k_tokens / 1000.0
    ttft = 1000.0 * prompt_tokens / max(profile.prefill_tokens_per_s, 1e-6)
    return Candidate(profile.name, float(quality), cost, ttft)


def choose(policy: RoutePolicy, candidates: list[Candidate]) -> RouteChoice:
    """Among the candidates within the budget and the SLO: with a quality target, the cheapest
    predicted to reach it (the best one always does); without one, the best predicted quality.
    If none is within budget and SLO, the cheapest (the kernel still enforces the budget)."""
    if not candidates:
        raise NotFound("no model is allowed for this process")
    for c in candidates:
        if policy.cost_budget and c.cost > policy.cost_budget:
            c.eligible, c.note = False, f"over budget ({c.cost:.4g} > {policy.cost_budget:.4g})"
        elif policy.ttft_slo_ms and c.ttft_ms > policy.ttft_slo_ms:
            c.eligible, c.note = False, f"misses SLO ({c.ttft_ms:.0f} ms > {policy.ttft_slo_ms:.0f} ms)"
    by_cost = sorted(candidates, key=lambda c: (c.cost, -c.quality, c.model))
    fit = [c for c in by_cost if c.eligible]
    if not fit:
        return RouteChoice(by_cost[0].model, "no model is within the budget and SLO: "
                           "the cheapest", candidates)
    if not policy.quality:
        top = max(fit, key=lambda c: (c.quality, -c.cost))
        return RouteChoice(top.model, f"best predicted quality ({top.quality:.2f})"
                           + (" within the budget" if policy.cost_budget else ""), candidates)
    target = policy.quality * max(c.quality for c in fit)
    chosen = next(c for c in fit if c.quality >= target - 1e-9)
    return RouteChoice(chosen.model, f"cheapest predicted to reach {policy.quality:.0%} of the "
                       f"best ({chosen.quality:.2f} ≥ {target:.2f})", candidates)
