"""The Ask interruption state machine, and the kernel's data-side domain (ContextManager) and
service registry, without daemons."""

from __future__ import annotations

import asyncio

import pytest

from kernel.context import ContextManager
from kernel.identity import Caller
from kernel.interrupt import STOPPING, TRANSITIONS, Interrupt, Interruption
from kernel.memory import Candidates, Item, PageTable
from kernel.outbox import ExchangeOutbox, OutboxStore
from kernel.ports import CandidatesReply
from kernel.registry import ServiceRegistry
from kernel.store import KernelStore
from kernel.table import ProcessTable
from vfmos_runtime.errors import InvalidArgument, Unavailable
from vfmos_runtime.types import ProcessSpec

I = Interruption


class Stream:
    def __init__(self):
        self.cancelled = 0

    def cancel(self):
        self.cancelled += 1


def test_killed_is_final_and_reachable_from_every_other_state():
    assert TRANSITIONS[I.KILLED] == frozenset()
    for state in I:
        if state is not I.KILLED:
            assert I.KILLED in TRANSITIONS[state]
    assert set(TRANSITIONS) == set(I)


def test_the_table_words_name_the_states():
    assert [I(w) for w in ("killed", "suspended", "resumed")] == [I.KILLED, I.SUSPENDED,
                                                                 I.RESUMED]


def test_moot_events_are_ignored():
    it = Interrupt()
    assert not it.fire("resumed") and it.state is I.NONE  # nothing to resume
    assert it.fire("suspended")
    assert not it.fire(I.PREEMPTED) and it.state is I.SUSPENDED  # already stopped
    assert it.fire("killed")
    for event in I:
        assert not it.fire(event)
    assert it.state is I.KILLED


def test_stopping_events_cancel_the_attached_stream_and_only_those():
    it, stream = Interrupt(), Stream()
    it.attach(stream)
    assert it.fire(I.PREEMPTED) and stream.cancelled == 1
    it.settle()
    assert it.state is I.NONE
    it.fire(I.SUSPENDED)
    it.fire(I.RESUMED)
    assert stream.cancelled == 2  # the resume did not cancel anything
    it.attach(None)
    it.fire(I.KILLED)  # nothing attached: nothing to cancel
    assert stream.cancelled == 2
    assert STOPPING == {I.PREEMPTED, I.SUSPENDED, I.KILLED}


def test_a_preemption_before_the_stream_starts_cancels_it_on_attach():
    it, stream = Interrupt(), Stream()
    it.fire(I.PREEMPTED)
    it.attach(stream)
    assert stream.cancelled == 1


def test_a_resumed_ask_can_be_preempted_before_it_settles():
    it = Interrupt()
    it.fire(I.SUSPENDED)
    it.fire(I.RESUMED)
    assert not it.stops_waiting
    assert it.fire(I.PREEMPTED)
    it.settle()
    assert it.state is I.NONE


class Data:
    def __init__(self, fail: bool = False):
        self.fail = fail
        self.queries, self.remembered = [], []

    async def candidates(self, query):
        if self.fail:
            raise Unavailable("service vfm-datad is down")
        self.queries.append(query)
        ranked = [Item(kind="memory", text=f"turn {i}", tokens=10, source_ids=[f"mem:{i}"],
                       page=i // 4, seq=i) for i in range(8)]
        return CandidatesReply(Candidates([], [], ranked, []), pages=2)

    async def remember(self, tenant, pid, entries, exchange_id=""):
        self.remembered.append((tenant, pid, entries))

    async def fork_memory(self, tenant, parent, child):
        pass


ALICE = Caller("alice", 1000, False, "unix")


def test_working_set_comes_from_the_data_port_and_counts_pages(tmp_path):
    store = KernelStore(tmp_path)
    try:
        table = ProcessTable(store)
        record = asyncio.run(table.spawn(ALICE, ProcessSpec(name="p", collections=["docs"])))
        data = Data()
        context = ContextManager(table, data, PageTable(store),
                                 ExchangeOutbox(OutboxStore(store), data))

        async def scenario():
            ws = await context.working_set(record, "what?", budget=35, touch=True)
            assert await context.remember_exchange(record, "what?", "that.") == ""
            await asyncio.sleep(0.01)
            return ws
        ws = asyncio.run(scenario())
        assert ws.assembly.used <= 35 and len(ws.assembly.items) == 3 and ws.pages == 2
        assert ws.faults == 1 and table.get(ALICE, record.pid).counters.page_faults == 1
        query = data.queries[0]
        assert (query.tenant, query.pid, query.collections) == ("alice", record.pid, ("docs",))
        tenant, pid, entries = data.remembered[0]
        assert [(e.speaker, e.text) for e in entries] == [("user", "what?"),
                                                          ("assistant", "that.")]
        with pytest.raises(InvalidArgument):
            asyncio.run(context.working_set(record, "what?", budget=-1))
        down = Data(fail=True)
        failing = ContextManager(table, down, PageTable(store),
                                 ExchangeOutbox(OutboxStore(store), down))
        # the ask goes on, and knows why it has no working set
        assert asyncio.run(failing.for_ask(record, "what?")) == ([], "vfm-datad not reachable")
    finally:
        store.close()


def test_registry_refuses_unknown_services_and_names_a_missing_one(tmp_path):
    store = KernelStore(tmp_path)
    try:
        registry = ServiceRegistry(store)
        with pytest.raises(InvalidArgument):
            asyncio.run(registry.register("vfm-nope", "unix:/tmp/x.sock", 1))
        with pytest.raises(Unavailable, match="vfm-modeld is not running"):
            registry.channel("vfm-modeld")

        async def scenario():
            await registry.register("vfm-modeld", "unix:/tmp/x.sock", 42)
            channel = registry.channel("vfm-modeld")
            assert registry.channel("vfm-modeld") is channel  # one channel per service
            await registry.close()
        asyncio.run(scenario())
        assert ServiceRegistry(store).entries()[0].pid == 42  # registrations persist
    finally:
        store.close()
