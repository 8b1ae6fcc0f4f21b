"""The process state machine: legal transitions only, recovery rules, spec validation."""

import pytest

from kernel.process import (MAX_CONTEXT_BUDGET, ON_RECOVERY, TERMINAL, TRANSITIONS, ProcRecord,
                            ProcState, check_transition, validate_spec)
from libvfm.errors import FailedPrecondition, InvalidArgument
from libvfm.types import ProcessSpec, Quota

S = ProcState


def test_every_state_has_a_row():
    assert set(TRANSITIONS) == set(ProcState)


def test_terminal_states_have_no_way_out():
    for state in TERMINAL:
        assert TRANSITIONS[state] == frozenset()


@pytest.mark.parametrize("current,target", [
    (S.CREATED, S.READY), (S.READY, S.RUNNING), (S.RUNNING, S.READY), (S.RUNNING, S.WAITING),
    (S.WAITING, S.READY), (S.READY, S.SUSPENDED), (S.WAITING, S.SUSPENDED),
    (S.SUSPENDED, S.READY), (S.RUNNING, S.ZOMBIE), (S.ZOMBIE, S.EXITED), (S.READY, S.KILLED),
])
def test_legal_transitions(current, target):
    check_transition(current, target, pid=1)


@pytest.mark.parametrize("current,target", [
    (S.KILLED, S.READY), (S.EXITED, S.READY), (S.SUSPENDED, S.RUNNING), (S.CREATED, S.RUNNING),
    (S.WAITING, S.RUNNING), (S.READY, S.EXITED), (S.SUSPENDED, S.SUSPENDED),
])
def test_illegal_transitions_name_both_states(current, target):
    with pytest.raises(FailedPrecondition, match=f"{current.name}.*{target.name}"):
        check_transition(current, target, pid=7)


def test_recovery_brings_running_work_back_ready():
    assert ON_RECOVERY[S.RUNNING] == S.READY
    assert ON_RECOVERY[S.WAITING] == S.READY
    assert S.SUSPENDED not in ON_RECOVERY and S.KILLED not in ON_RECOVERY


def test_record_round_trips_through_dict():
    rec = ProcRecord(pid=3, tenant="alice", owner_uid=1000,
                     spec=ProcessSpec("bot", priority=5, quota=Quota(max_tokens=10)))
    rec.move(S.READY)
    rec.counters.tokens_out = 4
    again = ProcRecord.from_dict(rec.to_dict())
    assert again == rec and again.state is S.READY


@pytest.mark.parametrize("spec,message", [
    (ProcessSpec(""), "bad process name"),
    (ProcessSpec("has space"), "bad process name"),
    (ProcessSpec("x" * 65), "bad process name"),
    (ProcessSpec("ok", priority=40), "priority"),
    (ProcessSpec("ok", priority=-1), "priority"),
    (ProcessSpec("ok", context_budget=-5), "context_budget"),
    (ProcessSpec("ok", context_budget=MAX_CONTEXT_BUDGET + 1), "context_budget"),
    (ProcessSpec("ok", quota=Quota(max_tokens=-1)), "max_tokens"),
    (ProcessSpec("ok", quota=Quota(tokens_per_minute=-1)), "tokens_per_minute"),
    (ProcessSpec("ok", quota=Quota(max_concurrent=-2)), "max_concurrent"),
    (ProcessSpec("ok", quota=Quota(cost_budget=float("nan"))), "cost_budget"),
    (ProcessSpec("ok", quota=Quota(cost_budget=-1.0)), "cost_budget"),
])
def test_malformed_specs_are_refused(spec, message):
    with pytest.raises(InvalidArgument, match=message):
        validate_spec(spec)


def test_good_spec_passes():
    spec = ProcessSpec("support-bot.v2", priority=39, quota=Quota(max_tokens=1000))
    assert validate_spec(spec) is spec
