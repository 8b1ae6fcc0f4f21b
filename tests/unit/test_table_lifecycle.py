"""The process table over a real LMDB store: what a restart does to stored processes, and
reaping ended ones while their usage stays counted."""

from __future__ import annotations

import asyncio

import pytest

from kernel.identity import Caller
from kernel.store import KernelStore
from kernel.table import ProcessTable
from vfmos_runtime.errors import NotFound
from vfmos_runtime.types import ProcessSpec, Usage

ROOT = Caller("unix:root", 0, True, "unix")


def test_processes_local_users_stored_under_bare_names_move_to_their_namespace(tmp_path):
    store = KernelStore(tmp_path)
    table = ProcessTable(store)
    # as an older vfmd stored them: a local user's bare name, and a token tenant's
    local = asyncio.run(table.spawn(Caller("alice", 1000, False, "unix"), ProcessSpec("a")))
    token = asyncio.run(table.spawn(Caller("alice", -1, False, "tcp"), ProcessSpec("t")))
    store.close()

    store = KernelStore(tmp_path)
    table = ProcessTable(store)
    assert table.get(ROOT, local.pid).tenant == "unix:alice"
    assert table.get(ROOT, token.pid).tenant == "alice"
    token_alice = Caller("alice", -1, False, "tcp")
    assert [r.pid for r in table.list(token_alice, include_ended=True)] == [token.pid]
    store.close()
    assert {r.pid: r.tenant for r in KernelStore(tmp_path).processes()} == {
        local.pid: "unix:alice", token.pid: "alice"}  # and durable


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


ALICE = Caller("alice", -1, False, "tcp")


def _used_and_killed(table: ProcessTable, name: str, tokens_out: int) -> int:
    pid = asyncio.run(table.spawn(ALICE, ProcessSpec(name))).pid

    def listener(reason: str) -> None:
        pass

    table.begin_ask(ALICE, pid, listener)
    table.end_ask(pid, listener, Usage(tokens_in=3, tokens_out=tokens_out, cost=0.5))
    asyncio.run(table.kill(ALICE, pid))
    return pid


def test_ended_processes_are_reaped_after_retention_and_their_usage_stays(tmp_path):
    clock = Clock()
    store = KernelStore(tmp_path)
    table = ProcessTable(store, clock=clock, reap_after_s=3600)
    old = [_used_and_killed(table, f"old{i}", tokens_out=10) for i in range(3)]
    clock.now += 1800
    recent = _used_and_killed(table, "recent", tokens_out=100)
    live = asyncio.run(table.spawn(ALICE, ProcessSpec("live"))).pid
    clock.now += 1801  # the first three ended over an hour ago, the recent one did not

    assert sorted(table.reap()) == old
    assert {r.pid for r in table.list(ALICE, include_ended=True)} == {recent, live}
    for pid in old:
        with pytest.raises(NotFound):
            table.get(ALICE, pid)
    live_count, sums = table.tenant_totals(ALICE)["alice"]
    assert (live_count, sums.asks, sums.tokens_out, sums.cost) == (1, 4, 130, 2.0)
    assert table.reap() == []  # nothing more is due
    store.close()

    # After a restart: the reaped records are gone from the store, their usage is not.
    store = KernelStore(tmp_path)
    assert {r.pid for r in store.processes()} == {recent, live}
    table = ProcessTable(store, clock=clock, reap_after_s=3600)
    _, sums = table.tenant_totals(ALICE)["alice"]
    assert (sums.asks, sums.tokens_out, sums.tokens_in) == (4, 130, 12)
    clock.now += 3600
    assert table.reap() == [recent]
    _, sums = table.tenant_totals(ALICE)["alice"]
    assert (sums.asks, sums.tokens_out) == (4, 130)
    assert table.tenant_totals(Caller("bob", -1, False, "tcp")) == {}  # others see none of it
    store.close()


def test_a_process_with_an_ask_still_running_is_not_reaped(tmp_path):
    clock = Clock()
    store = KernelStore(tmp_path)
    table = ProcessTable(store, clock=clock, reap_after_s=60)
    pid = asyncio.run(table.spawn(ALICE, ProcessSpec("busy"))).pid

    def listener(reason: str) -> None:
        pass

    table.begin_ask(ALICE, pid, listener)
    asyncio.run(table.kill(ALICE, pid))
    clock.now += 120
    assert table.reap() == []
    table.end_ask(pid, listener, Usage(tokens_out=2))
    clock.now += 120
    assert table.reap() == [pid]
    store.close()
