"""Cascades: which model answers first and which one takes over, and when an answer is
escalated (low confidence, or a trust check failed it) within the Ask's cost cap. Pure logic;
the Ask path runs it."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict, deque
from dataclasses import dataclass

from kernel.ports import RouteDecision


@dataclass(frozen=True)
class CascadePlan:
    """The cheapest eligible model answers first; below `confidence` its answer is replaced
    by `then`'s (the router's choice, or the best predicted when that was the cheapest)."""

    first: str
    then: str
    confidence: float     # escalate below this geometric-mean token probability
    then_cost: float      # the router's prediction of the escalation's cost
    cap: float = 0.0      # the most the whole Ask may cost; 0 = no cap
    rate: float = 0.0     # calibrated: escalate about this share, the least sure answers
    confidence_cut: float | None = None  # rate's cut in the first model's recent answers
    grounding_cut: float | None = None   # (None until the calibration has seen enough)

    def describe(self) -> str:
        if self.rate:
            return f"cascade: {self.first} first, {self.then} for the least sure " \
                   f"{self.rate:.0%} of its answers (confidence or grounding) or when a " \
                   "trust check fails one"
        return f"cascade: {self.first} first, {self.then} when its confidence is below " \
               f"{self.confidence:g} or a trust check fails it"

    def escalation(self, confidence: float | None, failed_check: str, spent: float,
                   grounding: float | None = None,
                   ungrounded: bool = False) -> tuple[bool, str]:
        """Whether the first answer goes to `then`, and why (or why not), in words.
        `confidence` None: the model reported no token probabilities (only checks decide);
        `failed_check`: a system-1 output check that failed the answer; `grounding`: its
        grounding score (higher = less supported), `ungrounded`: the check failed it;
        `spent`: what the first answer cost."""
        why = self._reason(confidence, failed_check, grounding, ungrounded)
        if not why:
            shown = "unknown" if confidence is None else f"{confidence:.2f}"
            return False, f"{self.first} kept (confidence {shown})"
        if self.cap and spent + self.then_cost > self.cap:
            return False, f"{why}, but {self.then} would pass the cost cap {self.cap:.4g}"
        return True, f"{why}: escalated to {self.then}"

    def _reason(self, confidence: float | None, failed_check: str, grounding: float | None,
                ungrounded: bool) -> str:
        if failed_check:
            return f"{self.first}'s answer failed {failed_check}"
        calibrated = self.rate and self.confidence_cut is not None
        if calibrated:
            if confidence is not None and confidence < self.confidence_cut:
                return f"{self.first}'s confidence {confidence:.2f} is in its least sure " \
                       f"{self.rate / 2:.0%} (< {self.confidence_cut:.2f})"
            if ungrounded and grounding is not None and self.grounding_cut is not None \
                    and grounding > self.grounding_cut:
                return f"{self.first}'s answer failed the grounding check, in its least " \
                       f"grounded {self.rate / 2:.0%} (score {grounding:.2f} > " \
                       f"{self.grounding_cut:.2f})"
            return ""
        if ungrounded and not self.rate:
            return f"{self.first}'s answer failed the grounding check"
        if confidence is not None and confidence < self.confidence:
            return f"{self.first}'s confidence {confidence:.2f} < {self.confidence:g}"
        return ""


CALIBRATION_WINDOW = 256  # recent answers a model's cuts are taken from, per tenant
CALIBRATION_MIN = 16      # fewer: no calibrated cut yet


class Calibration:
    """Each tenant's recent first answers per model: their confidences and grounding scores.
    What is a low confidence depends on the model and the task (SmolLM2 answers support
    tickets at a geometric-mean token probability of 0.33-0.5), so a calibrated cascade
    escalates the least sure share of them instead of those below a fixed number."""

    def __init__(self, window: int = CALIBRATION_WINDOW):
        self._window = window
        self._confidence: dict[tuple[str, str], deque[float]] = defaultdict(self._new)
        self._grounding: dict[tuple[str, str], deque[float]] = defaultdict(self._new)

    def _new(self) -> deque[float]:
        return deque(maxlen=self._window)

    def record(self, tenant: str, model: str, confidence: float | None,
               grounding: float | None) -> None:
        if confidence is not None:
            self._confidence[tenant, model].append(confidence)
        if grounding is not None:
            self._grounding[tenant, model].append(grounding)

    def calibrated(self, plan: "CascadePlan", tenant: str) -> "CascadePlan":
        """`plan` with its cuts: half of its rate by confidence (the lowest), half by
        grounding score (the highest)."""
        if not plan.rate:
            return plan
        share = plan.rate / 2
        return dataclasses.replace(
            plan, confidence_cut=_quantile(self._confidence.get((tenant, plan.first)), share),
            grounding_cut=_quantile(self._grounding.get((tenant, plan.first)), 1 - share))


def _quantile(values: deque[float] | None, q: float) -> float | None:
    if not values or len(values) < CALIBRATION_MIN:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def plan(decision: RouteDecision, confidence: float, cap: float,
         rate: float = 0.0) -> CascadePlan | None:
    """The cascade for one routed Ask, or None when no cheaper first model is eligible."""
    if confidence <= 0 and rate <= 0:
        return None
    eligible = [c for c in decision.candidates if c.eligible]
    if len(eligible) < 2:
        return None
    first = min(eligible, key=lambda c: (c.cost, -c.quality, c.model))
    chosen = next((c for c in eligible if c.model == decision.model), None)
    if chosen is None or chosen.model == first.model:
        rest = [c for c in eligible if c.model != first.model]
        chosen = max(rest, key=lambda c: (c.quality, -c.cost, c.model))
    if chosen.quality <= first.quality:
        return None  # nothing better to escalate to
    return CascadePlan(first.model, chosen.model, confidence, chosen.cost, cap, rate)


class Confidence:
    """An answer's token log-probabilities summed as they stream; unknown as soon as one
    piece of tokens comes without them."""

    def __init__(self) -> None:
        self.logprob = 0.0
        self.tokens = 0
        self.known = True

    def add(self, tokens: int, logprob: float | None) -> None:
        if not tokens:
            return
        if logprob is None:
            self.known = False
            return
        self.logprob += logprob
        self.tokens += tokens

    def value(self) -> float | None:
        """The geometric mean of the tokens' probabilities, or None when unknown."""
        if not self.known or not self.tokens:
            return None
        return math.exp(self.logprob / self.tokens)
