"""The process table over a real LMDB store: what a restart does to stored processes."""

from __future__ import annotations

import asyncio

from kernel.identity import Caller
from kernel.store import KernelStore
from kernel.table import ProcessTable
from vfmos_runtime.types import ProcessSpec

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
