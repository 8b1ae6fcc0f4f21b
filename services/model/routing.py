"""vfm-modeld's router as a service: which registered models it may pick and with which head,
what each costs and how fast it starts, the decision kept per Ask for feedback, and each
tenant's correction. Storage is one small LMDB environment (`router.lmdb` in the state dir)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.model.registry import ModelEntry, ModelRegistry
from services.model.route_features import feature_matrix
from services.model.router import (Candidate, ModelProfile, QualityModel, RouteChoice, RoutePolicy,
                                   TenantCorrection, choose, estimate)
from services.model.train_router import WEIGHTS
from vfmos_runtime.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from vfmos_runtime.storage import open_env, pack, unpack

MAX_DECISIONS = 200_000   # routed Asks kept for feedback (oldest dropped first)
# First guesses of a local model's prefill speed (tokens/s on 2 cores) until the service has
# timed its own first tokens; the registry's options.prefill_tokens_per_s overrides them.
DEFAULT_PREFILL = {"smollm2-135m": 376.0, "gemma3-270m": 180.0}
FALLBACK_PREFILL = 200.0
EWMA = 0.2


@dataclass
class RouteResult:
    choice: RouteChoice
    heads: dict[str, str]     # model -> head


class RouteStore:
    """Decisions by ask id (time-ordered, so the first key is the oldest) and corrections by
    tenant. Decisions are written without fsync (a lost one only refuses its feedback);
    a tenant's correction is synced before RecordFeedback answers."""

    def __init__(self, path: Path):
        self._env = open_env(path, map_size=1 << 30, max_dbs=4, sync=False)
        self._decisions = self._env.open_db(b"decisions")
        self._tenants = self._env.open_db(b"tenants")
        self._lock = threading.Lock()

    def put_decision(self, ask_id: str, decision: dict) -> None:
        with self._lock, self._env.begin(write=True) as txn:
            txn.put(ask_id.encode(), pack(decision), db=self._decisions)
            if txn.stat(self._decisions)["entries"] > MAX_DECISIONS:
                cursor = txn.cursor(db=self._decisions)
                if cursor.first():
                    cursor.delete()

    def get_decision(self, ask_id: str) -> dict | None:
        with self._env.begin() as txn:
            raw = txn.get(ask_id.encode(), db=self._decisions)
        return unpack(raw) if raw else None

    def put_tenant(self, tenant: str, data: dict) -> None:
        with self._lock, self._env.begin(write=True) as txn:
            txn.put(tenant.encode(), pack(data), db=self._tenants)
        self._env.sync(True)

    def get_tenant(self, tenant: str) -> dict | None:
        with self._env.begin() as txn:
            raw = txn.get(tenant.encode(), db=self._tenants)
        return unpack(raw) if raw else None

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()


