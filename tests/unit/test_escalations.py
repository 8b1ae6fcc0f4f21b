"""Escalations in a real kernel store: opened, listed per tenant, resolved once, waited on."""

from __future__ import annotations

import asyncio

import pytest

from kernel.audit import HEAD_FILE, AuditLog, AuditStore
from kernel.escalations import Decision, EscalationBook, EscalationState
from kernel.store import KernelStore
from vfmos_runtime.errors import FailedPrecondition, InvalidArgument, NotFound


@pytest.fixture
def book(tmp_path):
    store = KernelStore(tmp_path)
    audit = AuditLog(AuditStore(store, tmp_path / HEAD_FILE))
    yield EscalationBook(store, audit), audit
    store.close()


def run(coro):
    return asyncio.run(coro)


async def _open(book, tenant="alice", pid=1):
    return await book.open(tenant, pid, "refund 900 EUR please",
                           {"outcome": "escalate", "reasons": ["refund above 500"]},
                           "A colleague will get back to you.")


def test_open_and_list_per_tenant(book):
    book, _ = book

    async def go():
        return [await _open(book, "alice"), await _open(book, "bob"), await _open(book, "alice")]
    a1, b1, a2 = run(go())
    assert [e.id for e in book.list("alice")] == [a1, a2]
    assert [e.id for e in book.list("bob")] == [b1]
    assert {e.id for e in book.list(None)} == {a1, a2, b1}  # an administrator
    found = book.get("alice", a1)
    assert (found.state, found.pid, found.holding_reply) == (
        EscalationState.OPEN, 1, "A colleague will get back to you.")
    assert found.verdict["reasons"] == ["refund above 500"]


def test_another_tenant_can_neither_see_nor_resolve(book):
    book, audit = book
    eid = run(_open(book, "alice"))
    with pytest.raises(NotFound, match=eid):
        book.get("bob", eid)
    with pytest.raises(NotFound, match=eid):
        run(book.resolve("bob", eid, Decision.APPROVE, "", "bob"))
    with pytest.raises(NotFound):
        run(book.wait("bob", eid, 0.1))
    assert book.get("alice", eid).state == EscalationState.OPEN
    assert audit.head.seq == 0  # nothing was audited


def test_resolve_is_audited_and_final(book):
    book, audit = book

    async def go():
        eid = await _open(book)
        done = await book.resolve("alice", eid, Decision.REPLY, "Refund approved: 900 EUR.",
                                  "alice")
        return eid, done
    eid, done = run(go())
    assert (done.state, done.text, done.resolved_by, done.audit_seq) == (
        EscalationState.REPLIED, "Refund approved: 900 EUR.", "alice", 1)
    stored = book.get("alice", eid)
    assert stored.state == EscalationState.REPLIED and stored.audit_seq == 1
    [record], _ = audit.list("alice")
    assert (record["kind"], record["escalation_id"], record["decision"], record["by"]) == (
        "escalation", eid, "reply", "alice")
    assert audit.verify().ok
    with pytest.raises(FailedPrecondition, match="already replied"):
        run(book.resolve(None, eid, Decision.REJECT, "", "root"))
    assert [e.id for e in book.list("alice", EscalationState.OPEN)] == []


def test_an_admin_resolves_any_tenants(book):
    book, _ = book

    async def go():
        eid = await _open(book, "bob")
        return await book.resolve(None, eid, Decision.APPROVE, "", "unix:root")
    assert run(go()).state == EscalationState.APPROVED


def test_wait_wakes_up_on_resolution(book):
    book, _ = book

    async def go():
        eid = await _open(book)
        waiters = [asyncio.create_task(book.wait("alice", eid, 30)) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiters)
        await book.resolve("alice", eid, Decision.REJECT, "not without a receipt", "alice")
        return await asyncio.wait_for(asyncio.gather(*waiters), 5)
    for found in run(go()):
        assert (found.state, found.text) == (EscalationState.REJECTED, "not without a receipt")


def test_wait_returns_the_open_escalation_at_the_timeout(book):
    book, _ = book

    async def go():
        eid = await _open(book)
        return await book.wait("alice", eid, 0.05)
    assert run(go()).state == EscalationState.OPEN


@pytest.mark.parametrize("call, field", [
    (lambda b: b.get("alice", "nothex"), "id"),
    (lambda b: run(b.resolve("alice", "0" * 12, Decision.REPLY, " ", "alice")), "text"),
    (lambda b: run(b.wait("alice", "0" * 12, -1)), "timeout"),
])
def test_bad_input_names_the_field(book, call, field):
    book, _ = book
    with pytest.raises(InvalidArgument, match=f"^{field}:"):
        call(book)
