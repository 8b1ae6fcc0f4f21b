"""The dispatcher carrying out plans on real asyncio waits: grants, order, preemption, cancel."""

import asyncio

import pytest

from kernel.dispatch import Dispatcher, Lease
from kernel.scheduler import Policy


def run(coro):
    return asyncio.run(coro)


def lease(d: Dispatcher, tenant: str, priority: int = 20, preempted: list | None = None):
    req = d.request(pid=1, tenant=tenant, priority=priority, deadline=None)
    return Lease(req, lambda: (preempted if preempted is not None else []).append(req.req_id))


def test_grants_up_to_capacity_then_queues():
    async def scenario():
        d = Dispatcher(default_capacity=2)
        leases = [lease(d, "a") for _ in range(3)]
        tasks = [asyncio.create_task(d.acquire("m", l)) for l in leases]
        await asyncio.sleep(0)
        granted = [l.granted.is_set() for l in leases]
        d.release("m", leases[0])
        await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return granted, leases[2].granted.is_set(), d.snapshot()
    granted, third, snap = run(scenario())
    assert granted == [True, True, False] and third
    assert snap["running"] == 2 and snap["queued"] == 0


@pytest.mark.parametrize("policy,winner", [(Policy.FAIR, "b"), (Policy.FIFO, "a")])
def test_policy_decides_who_gets_the_freed_slot(policy, winner):
    """Tenant a holds the slot and decodes while a, a, b wait: fair share serves the lighter
    tenant b next, fifo serves the first to arrive."""
    async def scenario():
        d = Dispatcher(policy, default_capacity=1)
        first = lease(d, "a")
        await d.acquire("m", first)
        queued = [lease(d, "a"), lease(d, "a"), lease(d, "b")]
        tasks = [asyncio.create_task(d.acquire("m", l)) for l in queued]
        await asyncio.sleep(0)
        d.charge("a", 40)  # below the preemption margin: nobody is displaced
        d.release("m", first)
        await asyncio.sleep(0)
        granted = [l.request.tenant for l in queued if l.granted.is_set()]
        for t in tasks:
            t.cancel()
        return granted
    assert run(scenario()) == [winner]


def test_over_served_running_tenant_is_preempted():
    async def scenario():
        d = Dispatcher(default_capacity=1)
        preempted: list = []
        hog = lease(d, "a", preempted=preempted)
        await d.acquire("m", hog)
        starved = lease(d, "b")
        waiting = asyncio.create_task(d.acquire("m", starved))
        await asyncio.sleep(0)
        for _ in range(20):
            d.charge("a", 16)  # the hog keeps decoding while b waits
        await asyncio.wait_for(waiting, 1)
        return preempted, hog.request.req_id, d.snapshot()
    preempted, hog_id, snap = run(scenario())
    assert preempted == [hog_id] and snap["running"] == 1


def test_cancelled_wait_leaves_the_queue():
    async def scenario():
        d = Dispatcher(default_capacity=1)
        holder = lease(d, "a")
        await d.acquire("m", holder)
        waiter = asyncio.create_task(d.acquire("m", lease(d, "b")))
        await asyncio.sleep(0)
        queued_before = d.snapshot()["queued"]
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        return queued_before, d.snapshot()["queued"]
    assert run(scenario()) == (1, 0)


def test_capacity_change_admits_waiters():
    async def scenario():
        d = Dispatcher(default_capacity=1)
        a, b = lease(d, "a"), lease(d, "b")
        await d.acquire("m", a)
        task = asyncio.create_task(d.acquire("m", b))
        await asyncio.sleep(0)
        d.set_capacity("m", 2)
        await asyncio.wait_for(task, 1)
        return b.granted.is_set()
    assert run(scenario())
