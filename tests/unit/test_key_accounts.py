"""Key budgets without daemons: the pure arithmetic (the request window, what a key can still
pay for, cost in billionths), and the real AskRunner charging one key from concurrent Asks of
an in-memory model so that their sum never passes the key's budget."""

from __future__ import annotations

import asyncio
import math

import pytest

from kernel.ask import AskQuery
from kernel.identity import Caller
from kernel.keys import (KeyAccount, KeyLedger, RequestWindow, budget_nano, nano_per_token,
                         new_record, room)
from tests.unit.test_ask_runner import PROMPT, FakeModel, Kernel, answer
from vfmos_runtime.errors import InvalidArgument, QuotaExceeded
from vfmos_runtime.types import ProcessSpec, TokenLimits
from vfmos_runtime.validate import token_limits

PRICE = 2.0  # what the in-memory model costs per 1k tokens
KEYED = Caller("alice", -1, False, "tcp", key="0123456789ab")


# --- the request window ---------------------------------------------------------------

def test_the_window_refuses_the_request_past_its_limit_and_says_when_one_fits():
    window = RequestWindow(3)
    for t in (0.0, 10.0, 20.0):
        assert window.wait_s(t) == 0.0
        window.add(t)
    assert window.wait_s(30.0) == pytest.approx(30.0)  # the first leaves at 60 s
    assert window.wait_s(59.99) > 0
    assert window.wait_s(60.0) == 0.0 and len(window) == 2


def test_requests_sharing_a_slot_leave_with_the_latest_never_earlier():
    window = RequestWindow(2)
    window.add(5.00)
    window.add(5.05)  # the same tenth of a second: one entry, stamped 5.05
    assert window.wait_s(65.01) > 0  # 5.05 + 60 has not come: the first may not leave alone
    assert window.wait_s(65.05) == 0.0 and len(window) == 0


def test_a_window_of_a_huge_limit_keeps_one_entry_per_tenth_of_a_second():
    window = RequestWindow(1_000_000)
    for i in range(5000):
        window.add(i * 0.001)  # 5 s of calls
    assert len(window) == 5000 and len(window._entries) <= 51


# --- what a key can pay for -----------------------------------------------------------

def test_prices_are_whole_billionths_rounded_up_and_budgets_exact():
    assert nano_per_token(2.0) == 2_000_000
    assert nano_per_token(0.07) == 70_000       # 0.07 * 1e6 is 70000.00000000001 in floats
    assert nano_per_token(1e-7) == 1            # a fraction of a billionth costs one
    assert nano_per_token(0.0) == 0
    assert budget_nano(0.5) == 500_000_000 and budget_nano(1e9) == 10**18


@pytest.mark.parametrize("limits,tokens,cost,per_token,expected", [
    (TokenLimits(), 10**9, 10**9, 5, (None, "")),
    (TokenLimits(max_tokens=100), 40, 0, 5, (60, "key_max_tokens")),
    (TokenLimits(max_tokens=100), 140, 0, 5, (0, "key_max_tokens")),
    (TokenLimits(cost_budget=1.0), 0, 999_999_990, 3, (3, "key_cost_budget")),
    (TokenLimits(cost_budget=1.0), 0, 0, 0, (None, "")),  # a free model is not bounded by cost
    (TokenLimits(max_tokens=10, cost_budget=1.0), 0, 0, 2 * 10**8, (5, "key_cost_budget")),
    (TokenLimits(max_tokens=4, cost_budget=1.0), 0, 0, 2 * 10**8, (4, "key_max_tokens")),
])
def test_room_is_the_tighter_of_tokens_and_cost(limits, tokens, cost, per_token, expected):
    assert room(limits, tokens, cost, per_token) == expected


def test_charging_what_room_allows_never_passes_the_cost_budget():
    account = KeyAccount("k", b"d", TokenLimits(cost_budget=0.3))
    price = 0.7  # per 1k: 700,000 billionths a token, 428 tokens fit in 0.3
    while (left := account.room(price)):
        account.charge(min(left, 7), price)
    assert account.cost_nano <= budget_nano(0.3)
    assert account.tokens_used == 428 and math.isclose(account.cost_spent, 0.2996)
    refusal = account.exhausted(price)
    assert refusal.quota == "key_cost_budget" and refusal.subject == "token k"


def test_an_account_refuses_calls_past_its_concurrency_and_its_rate():
    account = KeyAccount("k", b"d", TokenLimits(requests_per_minute=2, max_concurrent=1))
    account.enter(0.0)
    with pytest.raises(QuotaExceeded) as busy:
        account.enter(0.5)
    assert busy.value.quota == "key_max_concurrent" and busy.value.retry_after_s == 0
    account.leave()
    account.enter(1.0)
    account.leave()
    with pytest.raises(QuotaExceeded) as fast:
        account.enter(2.0)  # the third request within a minute
    assert fast.value.quota == "key_requests_per_minute"
    assert fast.value.retry_after_s == pytest.approx(58.0)
    assert "retry in 58.0s" in fast.value.message
    assert account.in_flight == 0  # refusals hold nothing


@pytest.mark.parametrize("limits,field", [
    (TokenLimits(max_tokens=-1), "max_tokens"),
    (TokenLimits(max_tokens=10**16), "max_tokens"),
    (TokenLimits(cost_budget=float("nan")), "cost_budget"),
    (TokenLimits(cost_budget=float("inf")), "cost_budget"),
    (TokenLimits(cost_budget=-0.5), "cost_budget"),
    (TokenLimits(requests_per_minute=10**7), "requests_per_minute"),
    (TokenLimits(max_concurrent=-3), "max_concurrent"),
])
def test_bad_limits_are_refused_by_name(limits, field):
    with pytest.raises(InvalidArgument) as info:
        token_limits(limits)
    assert info.value.message.startswith(field)


