"""The scheduling planner without any model: fairness, priority, deadlines, preemption, fifo."""

from kernel.scheduler import FairShare, Plan, Planner, Policy, Request


def reqs(tenant, n, start=0, **kw):
    return [Request(req_id=start + i, pid=start + i, tenant=tenant, arrival=float(start + i), **kw)
            for i in range(n)]


def test_fifo_admits_in_arrival_order_and_never_preempts():
    queued = reqs("a", 8, 0) + reqs("b", 1, 100)
    plan = Planner(Policy.FIFO).plan(queued, running=[], capacity=4)
    assert [r.req_id for r in plan.admit] == [0, 1, 2, 3] and plan.preempt == []


def test_fair_share_splits_free_slots_between_backlogged_tenants():
    queued = reqs("a", 8, 0) + reqs("b", 8, 100)
    plan = Planner().plan(queued, running=[], capacity=8)
    tenants = [r.tenant for r in plan.admit]
    assert tenants.count("a") == 4 and tenants.count("b") == 4


def test_weights_shape_the_split():
    planner = Planner(fair=FairShare(weights={"a": 3.0, "b": 1.0}))
    plan = planner.plan(reqs("a", 8, 0) + reqs("b", 8, 100), running=[], capacity=8)
    assert [r.tenant for r in plan.admit].count("a") == 6


def test_tenant_that_already_holds_slots_waits_for_the_other():
    running = reqs("a", 3, 0)
    plan = Planner().plan(reqs("a", 5, 10) + reqs("b", 2, 100), running=running, capacity=2)
    assert [r.tenant for r in plan.admit] == ["b", "b"]


def test_priority_then_deadline_within_a_tenant():
    low = Request(1, 1, "a", priority=5, arrival=0.0)
    high = Request(2, 2, "a", priority=30, arrival=1.0)
    urgent = Request(3, 3, "a", priority=0, arrival=2.0, deadline=10.0)
    plan = Planner().plan([low, high, urgent], running=[], capacity=2)
    assert [r.req_id for r in plan.admit] == [3, 2]


def test_over_served_tenant_is_preempted_for_a_starved_one():
    fair = FairShare()
    fair.charge("b", 100)
    fair.charge("a", 5000)
    running = reqs("a", 4, 0)
    plan = Planner(fair=fair).plan(reqs("b", 1, 100), running=running, capacity=0)
    assert [r.tenant for r in plan.admit] == ["b"]
    assert len(plan.preempt) == 1 and plan.preempt[0].tenant == "a"


def test_small_gaps_do_not_preempt_once_each_tenant_holds_its_share():
    fair = FairShare()
    fair.charge("a", 10)
    running = reqs("a", 2, 0) + reqs("b", 2, 50)
    plan = Planner(fair=fair).plan(reqs("b", 1, 100), running=running, capacity=0)
    assert plan == Plan()


def test_a_tenant_without_its_share_of_slots_takes_it_at_once():
    """b starts asking while a fills every slot: b gets its half now, not once a is a
    margin ahead, and not more than its half."""
    fair = FairShare()
    fair.charge("a", 10)
    plan = Planner(fair=fair).plan(reqs("b", 3, 100), running=reqs("a", 4, 0), capacity=0)
    assert [r.tenant for r in plan.admit] == ["b", "b"]
    assert [r.tenant for r in plan.preempt] == ["a", "a"]


def test_a_tenant_behind_in_virtual_time_keeps_its_extra_slots():
    fair = FairShare()
    fair.charge("b", 10)  # b was served more: a's extra slots are its due
    plan = Planner(fair=fair).plan(reqs("b", 3, 100), running=reqs("a", 4, 0), capacity=0)
    assert plan == Plan()


def test_higher_priority_in_same_tenant_preempts_lowest():
    running = [Request(1, 1, "a", priority=1), Request(2, 2, "a", priority=20)]
    plan = Planner().plan([Request(3, 3, "a", priority=39)], running=running, capacity=0)
    assert [r.req_id for r in plan.preempt] == [1] and [r.req_id for r in plan.admit] == [3]


def test_idle_tenant_gets_no_banked_credit():
    fair = FairShare()
    fair.charge("a", 1000)
    fair.activate("b", active={"a"})
    assert fair.vtime["b"] == fair.vtime["a"]


def test_no_capacity_no_queue_no_plan():
    assert Planner().plan([], running=[], capacity=8) == Plan()
    assert Planner().plan(reqs("a", 3), running=[], capacity=0) == Plan()
