"""Fair shares of vfm-datad's CPU: work queued per tenant, slots granted by start-time fair queuing.

Every call's CPU work holds one of a few slots (as many as the cores the service may use;
the last free one is kept for a tenant that holds none);
long calls (an ingest, a bulk remember) give their slot back between batches, at a
checkpoint, where they also stop if their caller went away. A free slot goes to the
waiting tenant that has used the least CPU, so one tenant's bulk work delays another's
recall by one batch, not by the whole job: the kernel's scheduler does the same for tokens.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, deque
from typing import Callable, TypeVar

from vfmos_runtime.errors import Cancelled

T = TypeVar("T")


class FairQueue:
    """The planner, without threads or clocks: which waiting item gets the next free slot.

    A tenant's virtual time is the seconds of work it has done; the next slot goes to the
    waiting tenant with the smallest (ties: fewer slots held, then the shorter queue, so a
    lone recall goes before the next batch of a bulk job), arrival order within a tenant.
    A tenant that was idle rejoins at the current virtual time (the smallest of the busy
    tenants', or where it stood when the last one went idle): idling banks no credit."""

    def __init__(self):
        self._vtime: dict[str, float] = {}
        self._waiting: dict[str, deque] = {}
        self._running: Counter[str] = Counter()
        self._now = 0.0

    def push(self, tenant: str, item) -> None:
        if not self._waiting.get(tenant) and not self._running[tenant]:
            self._vtime[tenant] = max(self._vtime.get(tenant, 0.0), self._tick())
        self._waiting.setdefault(tenant, deque()).append(item)

    def pop(self, last_slot: bool = False):
        """The item to run next (its tenant now holds one more slot), or None. The last free
        slot (`last_slot`) goes only to a tenant holding none: a tenant's second job waits,
        so an interactive call of another never waits behind bulk work for a checkpoint."""
        tenants = [t for t, queue in self._waiting.items()
                   if queue and not (last_slot and self._running[t])]
        if not tenants:
            return None
        tenant = min(tenants, key=lambda t: (self._vtime[t], self._running[t],
                                             len(self._waiting[t])))
        self._running[tenant] += 1
        return self._waiting[tenant].popleft()

    def remove(self, tenant: str, item) -> bool:
        """Withdraw a waiting item (its caller gave up); False if it was not waiting."""
        queue = self._waiting.get(tenant)
        if queue and item in queue:
            queue.remove(item)
            return True
        return False

    def charge(self, tenant: str, seconds: float) -> None:
        self._vtime[tenant] = self._vtime.get(tenant, 0.0) + max(seconds, 0.0)
        self._tick()

    def done(self, tenant: str) -> None:
        """The tenant gave one slot back."""
        self._running[tenant] -= 1
        if self._running[tenant] <= 0:
            del self._running[tenant]

    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def _tick(self) -> float:
        """The current virtual time: it only moves forward."""
        busy = [v for t, v in self._vtime.items() if self._waiting.get(t) or self._running[t]]
        if busy:
            self._now = max(self._now, min(busy))
        return self._now


class _Ticket:
    """One wait for a slot; `wake` is how the waiter hears it was granted."""

    __slots__ = ("granted", "wake")

    def __init__(self, wake: Callable[[], None]):
        self.granted = False
        self.wake = wake


class CpuShares:
    """The slots and the FairQueue behind one lock; waiters are threads or coroutines."""

    def __init__(self, slots: int):
        self._plan = FairQueue()
        self._slots = self._free = slots
        self._lock = threading.Lock()

    def _enqueue(self, tenant: str, ticket: _Ticket) -> None:
        with self._lock:
            self._plan.push(tenant, ticket)
            woken = self._grant()
        for t in woken:
            t.wake()

    def _grant(self) -> list[_Ticket]:
        woken = []
        while self._free:
            ticket = self._plan.pop(last_slot=self._free == 1 and self._slots > 1)
            if ticket is None:
                break
            self._free -= 1
            ticket.granted = True
            woken.append(ticket)
        return woken

    def _withdraw(self, tenant: str, ticket: _Ticket) -> None:
        """A waiter gives up: out of the queue, or its slot back if it was just granted."""
        with self._lock:
            if self._plan.remove(tenant, ticket):
                return
        if ticket.granted:
            self.release(tenant, 0.0)

    def release(self, tenant: str, seconds: float) -> None:
        with self._lock:
            self._plan.charge(tenant, seconds)
            self._plan.done(tenant)
            self._free += 1
            woken = self._grant()
        for t in woken:
            t.wake()

    def contended(self) -> bool:
        with self._lock:
            return self._plan.waiting() > 0

    def acquire(self, tenant: str, cancelled: threading.Event) -> None:
        """Block this thread until the tenant holds a slot; Cancelled if its caller left."""
        event = threading.Event()
        ticket = _Ticket(event.set)
        self._enqueue(tenant, ticket)
        while not event.wait(0.1):
            if cancelled.is_set():
                self._withdraw(tenant, ticket)
                raise Cancelled("the caller went away")

    async def acquire_async(self, tenant: str) -> None:
        loop = asyncio.get_running_loop()
        granted = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(lambda: granted.done() or granted.set_result(None))

        ticket = _Ticket(wake)
        self._enqueue(tenant, ticket)
        try:
            await granted
        except asyncio.CancelledError:
            self._withdraw(tenant, ticket)
            raise


class Work:
    """One call's hold on a slot, from its grant to its end. Long work calls `checkpoint()`
    between batches: it stops there if the caller went away, and lets a waiting tenant in."""

    def __init__(self, shares: CpuShares, tenant: str):
        self.tenant = tenant
        self.cancelled = threading.Event()
        self._shares = shares
        self._since = time.thread_time()
        self._holding = True  # run() starts with the slot its caller was granted

    def cancel(self) -> None:
        self.cancelled.set()

    def checkpoint(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("the caller went away")
        if self._shares.contended():
            self._give_back()
            self._shares.acquire(self.tenant, self.cancelled)
            self._holding, self._since = True, time.thread_time()

    def run(self, fn: Callable[[], T]) -> T:
        """Run on a worker thread, holding the slot granted before; gives it back at the end."""
        self._since = time.thread_time()
        try:
            return fn()
        finally:
            self._give_back()

    def _give_back(self) -> None:
        if self._holding:
            self._holding = False
            self._shares.release(self.tenant, time.thread_time() - self._since)
