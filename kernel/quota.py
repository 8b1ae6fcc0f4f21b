"""Quota arithmetic: token buckets and the admission checks of one FM process."""

from __future__ import annotations

from dataclasses import dataclass

from vfmos_runtime.errors import QuotaExceeded
from vfmos_runtime.types import Counters, Quota


@dataclass
class TokenBucket:
    """Tokens-per-minute limiter; `level` may go negative after a charge (debt is repaid)."""

    rate_per_minute: int
    level: float
    stamp: float

    @classmethod
    def full(cls, rate_per_minute: int, now: float) -> "TokenBucket":
        return cls(rate_per_minute, float(rate_per_minute), now)

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.stamp)
        self.level = min(float(self.rate_per_minute),
                         self.level + elapsed * self.rate_per_minute / 60.0)
        self.stamp = now

    def available(self, now: float) -> float:
        self.refill(now)
        return self.level

    def charge(self, tokens: int, now: float) -> None:
        self.refill(now)
        self.level -= tokens

    def seconds_until_positive(self, now: float) -> float:
        self.refill(now)
        if self.level > 0:
            return 0.0
        return (1.0 - self.level) * 60.0 / self.rate_per_minute


def remaining_tokens(quota: Quota, counters: Counters) -> int | None:
    """Tokens the process may still use in total, or None when unlimited."""
    if quota.max_tokens <= 0:
        return None
    return max(0, quota.max_tokens - counters.tokens_in - counters.tokens_out)


def admit(pid: int, quota: Quota, counters: Counters, running: int,
          bucket: TokenBucket | None, now: float) -> None:
    """Raise QuotaExceeded naming the first quota that forbids one more Ask."""
    subject = f"pid {pid}"
    left = remaining_tokens(quota, counters)
    if left is not None and left <= 0:
        raise QuotaExceeded(
            f"process {pid} has used its {quota.max_tokens}-token budget", "max_tokens", subject)
    if quota.max_concurrent > 0 and running >= quota.max_concurrent:
        raise QuotaExceeded(
            f"process {pid} already runs {running} of {quota.max_concurrent} concurrent asks",
            "max_concurrent", subject)
    if quota.cost_budget > 0 and counters.cost >= quota.cost_budget:
        raise QuotaExceeded(
            f"process {pid} has spent its cost budget of {quota.cost_budget:g}",
            "cost_budget", subject)
    if bucket is not None and bucket.available(now) <= 0:
        wait = bucket.seconds_until_positive(now)
        raise QuotaExceeded(
            f"process {pid} is over {quota.tokens_per_minute} tokens/minute; "
            f"retry in {wait:.1f}s", "tokens_per_minute", subject, retry_after_s=wait)


def new_token_cap(quota: Quota, counters: Counters, prompt_tokens: int, asked: int) -> int:
    """How many new tokens an Ask may generate so the total budget is never exceeded."""
    left = remaining_tokens(quota, counters)
    if left is None:
        return asked
    return max(0, min(asked, left - prompt_tokens))
