"""Pure scheduling planner: given the queue, the running set and free capacity, decide who runs.

No model and no I/O here: the kernel feeds it requests and token charges and carries out
the plan it returns (the vLLM-v1 split between planner and executor).
"""

from __future__ import annotations

import enum
import heapq
import itertools
from dataclasses import dataclass, field


class Policy(enum.Enum):
    FAIR = "fair"    # weighted fair share across tenants (virtual time over tokens)
    FIFO = "fifo"    # arrival order: the baseline other agent OSes use


@dataclass
class Request:
    """One Ask waiting for, or holding, a slot in the model service's batch."""

    req_id: int
    pid: int
    tenant: str
    priority: int = 20
    arrival: float = 0.0
    deadline: float | None = None   # absolute time for the first token (SLO), if any
    seq: int = field(default_factory=itertools.count().__next__)

    def order_in_tenant(self) -> tuple:
        # Earliest deadline first, then higher priority, then first come.
        return (self.deadline is None, self.deadline or 0.0, -self.priority, self.arrival, self.seq)


@dataclass
class Plan:
    admit: list[Request] = field(default_factory=list)
    preempt: list[Request] = field(default_factory=list)


class FairShare:
    """Start-time fair queuing over decode tokens: each tenant's virtual time grows by
    tokens/weight, the tenant with the smallest virtual time is served next.

    A tenant that was idle rejoins at the current virtual time (no banked credit), so
    it cannot starve others after a pause; that is what makes it fair *while backlogged*.
    """

    def __init__(self, weights: dict[str, float] | None = None, default_weight: float = 1.0):
        self.weights = dict(weights or {})
        self.default_weight = default_weight
        self.vtime: dict[str, float] = {}

    def weight(self, tenant: str) -> float:
        return max(1e-9, self.weights.get(tenant, self.default_weight))

    def set_weight(self, tenant: str, weight: float) -> None:
        self.weights[tenant] = weight

    def charge(self, tenant: str, tokens: int) -> None:
        # Once per streamed piece of every running ask: no scan of all tenants here.
        vt = self.vtime.get(tenant)
        if vt is None:
            vt = self.floor()
        self.vtime[tenant] = vt + tokens / self.weight(tenant)

    def floor(self) -> float:
        return min(self.vtime.values(), default=0.0)

    def activate(self, tenant: str, active: set[str]) -> None:
        """A tenant with no work that gets some starts at the least active virtual time."""
        floor = min((self.vtime.get(t, 0.0) for t in active if t != tenant), default=self.floor())
        self.vtime[tenant] = max(self.vtime.get(tenant, 0.0), floor)


class Planner:
    def __init__(self, policy: Policy = Policy.FAIR, fair: FairShare | None = None,
                 preempt_margin_tokens: float = 64.0):
        self.policy = policy
        self.fair = fair or FairShare()
        # A running request is preempted for another tenant only when the gap in virtual
        # time is this large: preempting costs a re-prefill, so small gaps are not worth it.
        self.preempt_margin = preempt_margin_tokens

    def plan(self, queued: list[Request], running: list[Request], capacity: int) -> Plan:
        """Fill `capacity` free slots; may preempt running requests of over-served tenants."""
        if self.policy is Policy.FIFO:
            order = sorted(queued, key=lambda r: (r.arrival, r.seq))
            return Plan(admit=order[:max(0, capacity)])
        plan = Plan()
        picks = self._fair_order(queued, running, capacity + len(running))
        free = capacity
        victims = list(running)
        slots = _Slots(self.fair, queued, running, capacity)
        for request in picks:
            if free > 0:
                plan.admit.append(request)
                slots.held[request.tenant] += 1
                free -= 1
                continue
            victim = self._victim_for(request, victims, slots)
            if victim is None:
                continue  # a later pick (another tenant, a higher priority) may still displace one
            victims.remove(victim)
            plan.preempt.append(victim)
            plan.admit.append(request)
            slots.held[victim.tenant] -= 1
            slots.held[request.tenant] += 1
        return plan

    def _victim_for(self, incoming: Request, running: list[Request],
                    slots: "_Slots") -> Request | None:
        """Whom `incoming` may displace: first a lower-priority ask of its own tenant, else an
        ask of a tenant that is ahead of it by more than the margin (the most served first),
        or that is ahead at all and holds more than its share of the slots while `incoming`'s
        tenant holds less (a tenant that starts asking while another fills every slot gets
        its share now, not once the other is a margin ahead)."""
        own = [r for r in running if r.tenant == incoming.tenant and r.priority < incoming.priority]
        if own:
            return min(own, key=lambda r: (r.priority, -r.arrival))
        vt = self.fair.vtime

        def displaceable(r: Request) -> bool:
            gap = vt.get(r.tenant, 0.0) - vt.get(incoming.tenant, 0.0)
            return gap > self.preempt_margin or (gap >= 0 and slots.may_move(r.tenant,
                                                                             incoming.tenant))
        others = [r for r in running if r.tenant != incoming.tenant and displaceable(r)]
        if not others:
            return None
        return max(others, key=lambda r: (vt.get(r.tenant, 0.0), -r.priority, r.arrival))

    def _fair_order(self, queued: list[Request], running: list[Request], limit: int) -> list[Request]:
        """Queued requests in the order fair share would serve them, up to `limit`."""
        by_tenant: dict[str, list[Request]] = {}
        for r in queued:
            by_tenant.setdefault(r.tenant, []).append(r)
        for reqs in by_tenant.values():
            reqs.sort(key=Request.order_in_tenant, reverse=True)  # pop() takes the best
        in_flight: dict[str, int] = {}
        for r in running:
            in_flight[r.tenant] = in_flight.get(r.tenant, 0) + 1
        # Each slot a tenant holds counts as one unit of its share in this round.
        heap = [(self._slot_vtime(t, in_flight.get(t, 0)), t) for t in by_tenant]
        heapq.heapify(heap)
        order: list[Request] = []
        while heap and len(order) < limit:
            _, tenant = heapq.heappop(heap)
            order.append(by_tenant[tenant].pop())
            in_flight[tenant] = in_flight.get(tenant, 0) + 1
            if by_tenant[tenant]:
                heapq.heappush(heap, (self._slot_vtime(tenant, in_flight[tenant]), tenant))
        return order

    def _slot_vtime(self, tenant: str, slots: int) -> float:
        return self.fair.vtime.get(tenant, self.fair.floor()) + \
            slots * self.preempt_margin / self.fair.weight(tenant)


class _Slots:
    """Slots held per tenant during one planning round, against each tenant's weighted
    share of all the model's slots (among tenants with asks queued or running)."""

    def __init__(self, fair: FairShare, queued: list[Request], running: list[Request],
                 free: int):
        self.held: dict[str, int] = {r.tenant: 0 for r in (*queued, *running)}
        for r in running:
            self.held[r.tenant] += 1
        total = sum(fair.weight(t) for t in self.held) or 1.0
        self.share = {t: (len(running) + free) * fair.weight(t) / total for t in self.held}

    def may_move(self, source: str, target: str) -> bool:
        """Whether a slot of `source` may go to `target` without either crossing its share
        (so the move can never be undone by the same rule: no ping-pong)."""
        return (self.held[target] + 1 <= self.share[target]
                and self.held[source] - 1 >= self.share[source])