# --- Asks charging one key ------------------------------------------------------------

class KeyedKernel(Kernel):
    def __init__(self, path, model: FakeModel, limits: TokenLimits):
        super().__init__(path, model)
        self.keys = KeyLedger(self.store)
        self.account = self.keys.add(b"digest-of-the-key", new_record(
            KEYED.key, KEYED.tenant, False, "", limits, 0.0))
        self.runner._keys = self.keys  # what kernel/main.py passes to AskRunner

    def spawn_keyed(self) -> int:
        return asyncio.run(self.table.spawn(KEYED, ProcessSpec(name="p"))).pid

    async def ask_keyed(self, pid: int, tokens: int) -> list:
        return [item async for item in self.runner.ask(
            KEYED, AskQuery(pid=pid, prompt="Tell me a story.", max_new_tokens=tokens))]


@pytest.fixture
def keyed(tmp_path):
    made: list[KeyedKernel] = []

    def make(limits: TokenLimits, **options) -> KeyedKernel:
        k = KeyedKernel(tmp_path, FakeModel(**options), limits)
        made.append(k)
        return k
    yield make
    for k in made:
        k.store.close()


async def _ask_all(k: KeyedKernel, pid: int, n: int, tokens: int) -> list:
    return await asyncio.gather(*(k.ask_keyed(pid, tokens) for _ in range(n)),
                                return_exceptions=True)


@pytest.mark.parametrize("per_piece", [1, 3])
def test_concurrent_asks_share_the_key_budget_and_never_pass_it(keyed, per_piece):
    budget = 8 * PROMPT + 100  # every prompt fits; the answers share 100 tokens
    k = keyed(TokenLimits(max_tokens=budget), per_piece=per_piece)
    pid = k.spawn_keyed()
    results = asyncio.run(_ask_all(k, pid, 8, 50))  # 8 x 60 asked, 180 fit
    done = [answer(r)[1] for r in results if not isinstance(r, BaseException)]
    used = sum(d.usage.tokens_in + d.usage.tokens_out for d in done)
    assert used == k.account.tokens_used == budget  # met to the token, never passed
    assert any(d.finish_reason == "quota" for d in done)
    with pytest.raises(QuotaExceeded) as info:
        asyncio.run(k.ask_keyed(pid, 5))
    assert info.value.quota == "key_max_tokens" and info.value.subject == f"token {KEYED.key}"


def test_a_prompt_the_key_cannot_pay_for_is_refused_and_not_charged(keyed):
    k = keyed(TokenLimits(max_tokens=PROMPT))  # the prompt alone takes all of it
    pid = k.spawn_keyed()
    with pytest.raises(QuotaExceeded) as info:
        asyncio.run(k.ask_keyed(pid, 5))
    assert info.value.quota == "key_max_tokens" and k.account.tokens_used == 0
    assert k.model.streams[0].cancelled


def test_a_cost_budget_is_charged_per_token_at_the_model_price(keyed):
    # 2.0 per 1k = 0.002 a token: a budget of 0.1 pays for 50 tokens, 10 of them a prompt.
    k = keyed(TokenLimits(cost_budget=0.1))
    pid = k.spawn_keyed()
    asyncio.run(k.runner._refresh_models())
    text, done = answer(asyncio.run(k.ask_keyed(pid, 100)))
    assert done.finish_reason == "quota" and done.usage.tokens_out == 40
    assert k.account.cost_nano == budget_nano(0.1)
    assert done.usage.cost == pytest.approx(0.1)
    with pytest.raises(QuotaExceeded) as info:
        asyncio.run(k.ask_keyed(pid, 5))
    assert info.value.quota == "key_cost_budget"


def test_concurrent_asks_under_a_cost_budget_never_pass_it(keyed):
    k = keyed(TokenLimits(cost_budget=0.25), per_piece=2)  # 125 tokens at 0.002
    pid = k.spawn_keyed()
    asyncio.run(k.runner._refresh_models())
    results = asyncio.run(_ask_all(k, pid, 8, 40))
    done = [answer(r)[1] for r in results if not isinstance(r, BaseException)]
    assert k.account.cost_nano <= budget_nano(0.25)
    assert sum(d.usage.cost for d in done) <= 0.25 + 1e-12
    assert k.account.tokens_used == sum(d.usage.tokens_in + d.usage.tokens_out for d in done)


def test_an_ask_charges_its_key_and_the_usage_is_queued_to_the_store(keyed):
    k = keyed(TokenLimits())  # no limits: usage is still counted
    digest = k.account.digest
    k.store.put_token(digest, new_record(KEYED.key, KEYED.tenant, False, "", TokenLimits(),
                                         0.0)).result()
    pid = k.spawn_keyed()
    _, done = answer(asyncio.run(k.ask_keyed(pid, 7)))
    assert k.account.tokens_used == PROMPT + 7 == done.usage.tokens_in + done.usage.tokens_out
    k.store.submit(lambda txn: None).result()  # writes commit in order: the usage is in
    assert k.store.get_token(digest)["tokens_used"] == PROMPT + 7


def test_a_usage_write_never_brings_a_revoked_token_back(keyed):
    k = keyed(TokenLimits())
    digest = k.account.digest
    k.store.put_token(digest, new_record(KEYED.key, KEYED.tenant, False, "", TokenLimits(),
                                         0.0)).result()
    k.store.delete_token(digest)
    k.keys.settle(k.account)  # an Ask that was in flight when the token was revoked
    k.store.submit(lambda txn: None).result()
    assert k.store.get_token(digest) is None
