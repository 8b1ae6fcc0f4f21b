"""Cascades: which model answers first and which one takes over, and when an answer is
escalated (low confidence, or a trust check failed it) within the Ask's cost cap. Pure logic;
the Ask path runs it."""

from __future__ import annotations

import math
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

    def describe(self) -> str:
        return f"cascade: {self.first} first, {self.then} when its confidence is below " \
               f"{self.confidence:g} or a trust check fails it"

    def escalation(self, confidence: float | None, failed_check: str,
                   spent: float) -> tuple[bool, str]:
        """Whether the first answer goes to `then`, and why (or why not), in words.
        `confidence` None: the model reported no token probabilities (only checks decide);
        `spent`: what the first answer cost."""
        if failed_check:
            why = f"{self.first}'s answer failed {failed_check}"
        elif confidence is not None and confidence < self.confidence:
            why = f"{self.first}'s confidence {confidence:.2f} < {self.confidence:g}"
        else:
            shown = "unknown" if confidence is None else f"{confidence:.2f}"
            return False, f"{self.first} kept (confidence {shown})"
        if self.cap and spent + self.then_cost > self.cap:
            return False, f"{why}, but {self.then} would pass the cost cap {self.cap:.4g}"
        return True, f"{why}: escalated to {self.then}"


def plan(decision: RouteDecision, confidence: float, cap: float) -> CascadePlan | None:
    """The cascade for one routed Ask, or None when no cheaper first model is eligible."""
    if confidence <= 0:
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
    return CascadePlan(first.model, chosen.model, confidence, chosen.cost, cap)


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
