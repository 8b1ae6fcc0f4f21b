"""The kernel store's group-commit writer: writes that queue up share a commit, a failing write
fails alone, close() drains; an Ask's bookkeeping is one write at its end."""

import asyncio
import threading

import lmdb
import pytest

from kernel.identity import Caller
from kernel.memory import Item, PageTable
from kernel.process import ProcState
from kernel.store import KernelStore
from kernel.table import ProcessTable
from kernel.writer import WriterClosed
from vfmos_runtime.types import ProcessSpec, Usage

ALICE = Caller("alice", 1000, False, "unix")


class HeldCommit:
    """A before_commit hook that holds the first commit until released."""

    def __init__(self):
        self.inside = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        if not self.inside.is_set():
            self.inside.set()
            assert self.release.wait(10)


def test_writes_queued_during_a_commit_go_out_in_the_next_single_transaction(tmp_path):
    hold = HeldCommit()
    store = KernelStore(tmp_path, before_commit=hold)
    first = store.put_meta("first", 0)
    assert hold.inside.wait(10)  # that commit is in flight now
    queued = [store.put_meta(f"k{i}", i) for i in range(50)]
    assert not any(f.done() for f in queued)
    hold.release.set()
    for future in (first, *queued):
        assert future.result(10) is None
    assert store.transactions == 2  # the first write's, then one for all 50
    assert [store.get_meta(f"k{i}") for i in range(50)] == list(range(50))
    store.close()


TOO_BIG = b"x" * (4 << 20)  # for a 1 MiB map


def test_a_failing_write_surfaces_to_its_awaiter(tmp_path):
    store = KernelStore(tmp_path, map_size=1 << 20)

    async def awaited():
        with pytest.raises(lmdb.MapFullError):
            await asyncio.wrap_future(store.put_meta("big", TOO_BIG))
    asyncio.run(awaited())
    assert store.put_meta("small", 1).result(10) is None  # the writer lives on
    store.close()


def test_a_failing_write_fails_alone_in_its_group(tmp_path):
    hold = HeldCommit()
    store = KernelStore(tmp_path, map_size=1 << 20, before_commit=hold)
    opener = store.put_meta("opener", 1)
    assert hold.inside.wait(10)
    before, bad, after = (store.put_meta("before", 2), store.put_meta("big", TOO_BIG),
                          store.put_meta("after", 3))
    hold.release.set()
    assert opener.result(10) is None and before.result(10) is None and after.result(10) is None
    assert isinstance(bad.exception(10), lmdb.MapFullError)
    assert [store.get_meta(k) for k in ("before", "after", "big")] == [2, 3, None]
    assert store.put_meta("later", 4).result(10) is None  # still writing
    store.close()


def test_a_queued_write_cannot_be_cancelled(tmp_path):
    hold = HeldCommit()
    store = KernelStore(tmp_path, before_commit=hold)
    store.put_meta("opener", 0)
    assert hold.inside.wait(10)
    queued = store.put_meta("kept", 1)
    assert not queued.cancel()  # memory already shows the change: its write must happen
    hold.release.set()
    assert queued.result(10) is None and store.get_meta("kept") == 1
    store.close()


def test_close_commits_everything_queued(tmp_path):
    hold = HeldCommit()
    store = KernelStore(tmp_path, before_commit=hold)
    store.put_meta("opener", 0)
    assert hold.inside.wait(10)
    queued = [store.put_meta(f"k{i}", i) for i in range(20)]
    store.stage_page_table(7, {"pages": [[0, True, 1.0, 0.5, False]]})
    threading.Timer(0.2, hold.release.set).start()
    store.close()
    assert all(f.done() and f.exception() is None for f in queued)
    with pytest.raises(WriterClosed):
        store.put_meta("late", 1)
    reopened = KernelStore(tmp_path)
    assert [reopened.get_meta(f"k{i}") for i in range(20)] == list(range(20))
    assert reopened.get_page_table(7) == {"pages": [[0, True, 1.0, 0.5, False]]}
    reopened.close()


def _page_item(page: int) -> Item:
    return Item("memory", f"entry on page {page}", 5, [f"mem:{page}"], page=page, seq=page)


def test_an_ask_makes_one_write_at_its_end(tmp_path):
    store = KernelStore(tmp_path)
    table, pages = ProcessTable(store), PageTable(store)
    pid = asyncio.run(table.spawn(ALICE, ProcessSpec(name="asker"))).pid
    before = store.transactions

    def listener(reason: str) -> None:
        pass

    table.begin_ask(ALICE, pid, listener)
    faults, hits, _ = pages.touch(pid, [_page_item(0), _page_item(3)])
    table.count_pages(pid, faults, hits)
    table.segment_started(pid)
    assert table.state(pid) == ProcState.RUNNING
    table.segment_ended(pid)
    table.end_ask(pid, listener, Usage(tokens_in=5, tokens_out=7))
    store.close()
    assert store.transactions == before + 1

    reopened = KernelStore(tmp_path)
    (record,) = reopened.processes()
    assert (record.state, record.counters.asks, record.counters.tokens_out) == (
        ProcState.READY, 1, 7)
    assert (record.counters.page_faults, record.counters.page_hits) == (2, 0)
    assert PageTable(reopened).resident(pid) == 2
    reopened.close()


def test_a_context_touch_outside_an_ask_is_written_at_once(tmp_path):
    store = KernelStore(tmp_path)
    table, pages = ProcessTable(store), PageTable(store)
    pid = asyncio.run(table.spawn(ALICE, ProcessSpec(name="reader"))).pid
    before = store.transactions
    faults, hits, _ = pages.touch(pid, [_page_item(1)])
    table.count_pages(pid, faults, hits)  # no Ask runs: nothing else would write them
    store.close()
    assert store.transactions == before + 1
    reopened = KernelStore(tmp_path)
    (record,) = reopened.processes()
    assert record.counters.page_faults == 1 and PageTable(reopened).resident(pid) == 1
    reopened.close()
