"""vfm-datad's CPU shares: the planner alone, then the slots with real threads."""

from __future__ import annotations

import threading

import pytest

from services.data.fairshare import CpuShares, FairQueue, Work
from vfmos_runtime.errors import Cancelled


def test_a_free_slot_goes_to_the_tenant_that_used_least():
    q = FairQueue()
    for i in range(5):
        q.push("bulk", f"bulk-{i}")
    assert q.pop() == "bulk-0"
    q.charge("bulk", 30.0)
    q.done("bulk")
    q.push("light", "recall")
    # The newcomer joins at the busy tenant's virtual time; the tie goes to the shorter queue.
    assert q.pop() == "recall"
    assert q.pop() == "bulk-1"


def test_an_idle_tenant_banks_no_credit():
    q = FairQueue()
    q.push("a", "a1")
    assert q.pop() == "a1"
    q.charge("a", 100.0)
    q.done("a")
    q.push("b", "b1")  # b joins at the current virtual time, 100, not at 0
    assert q.pop() == "b1"
    q.charge("b", 50.0)
    q.push("a", "a2")  # a was idle meanwhile: it rejoins at b's 150, not at its own 100
    q.push("b", "b2")
    q.done("b")
    assert [q.pop(), q.pop()] == ["a2", "b2"]


def test_the_last_free_slot_is_kept_for_a_tenant_holding_none():
    q = FairQueue()
    for i in range(3):
        q.push("bulk", f"bulk-{i}")
    assert q.pop() == "bulk-0"
    assert q.pop(last_slot=True) is None  # bulk already holds a slot
    q.push("light", "recall")
    assert q.pop(last_slot=True) == "recall"


def test_withdrawn_items_are_not_granted():
    q = FairQueue()
    q.push("a", "x")
    assert q.remove("a", "x") and not q.remove("a", "x")
    assert q.pop() is None


def test_bulk_work_lets_another_tenant_in_at_its_next_checkpoint():
    """A long job holds the only slot; another tenant's call gets it at the job's next
    checkpoint, long before the job ends."""
    shares = CpuShares(1)
    order: list[str] = []
    light_waiting = threading.Event()

    def bulk() -> None:
        shares.acquire("bulk", threading.Event())
        work = Work(shares, "bulk")

        def job():
            light_waiting.wait()
            for step in range(100):
                order.append("bulk")
                work.checkpoint()
        work.run(job)

    def light() -> None:
        threading.Timer(0.2, light_waiting.set).start()
        shares.acquire("light", threading.Event())
        order.append("light")
        shares.release("light", 0.001)

    threads = [threading.Thread(target=bulk), threading.Thread(target=light)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert order.count("bulk") == 100 and order.index("light") <= 1


def test_a_second_job_of_one_tenant_leaves_the_last_slot_free():
    shares = CpuShares(2)
    shares.acquire("bulk", threading.Event())
    second = threading.Thread(target=shares.acquire, args=("bulk", threading.Event()))
    second.start()
    shares.acquire("light", threading.Event())  # granted at once: the reserve
    shares.release("light", 0.01)
    second.join(0.5)
    assert second.is_alive()  # the free slot stays the reserve
    shares.release("bulk", 0.01)
    second.join(5)
    assert not second.is_alive()


def test_a_cancelled_job_stops_at_its_checkpoint():
    shares = CpuShares(1)
    shares.acquire("a", threading.Event())
    work = Work(shares, "a")
    steps = []

    def job():
        for step in range(100):
            steps.append(step)
            if step == 3:
                work.cancel()
            work.checkpoint()

    with pytest.raises(Cancelled):
        work.run(job)
    assert steps == [0, 1, 2, 3]
    shares.acquire("b", threading.Event())  # the slot was given back


def test_bulk_work_runs_below_interactive_work(tmp_path):
    """Bulk work yields the cores to the models and to other tenants' calls at the OS level."""
    import asyncio
    import os

    from vfmos_runtime.embed import load_embedder
    from services.data.service import DataService
    from services.data.tokens import TokenCounter

    def niceness(checkpoint=None) -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def both(service):
        return await service.run("t", niceness), await service.run_batches("t", niceness)

    service = DataService(tmp_path, load_embedder(), TokenCounter(None), map_size=1 << 24)
    try:
        interactive, bulk = asyncio.run(both(service))
    finally:
        service.close()
    assert bulk > interactive
