"""The syscall fuzzer (bench/fuzz.py) in the suite: a fixed seed and a bounded count against
real vfmd, vfm-datad and the fake vfm-modeld; `python -m bench fuzz --count 10000` is the long
run."""

from __future__ import annotations

from google.protobuf import message_factory
from hypothesis import HealthCheck, Phase, given, seed, settings

from bench.fuzz import FuzzStack, _payloads, run
from bench.fuzzgen import METHODS, SERVICE, VALID, Case, PoolPid, build, cases

# About 40 s on two busy cores once nothing hangs. Each hung call costs its 10 s deadline, so
# after one hang of a shape (method, garbage part or not, cancelled or not) the rest of that
# shape is skipped: the goal is failed by then, and the other methods still get fuzzed.
COUNT = 1000
HANGS_PER_SHAPE = 1


class _FixedPids:
    def resolver(self, identity: str):
        return lambda value: 7 if isinstance(value, PoolPid) else value


def _message(method: str, payload: bytes):
    desc = SERVICE.methods_by_name[method].input_type
    msg = message_factory.GetMessageClass(desc)()
    msg.ParseFromString(payload)
    return msg


def test_every_method_has_a_valid_request_that_builds():
    assert sorted(VALID) == sorted(METHODS)
    for method, draft in VALID.items():
        desc = SERVICE.methods_by_name[method].input_type
        assert build(desc, draft, lambda p: 7).SerializeToString() is not None


def test_generated_cases_reach_every_method_and_garbage_does_not_parse():
    seen: set[str] = set()
    kinds: set[str] = set()

    @settings(max_examples=600, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @seed(1)
    @given(case=cases())
    def check(case: Case) -> None:
        seen.add(case.method)
        kinds.add(case.kind)
        for payload in _payloads(_FixedPids(), case):
            if case.kind == "garbage":
                try:
                    _message(case.method, payload)
                except Exception:  # noqa: BLE001 - any parse failure is what garbage is for
                    continue
                raise AssertionError(f"garbage for {case.method} parses: {payload!r}")
            if case.kind in ("message", "mutant"):
                _message(case.method, payload)  # a generated message round-trips

    check()
    assert seen == set(METHODS)
    assert kinds == {"message", "mutant", "garbage", "stream"}


def test_syscall_fuzz_finds_no_internal_unknown_hang_or_crash():
    stack = FuzzStack()
    try:
        result = run(stack, COUNT, seed_value=0, hangs_per_shape=HANGS_PER_SHAPE)
    finally:
        stack.close()
    figures = result.figures()
    goals = {k: figures[k] for k in ("internal", "unknown", "hung", "crashes", "data_intact")}
    assert goals == {"internal": 0, "unknown": 0, "hung": 0, "crashes": 0,
                     "data_intact": True}, result.describe()
    assert figures["requests"] + figures["skipped"] == COUNT, result.describe()


def test_an_admin_pool_pid_never_names_a_protected_pid_even_when_the_pool_is_empty():
    # Once the fuzz has killed every admin pid, a pool pid fell back to its slot number,
    # which could be keeper's pid: an admin may change that process, so it "changed".
    from bench.fuzz import Target
    from bench.fuzzgen import PoolPid
    target = Target.__new__(Target)  # the resolver alone: no daemon to fetch a ticket from
    target.own, target.foreign = {"admin": [], "mallory": []}, {"admin": [], "mallory": [1]}
    target.protected = {1}
    resolve = target.resolver("admin")
    assert [resolve(PoolPid(i)) for i in range(4)] == [0, -2, 2, 3]
    assert target.resolver("mallory")(PoolPid(5)) == 1  # mallory is meant to reach it
