"""Budgets of bearer tokens ("virtual keys"): their limits, their usage, the exact arithmetic.

Each token's account holds every syscall and Ask made with it to its limits. Accounts
change only on the kernel's event loop, and every check is made in the same step as the
charge it allows (no await between them): concurrent calls of one token see each other's
charges at once, so their sum can never pass a limit."""

from __future__ import annotations

import math
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

from kernel.store import KernelStore
from vfmos_runtime.errors import QuotaExceeded
from vfmos_runtime.types import TokenLimits

WINDOW_S = 60.0
SLOT_S = 0.1   # admitted requests of one tenth of a second share one entry of the window
NANO = 10**9   # a key's cost is counted in billionths of the registry's cost unit, exactly


def nano_per_token(price_per_1k: float) -> int:
    """A model's price per token in billionths of the cost unit, rounded up (the float noise
    of a price like 0.07 is dropped first), so a key never pays less than Usage.cost says."""
    return math.ceil(round(max(0.0, price_per_1k) * (NANO / 1000), 6))


def budget_nano(cost_budget: float) -> int:
    """A cost budget in billionths of the cost unit (0: no limit)."""
    return math.floor(round(cost_budget * NANO, 3))


def room(limits: TokenLimits, tokens_used: int, cost_nano: int, per_token_nano: int
         ) -> tuple[int | None, str]:
    """How many more tokens the key may pay for at `per_token_nano` each (None: no limit),
    and the limit that decides it ("key_max_tokens" or "key_cost_budget", "" for none)."""
    best, name = None, ""
    if limits.max_tokens > 0:
        best, name = max(0, limits.max_tokens - tokens_used), "key_max_tokens"
    if limits.cost_budget > 0 and per_token_nano > 0:
        affordable = max(0, budget_nano(limits.cost_budget) - cost_nano) // per_token_nano
        if best is None or affordable < best:
            best, name = affordable, "key_cost_budget"
    return best, name


class RequestWindow:
    """At most `limit` requests in any WINDOW_S seconds, never one more: an admitted request
    counts until a whole window has passed since it. Requests of one SLOT_S share an entry
    stamped with the latest of them, so an entry leaves no earlier than any of its requests
    (a request may wait up to SLOT_S longer than it had to, never less) and a window holds
    at most WINDOW_S / SLOT_S entries whatever the limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self._entries: deque[list] = deque()  # [slot number, latest time, requests]
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def wait_s(self, now: float) -> float:
        """0 when one more request fits now, else the seconds until one does."""
        self._expire(now)
        if self._count < self.limit:
            return 0.0
        return max(self._entries[0][1] + WINDOW_S - now, 1e-3)

    def add(self, now: float) -> None:
        slot = math.floor(now / SLOT_S)
        if self._entries and self._entries[-1][0] == slot:
            entry = self._entries[-1]
            entry[1] = max(entry[1], now)
            entry[2] += 1
        else:
            self._entries.append([slot, now, 1])
        self._count += 1

    def _expire(self, now: float) -> None:
        while self._entries and self._entries[0][1] + WINDOW_S <= now:
            self._count -= self._entries.popleft()[2]


@dataclass
class KeyAccount:
    """One token's limits and usage. `tokens_used` and `cost_nano` count every token its
    Asks were charged (prompt + answer), whether or not it has limits."""

    token_id: str
    digest: bytes
    limits: TokenLimits
    tokens_used: int = 0
    cost_nano: int = 0
    in_flight: int = 0
    window: RequestWindow | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.limits.requests_per_minute > 0 and self.window is None:
            self.window = RequestWindow(self.limits.requests_per_minute)

    @property
    def subject(self) -> str:
        return f"token {self.token_id}"

    @property
    def cost_spent(self) -> float:
        return self.cost_nano / NANO

    @property
    def limited(self) -> bool:
        """Whether its Asks' tokens are bounded (by tokens or by cost)."""
        return self.limits.max_tokens > 0 or self.limits.cost_budget > 0

    # every syscall
    def enter(self, now: float) -> None:
        """Count one syscall in: refused (and counted nowhere) when the token has all its
        calls in flight or has made its requests of the last minute."""
        lim = self.limits
        if lim.max_concurrent > 0 and self.in_flight >= lim.max_concurrent:
            raise QuotaExceeded(
                f"token {self.token_id} already has {self.in_flight} of its "
                f"{lim.max_concurrent} concurrent calls in flight; retry when one ends",
                "key_max_concurrent", self.subject)
        if self.window is not None:
            wait = self.window.wait_s(now)
            if wait > 0:
                raise QuotaExceeded(
                    f"token {self.token_id} made its {lim.requests_per_minute} requests of "
                    f"the last minute; retry in {wait:.1f}s", "key_requests_per_minute",
                    self.subject, retry_after_s=wait)
            self.window.add(now)
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    # Asks
    def admit_ask(self) -> None:
        """Refuse an Ask when the token has nothing left to pay for it with."""
        lim = self.limits
        if lim.max_tokens > 0 and self.tokens_used >= lim.max_tokens:
            raise self.spent("key_max_tokens")
        if lim.cost_budget > 0 and self.cost_nano >= budget_nano(lim.cost_budget):
            raise self.spent("key_cost_budget")

    def room(self, price_per_1k: float) -> int | None:
        """Tokens the key may still pay for at this model's price (None: no limit)."""
        return room(self.limits, self.tokens_used, self.cost_nano,
                    nano_per_token(price_per_1k))[0]

    def charge(self, tokens: int, price_per_1k: float) -> None:
        """Charge tokens the caller gets; the caller checked room() in the same step."""
        self.tokens_used += tokens
        self.cost_nano += tokens * nano_per_token(price_per_1k)

    def prompt_refusal(self, prompt_tokens: int, price_per_1k: float) -> QuotaExceeded | None:
        """Why a prompt of this size cannot be taken (it must leave room for one token of
        answer, as a process's budget does), or None."""
        left, name = room(self.limits, self.tokens_used, self.cost_nano,
                          nano_per_token(price_per_1k))
        if left is None or prompt_tokens < left:
            return None
        return QuotaExceeded(
            f"the question is {prompt_tokens} tokens but token {self.token_id} can pay for "
            f"only {left} more ({_limit_text(self.limits, name)})", name, self.subject)

    def exhausted(self, price_per_1k: float) -> QuotaExceeded:
        """The refusal of an Ask that got a model slot once the key had nothing left."""
        _, name = room(self.limits, self.tokens_used, self.cost_nano,
                       nano_per_token(price_per_1k))
        return self.spent(name or "key_max_tokens")

    def spent(self, name: str) -> QuotaExceeded:
        return QuotaExceeded(f"token {self.token_id} has used its "
                             f"{_limit_text(self.limits, name)}", name, self.subject)

    def usage(self) -> dict:
        """What the token's record stores of its usage."""
        return {"tokens_used": self.tokens_used, "cost_nano": self.cost_nano}


