"""Cascades: the plan (which model first, which one next, within the cost cap), the escalation
rule, and the Ask path running them on an in-memory model service: the first answer is never
shown when escalated, both answers are charged, and the process's budget counts both."""

from __future__ import annotations

import asyncio
import math

import pytest

from kernel.ask import AskDone, AskQuery
from kernel.cascade import Calibration, CascadePlan, Confidence, plan
from kernel.ports import GenPiece, ModelInfo, RouteCandidate, RouteDecision
from tests.unit.test_ask_runner import ALICE, PROMPT, FakeModel, FakeStream, Kernel
from vfmos_runtime.errors import VfmError
from vfmos_runtime.types import AUTO_MODEL, ProcessSpec, Quota, RoutePolicy

SMALL, LARGE = "small", "large"
PRICES = {SMALL: 1.0, LARGE: 10.0}


def candidate(model: str, quality: float, cost: float, eligible: bool = True) -> RouteCandidate:
    return RouteCandidate(model, quality, cost, 100.0, eligible, "", "weak")


def decision(chosen: str, *candidates: RouteCandidate) -> RouteDecision:
    return RouteDecision(chosen, f"picked {chosen}", candidates)


# --- the plan ---------------------------------------------------------------------------
def test_the_cheapest_eligible_model_goes_first_and_the_routers_choice_next():
    d = decision(LARGE, candidate(SMALL, 0.5, 0.01), candidate(LARGE, 0.8, 0.1))
    p = plan(d, 0.6, 0.0)
    assert (p.first, p.then, p.then_cost) == (SMALL, LARGE, 0.1)


def test_when_the_router_chose_the_cheapest_the_best_predicted_model_is_next():
    d = decision(SMALL, candidate(SMALL, 0.5, 0.01), candidate("mid", 0.6, 0.05),
                 candidate(LARGE, 0.8, 0.1))
    assert plan(d, 0.6, 0.0).then == LARGE


def test_no_cascade_without_a_threshold_or_a_second_eligible_model():
    two = decision(LARGE, candidate(SMALL, 0.5, 0.01), candidate(LARGE, 0.8, 0.1))
    assert plan(two, 0.0, 0.0) is None
    one = decision(SMALL, candidate(SMALL, 0.5, 0.01), candidate(LARGE, 0.8, 0.1, False))
    assert plan(one, 0.6, 0.0) is None
    # A dearer model predicted no better is nothing to escalate to.
    worse = decision(SMALL, candidate(SMALL, 0.5, 0.01), candidate(LARGE, 0.4, 0.1))
    assert plan(worse, 0.6, 0.0) is None


def test_escalation_on_low_confidence_or_a_failed_check_within_the_cap():
    p = CascadePlan(SMALL, LARGE, 0.6, then_cost=0.1, cap=0.2)
    assert p.escalation(0.9, "", 0.01)[0] is False
    assert p.escalation(0.3, "", 0.01) == (True, "small's confidence 0.30 < 0.6: escalated to large")
    assert p.escalation(0.9, "the grounding check", 0.01)[0] is True
    assert p.escalation(None, "", 0.01)[0] is False  # no probabilities: only checks decide
    kept, why = p.escalation(0.3, "", 0.15)  # 0.15 spent + 0.1 predicted > the 0.2 cap
    assert kept is False and "cost cap" in why


def test_confidence_is_the_geometric_mean_and_unknown_once_a_piece_lacks_it():
    c = Confidence()
    c.add(2, math.log(0.5) * 2)
    c.add(1, math.log(0.125))
    assert c.value() == pytest.approx(0.5 ** (5 / 3))  # 0.5, 0.5, 0.125 = 0.5^5 over 3
    c.add(0, None)  # a piece without tokens says nothing
    assert c.value() is not None
    c.add(1, None)
    assert c.value() is None


# --- the Ask path -----------------------------------------------------------------------
class TwoModels(FakeModel):
    """Two models behind the router: each token of model M has probability `prob[M]`."""

    def __init__(self, prob: dict[str, float]):
        super().__init__()
        self.prob = prob
        self.routes = 0

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(name=m, is_default=m == SMALL, max_batch=8, cost_per_1k_tokens=c)
                for m, c in PRICES.items()]

    async def route(self, tenant, prompt, policy, prompt_tokens, max_new_tokens, ask_id):
        self.routes += 1
        return decision(LARGE, candidate(SMALL, 0.5, 0.001), candidate(LARGE, 0.9, 0.01))

    def generate(self, call):
        self.calls.append(call)
        stream = ProbStream(self, call, self.prob[call.model])
        self.streams.append(stream)
        return stream


class ProbStream(FakeStream):
    def __init__(self, model, call, prob: float):
        super().__init__(model, call)
        self.prob = prob

    async def __anext__(self) -> GenPiece:
        piece = await super().__anext__()
        if not piece.done:
            piece.text = f"{self.call.model}{piece.text}"
            piece.logprob = math.log(self.prob) * piece.tokens
        return piece


def routed(k: Kernel, cascade: float, quota: Quota | None = None) -> int:
    spec = ProcessSpec(name="bot", model=AUTO_MODEL, quota=quota or Quota(),
                       route=RoutePolicy(cascade_confidence=cascade))
    return asyncio.run(k.table.spawn(ALICE, spec)).pid


def ask(k: Kernel, pid: int, tokens: int) -> tuple[list[str], AskDone]:
    async def run():
        return [i async for i in k.runner.ask(ALICE, AskQuery(pid=pid, prompt="Why?",
                                                               max_new_tokens=tokens))]
    items = asyncio.run(run())
    assert isinstance(items[-1], AskDone)
    return items[:-1], items[-1]


