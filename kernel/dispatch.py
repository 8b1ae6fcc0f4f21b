"""Dispatcher: carries out the planner's decisions for the asks waiting on a model's slots."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

from kernel.scheduler import FairShare, Planner, Policy, Request


@dataclass(eq=False)
class Lease:
    """One ask's claim on a model slot: queued until granted, then held until released."""

    request: Request
    on_preempt: Callable[[], None]
    granted: asyncio.Event = field(default_factory=asyncio.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    waited_ms: float = 0.0


class Pool:
    """The slots of one physical model (its max_batch), filled by the planner."""

    def __init__(self, planner: Planner, capacity: int):
        self.planner = planner
        self.capacity = capacity
        self.queued: list[Lease] = []
        self.running: list[Lease] = []

    def schedule(self) -> None:
        free = self.capacity - len(self.running)
        plan = self.planner.plan([l.request for l in self.queued],
                                 [l.request for l in self.running], free)
        by_request = {id(l.request): l for l in (*self.queued, *self.running)}
        for request in plan.preempt:
            lease = by_request[id(request)]
            self.running.remove(lease)  # its slot is free now; the ask re-queues itself
            lease.on_preempt()
        for request in plan.admit:
            lease = by_request[id(request)]
            self.queued.remove(lease)
            self.running.append(lease)
            lease.waited_ms = (time.perf_counter() - lease.queued_at) * 1000
            lease.granted.set()


class Dispatcher:
    """Admission and ordering of asks across all tenants, one pool per model."""

    def __init__(self, policy: Policy = Policy.FAIR, weights: dict[str, float] | None = None,
                 default_capacity: int = 8, max_slots: int = 0):
        self.policy = policy
        self.max_slots = max_slots
        self.fair = FairShare(weights)
        self.default_capacity = default_capacity
        self._pools: dict[str, Pool] = {}
        self._ids = itertools.count(1)
        self._default_model = ""
        self.replan_tokens = 16
        self._since_plan = 0

    # The dispatcher is the one writer of the default model and of the tenants' weights.
    @property
    def default_model(self) -> str:
        return self._default_model

    def set_default_model(self, model: str) -> None:
        """The model an ask uses when its process names none (the model service says which)."""
        self._default_model = model

    def set_weight(self, tenant: str, weight: float) -> None:
        """A tenant's fair-share weight (validated and stored by the process table first)."""
        self.fair.set_weight(tenant, weight)

    def pool(self, model: str) -> Pool:
        pool = self._pools.get(model)
        if pool is None:
            pool = Pool(Planner(self.policy, self.fair), self._cap(self.default_capacity))
            self._pools[model] = pool
        return pool

    def _cap(self, capacity: int) -> int:
        return min(capacity, self.max_slots) if self.max_slots else capacity

    def set_capacity(self, model: str, capacity: int) -> None:
        pool = self.pool(model)
        capacity = self._cap(capacity)
        if capacity > 0 and capacity != pool.capacity:
            pool.capacity = capacity
            pool.schedule()

    def request(self, pid: int, tenant: str, priority: int, deadline: float | None) -> Request:
        return Request(req_id=next(self._ids), pid=pid, tenant=tenant, priority=priority,
                       arrival=time.monotonic(), deadline=deadline)

    async def acquire(self, model: str, lease: Lease) -> None:
        """Wait until the planner grants `lease` a slot; cancelling the wait leaves the queue."""
        pool = self.pool(model)
        active = {l.request.tenant for l in (*pool.queued, *pool.running)}
        if lease.request.tenant not in active:
            self.fair.activate(lease.request.tenant, active)
        lease.granted.clear()
        lease.queued_at = time.perf_counter()
        pool.queued.append(lease)
        pool.schedule()
        try:
            await lease.granted.wait()
        except asyncio.CancelledError:
            self._drop(pool, lease)
            raise

    def release(self, model: str, lease: Lease) -> None:
        pool = self.pool(model)
        self._drop(pool, lease)
        pool.schedule()

    def charge(self, tenant: str, tokens: int) -> None:
        """Count decoded tokens (once per streamed piece, however many tokens it carries);
        every `replan_tokens`, let pools with waiters reconsider (preemption)."""
        self.fair.charge(tenant, tokens)
        self._since_plan += tokens
        if self._since_plan >= self.replan_tokens:
            self._since_plan = 0
            for pool in self._pools.values():
                if pool.queued:
                    pool.schedule()

    def _drop(self, pool: Pool, lease: Lease) -> None:
        if lease in pool.queued:
            pool.queued.remove(lease)
        if lease in pool.running:
            pool.running.remove(lease)

    def snapshot(self) -> dict:
        """Counts for introspection: per tenant running and queued, and the totals."""
        per_tenant: dict[str, list[int]] = {}
        running = queued = 0
        for pool in self._pools.values():
            for lease in pool.running:
                per_tenant.setdefault(lease.request.tenant, [0, 0])[0] += 1
                running += 1
            for lease in pool.queued:
                per_tenant.setdefault(lease.request.tenant, [0, 0])[1] += 1
                queued += 1
        # Slots of the default model plus those of any other model in use right now.
        capacity = sum(p.capacity for name, p in self._pools.items()
                       if name == self._default_model or p.running or p.queued)
        return {"tenants": per_tenant, "capacity": capacity or self.default_capacity,
                "running": running, "queued": queued}
