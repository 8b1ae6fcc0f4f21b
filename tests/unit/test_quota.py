"""Quota arithmetic: token bucket refill and debt, admission, the new-token cap."""

import pytest

from kernel.quota import TokenBucket, admit, new_token_cap, remaining_tokens
from libvfm.errors import QuotaExceeded
from libvfm.types import Counters, Quota


def test_bucket_refills_linearly_and_caps_at_rate():
    bucket = TokenBucket.full(600, now=0.0)
    bucket.charge(600, now=0.0)
    assert bucket.available(now=0.0) == 0
    assert bucket.available(now=30.0) == pytest.approx(300)
    assert bucket.available(now=1000.0) == 600


def test_bucket_debt_delays_the_next_admission():
    bucket = TokenBucket.full(60, now=0.0)
    bucket.charge(120, now=0.0)  # one answer overshot the rate
    assert bucket.available(now=0.0) == -60
    assert bucket.seconds_until_positive(now=0.0) == pytest.approx(61.0)


def test_remaining_tokens():
    assert remaining_tokens(Quota(), Counters(tokens_in=5)) is None
    assert remaining_tokens(Quota(max_tokens=100), Counters(tokens_in=30, tokens_out=20)) == 50
    assert remaining_tokens(Quota(max_tokens=10), Counters(tokens_in=30)) == 0


@pytest.mark.parametrize("quota,counters,running,name", [
    (Quota(max_tokens=50), Counters(tokens_in=25, tokens_out=25), 0, "max_tokens"),
    (Quota(max_concurrent=2), Counters(), 2, "max_concurrent"),
    (Quota(cost_budget=1.0), Counters(cost=1.0), 0, "cost_budget"),
])
def test_admit_names_the_quota(quota, counters, running, name):
    with pytest.raises(QuotaExceeded) as info:
        admit(9, quota, counters, running, None, now=0.0)
    assert info.value.quota == name and info.value.subject == "pid 9"


def test_admit_checks_the_bucket():
    bucket = TokenBucket.full(60, now=0.0)
    admit(1, Quota(tokens_per_minute=60), Counters(), 0, bucket, now=0.0)
    bucket.charge(60, now=0.0)
    with pytest.raises(QuotaExceeded) as info:
        admit(1, Quota(tokens_per_minute=60), Counters(), 0, bucket, now=0.0)
    assert info.value.quota == "tokens_per_minute"
    admit(1, Quota(tokens_per_minute=60), Counters(), 0, bucket, now=2.0)


def test_admit_allows_just_under_every_limit():
    admit(1, Quota(max_tokens=51, max_concurrent=3, cost_budget=1.0),
          Counters(tokens_in=25, tokens_out=25, cost=0.99), 2, None, now=0.0)


def test_new_token_cap_never_exceeds_budget():
    quota = Quota(max_tokens=100)
    assert new_token_cap(quota, Counters(tokens_in=40), prompt_tokens=30, asked=64) == 30
    assert new_token_cap(quota, Counters(tokens_in=90), prompt_tokens=30, asked=64) == 0
    assert new_token_cap(Quota(), Counters(), prompt_tokens=10**6, asked=64) == 64