def test_a_confident_first_answer_is_kept_and_charged_once(tmp_path):
    k = Kernel(tmp_path, TwoModels({SMALL: 0.9, LARGE: 0.9}))
    try:
        shown, done = ask(k, routed(k, 0.6), 5)
        assert [c.model for c in k.model.calls] == [SMALL]
        assert "".join(shown).startswith(SMALL) and LARGE not in "".join(shown)
        u = done.usage
        assert u.model == SMALL and u.escalated_from == "" and u.confidence == pytest.approx(0.9)
        assert u.cost == pytest.approx((PROMPT + 5) / 1000 * PRICES[SMALL])
        assert "small kept" in u.route_reason
    finally:
        k.store.close()


def test_an_unsure_first_answer_is_never_shown_and_both_are_charged(tmp_path):
    k = Kernel(tmp_path, TwoModels({SMALL: 0.2, LARGE: 0.95}))
    try:
        pid = routed(k, 0.6)
        shown, done = ask(k, pid, 5)
        assert [c.model for c in k.model.calls] == [SMALL, LARGE]
        assert SMALL not in "".join(shown) and "".join(shown).startswith(LARGE)
        assert k.model.calls[1].assistant_prefix == ""  # the draft is not continued
        u = done.usage
        assert (u.model, u.escalated_from) == (LARGE, SMALL)
        assert u.confidence == pytest.approx(0.95)
        assert u.tokens_in == 2 * PROMPT and u.tokens_out == 10
        assert u.cost == pytest.approx((PROMPT + 5) / 1000 * (PRICES[SMALL] + PRICES[LARGE]))
        assert "escalated to large" in u.route_reason
        assert k.table.get(ALICE, pid).counters.cost == pytest.approx(u.cost)
    finally:
        k.store.close()


def test_the_token_budget_counts_the_dropped_first_answer(tmp_path):
    # 40 tokens: the draft takes 10 + 20, and the escalation only what is left of the 40.
    k = Kernel(tmp_path, TwoModels({SMALL: 0.1, LARGE: 0.9}))
    try:
        _, done = ask(k, routed(k, 0.6, Quota(max_tokens=40)), 20)
        assert done.usage.tokens_in + done.usage.tokens_out <= 40
        assert done.finish_reason == "quota"
    finally:
        k.store.close()


# --- calibrated cascades ----------------------------------------------------------------
def test_a_calibrated_cascade_escalates_the_least_sure_share_of_recent_answers():
    calibration = Calibration()
    for i in range(100):  # a small model that is never very sure: 0.30 .. 0.50
        calibration.record("t", SMALL, 0.30 + 0.002 * i, i / 100)
    p = calibration.calibrated(CascadePlan(SMALL, LARGE, 0.0, then_cost=0.1, rate=0.1), "t")
    assert p.confidence_cut == pytest.approx(0.31) and p.grounding_cut == pytest.approx(0.95)
    escalated, why = p.escalation(0.305, "", 0.01)
    assert escalated and "least sure 5%" in why
    assert p.escalation(0.45, "", 0.01)[0] is False   # low by any fixed rule, typical here
    assert p.escalation(0.45, "", 0.01, grounding=0.99, ungrounded=True)[0] is True
    assert p.escalation(0.45, "", 0.01, grounding=0.60, ungrounded=True)[0] is False
    assert p.escalation(0.45, "an output check", 0.01)[0] is True  # checks always escalate
    # Another tenant's answers are not this one's: no cut yet, and no fixed threshold set.
    other = calibration.calibrated(CascadePlan(SMALL, LARGE, 0.0, 0.1, rate=0.1), "u")
    assert other.confidence_cut is None and other.escalation(0.2, "", 0.01)[0] is False
    # Before enough answers, a fixed threshold (if set) decides; grounding alone does not.
    warm = CascadePlan(SMALL, LARGE, 0.6, then_cost=0.1, rate=0.1)
    assert warm.escalation(0.5, "", 0.01)[0] is True
    assert warm.escalation(0.9, "", 0.01, grounding=0.99, ungrounded=True)[0] is False
    # Without a rate, a failed grounding check escalates as before.
    fixed = CascadePlan(SMALL, LARGE, 0.6, then_cost=0.1)
    assert fixed.escalation(0.9, "", 0.01, grounding=0.7, ungrounded=True)[0] is True


def test_the_ask_path_calibrates_on_the_tenants_own_answers(tmp_path):
    k = Kernel(tmp_path, TwoModels({SMALL: 0.5, LARGE: 0.9}))
    try:
        spec = ProcessSpec(name="bot", model=AUTO_MODEL,
                           route=RoutePolicy(cascade_rate=0.2))
        pid = asyncio.run(k.table.spawn(ALICE, spec)).pid
        for i in range(20):  # warming up: no fixed threshold, so nothing is escalated
            k.model.prob[SMALL] = 0.5 + 0.02 * i
            assert ask(k, pid, 3)[1].usage.escalated_from == ""
        k.model.prob[SMALL] = 0.45  # less sure than any answer so far
        done = ask(k, pid, 3)[1]
        assert done.usage.escalated_from == SMALL and done.usage.model == LARGE
        assert "least sure" in done.usage.route_reason
        k.model.prob[SMALL] = 0.8
        assert ask(k, pid, 3)[1].usage.escalated_from == ""
        with pytest.raises(VfmError, match="cascade_rate"):
            asyncio.run(k.table.spawn(ALICE, ProcessSpec(
                name="x", model=AUTO_MODEL, route=RoutePolicy(cascade_rate=0.7))))
    finally:
        k.store.close()