def _limit_text(limits: TokenLimits, name: str) -> str:
    if name == "key_cost_budget":
        return f"cost budget of {limits.cost_budget:g}"
    return f"{limits.max_tokens}-token budget"


def limits_of(info: dict) -> TokenLimits:
    """A stored token record's limits (none for a token made before keys had them)."""
    return TokenLimits(**info.get("limits", {}))


def account_of(digest: bytes, info: dict) -> KeyAccount:
    return KeyAccount(info["token_id"], digest, limits_of(info),
                      int(info.get("tokens_used", 0)), int(info.get("cost_nano", 0)))


def new_record(token_id: str, tenant: str, admin: bool, label: str, limits: TokenLimits,
               now: float) -> dict:
    return {"token_id": token_id, "tenant": tenant, "admin": admin, "label": label,
            "created_at": now, "limits": asdict(limits), "tokens_used": 0, "cost_nano": 0}


class KeyLedger:
    """Every token's account, loaded from the store at start; usage goes back to the store
    through the kernel's one writer after each Ask (queued, never waited for)."""

    def __init__(self, store: KernelStore, clock: Callable[[], float] = time.monotonic):
        self._store = store
        self._clock = clock
        self._accounts = {info["token_id"]: account_of(digest, info)
                          for digest, info in store.tokens()}

    def get(self, token_id: str) -> KeyAccount | None:
        return self._accounts.get(token_id) if token_id else None

    def add(self, digest: bytes, info: dict) -> KeyAccount:
        account = account_of(digest, info)
        self._accounts[account.token_id] = account
        return account

    def drop(self, token_id: str) -> None:
        """A revoked token: calls in flight keep their account, which is no longer stored."""
        self._accounts.pop(token_id, None)

    @contextmanager
    def call(self, token_id: str) -> Iterator[None]:
        """One syscall of the token (none for a caller without one), held to its rate and
        concurrency limits while it runs."""
        account = self.get(token_id)
        if account is None:
            yield
            return
        account.enter(self._clock())
        try:
            yield
        finally:
            account.leave()

    def settle(self, account: KeyAccount) -> None:
        """Queue the account's usage for the store (one small write, not waited for): a
        crash before it commits loses this Ask's charge, as it loses the process's."""
        self._store.put_token_usage(account.digest, account.usage())