class RoutingService:
    """The learned router over the registry. The quality model and the embedder load on the
    first Route (a process that never says `--model auto` costs nothing)."""

    def __init__(self, registry: ModelRegistry, state_dir: Path,
                 weights: Path = WEIGHTS, embedder=None):
        self.registry = registry
        self._weights = weights
        self._model: QualityModel | None = None
        self._embedder = embedder
        self._load_lock = threading.Lock()
        self._store = RouteStore(state_dir / "router.lmdb")
        self._tenants: dict[str, TenantCorrection] = {}
        self._prefill: dict[str, float] = {}

    # -- the parts that load late ----------------------------------------------------------
    def _ready(self) -> QualityModel:
        with self._load_lock:
            if self._model is None:
                try:
                    self._model = QualityModel.load(self._weights)
                except OSError as exc:
                    raise Unavailable(f"the router's weights cannot be read ({self._weights}): "
                                      f"{exc}; run python -m services.model.train_router") from None
            if self._embedder is None:
                from vfmos_runtime.embed import load_embedder

                self._embedder = load_embedder()
        return self._model

    def _tenant(self, tenant: str) -> TenantCorrection:
        found = self._tenants.get(tenant)
        if found is None:
            data = self._store.get_tenant(tenant)
            found = TenantCorrection.from_dict(data) if data else TenantCorrection()
            self._tenants[tenant] = found
        return found

    # -- profiles ------------------------------------------------------------------------
    def profiles(self, allowed: tuple[str, ...], heads: tuple[str, ...],
                 tenant: str = "") -> list[ModelProfile]:
        """The routable models: those allowed (every registered one when none is named) that
        have a head; a named model without one, or unknown, is refused."""
        shared = [e for e in self.registry.entries() if not e.options.get("tenant")]
        entries = [self.registry.get(name) for name in allowed] if allowed else shared
        by_cost = sorted(shared, key=lambda e: (e.cost_per_1k_tokens, e.name))
        out = []
        for entry in entries:
            owner = entry.options.get("tenant")
            if owner and owner != tenant:  # another tenant's adapter reads as unknown
                raise NotFound(f"unknown model {entry.name!r}")
            if owner:
                raise InvalidArgument(f"model {entry.name} is an adapter: a process names it "
                                      "to use it (the router does not pick adapters)")
            head = self._head(entry, by_cost, heads)
            if head is None:
                if allowed:
                    raise InvalidArgument(f"model {entry.name} has no router head; set "
                                          f"options.router_head to one of {', '.join(heads)}")
                continue
            out.append(ModelProfile(entry.name, head, entry.cost_per_1k_tokens,
                                    self._prefill_rate(entry)))
        if not out:
            raise NotFound("no registered model can be routed to")
        return out

    @staticmethod
    def _head(entry: ModelEntry, by_cost: list[ModelEntry], heads: tuple[str, ...]) -> str | None:
        named = entry.options.get("router_head")
        if named:
            return named if named in heads else None
        if not {"strong", "weak"} <= set(heads) or len(by_cost) < 2:
            return None
        # Without a named head: the cheapest model is the weak one, every dearer one strong.
        return "weak" if entry.name == by_cost[0].name else "strong"

    def _prefill_rate(self, entry: ModelEntry) -> float:
        measured = self._prefill.get(entry.name)
        if measured:
            return measured
        return float(entry.options.get("prefill_tokens_per_s")
                     or DEFAULT_PREFILL.get(entry.name, FALLBACK_PREFILL))

    def observe_first_token(self, model: str, prompt_tokens: int, seconds: float) -> None:
        """A generation's first token came `seconds` after its start: update the estimate."""
        if prompt_tokens < 32 or seconds <= 0:
            return
        rate = prompt_tokens / seconds
        old = self._prefill.get(model)
        self._prefill[model] = rate if old is None else (1 - EWMA) * old + EWMA * rate

    # -- the calls -----------------------------------------------------------------------
    def route(self, tenant: str, prompt: str, policy: RoutePolicy, prompt_tokens: int,
              max_new_tokens: int, ask_id: str = "") -> RouteResult:
        policy.validate()
        if not prompt.strip():
            raise InvalidArgument("the router needs the question's text")
        model = self._ready()
        profiles = self.profiles(policy.allowed, model.heads, tenant)
        emb = self._embedder.embed([prompt])
        shared = model.predict(emb, feature_matrix([prompt]))
        corrected = self._tenant(tenant).adjust(shared)[0]
        tokens = max(prompt_tokens, len(prompt) // 4)
        candidates: list[Candidate] = []
        for p in profiles:
            candidates.append(estimate(p, float(corrected[model.head(p.head)]), tokens,
                                       max(max_new_tokens, 1)))
        choice = choose(policy, candidates)
        heads = {p.name: p.head for p in profiles}
        if ask_id:
            self._store.put_decision(ask_id, {
                "tenant": tenant, "model": choice.model, "head": heads[choice.model],
                "heads": heads, "shared": [float(x) for x in shared[0]], "time": time.time(), "judged": []})
        return RouteResult(choice, heads)

    def feedback(self, tenant: str, ask_id: str, good: bool, source: str,
                 answered_by: str = "") -> tuple[int, bool]:
        """Teach the tenant's correction about the head of the model that answered: the
        router's choice, or (a cascade kept its first answer) `answered_by`."""
        if not ask_id:
            raise InvalidArgument("feedback needs the Ask's id")
        decision = self._store.get_decision(ask_id)
        if decision is None or decision["tenant"] != tenant:
            raise NotFound(f"no routed Ask {ask_id!r} of this tenant")
        head = decision["head"]
        if answered_by and answered_by != decision["model"]:
            head = decision.get("heads", {}).get(answered_by)
            if head is None:
                raise InvalidArgument(f"model {answered_by} was not a candidate of Ask {ask_id}")
        source = source or "user"
        if source in decision["judged"]:
            raise AlreadyExists(f"Ask {ask_id} already has {source} feedback")
        model = self._ready()
        correction = self._tenant(tenant)
        # The user's judgement of an answer outranks the trust verdict's: it replaces the
        # trust entry, and a trust verdict after the user's is not recorded.
        if not (source == "trust" and "user" in decision["judged"]):
            correction.add(np.asarray(decision["shared"], np.float32),
                           model.head(head), good, ask_id)
            self._store.put_tenant(tenant, correction.to_dict())
        decision["judged"].append(source)
        self._store.put_decision(ask_id, decision)
        return len(correction), bool(correction.thetas(len(model.heads)))

    def close(self) -> None:
        self._store.close()
