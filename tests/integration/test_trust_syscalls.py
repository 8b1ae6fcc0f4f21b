"""The trust syscalls over the real vfmd socket: audit records, chain checks and escalations stay
within their tenant; policies go to vfm-trustd as the caller's tenant and are audited."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import lmdb
import pytest

from kernel.audit import HEAD_FILE, AuditLog, AuditStore, canonical
from kernel.escalations import EscalationBook
from kernel.store import KernelStore
from libvfm import Client
from libvfm.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.conftest import Daemon, free_port, start_kernel, wait_for
from vfmos_runtime.storage import U64, pack, unpack
from vfmos.kernel.v1 import kernel_pb2 as pb
from vfmos.kernel.v1 import kernel_pb2_grpc

TENANTS = ("alice", "bob")


def _seed(state_dir: Path, asks_per_tenant: int = 3) -> dict:
    """Records and escalations written by the kernel's own code into its store before it
    starts (the Ask path that writes them in a running kernel is another part's)."""
    store = KernelStore(state_dir)
    audit = AuditLog(AuditStore(store, state_dir / HEAD_FILE))
    book = EscalationBook(store, audit)
    for i in range(asks_per_tenant):
        for n, tenant in enumerate(TENANTS):
            audit.append({"kind": "ask", "tenant": tenant, "pid": 10 + n, "time": 1000.0 + i,
                          "model": "tiny", "policy_version": 1,
                          "verdict": "refuse" if i == 1 else "allow",
                          "reasons": ["a reason"] if i == 1 else [],
                          "checks": [{"check": "moderation", "score": 0.2, "threshold": 0.5,
                                      "outcome": "allow", "system": 1}],
                          "tokens_in": 5, "tokens_out": 7, "cost": 0.01,
                          "prompt_sha256": "a" * 64, "answer_sha256": "b" * 64})

    async def escalate():
        return {t: await book.open(t, 10, f"{t}: refund 900 EUR",
                                   {"outcome": "escalate", "reasons": ["refund above 500"],
                                    "escalation_rule": "refund"}, "A colleague will reply.")
                for t in TENANTS}
    ids = asyncio.run(escalate())
    store.close()
    return ids


@pytest.fixture
def stack(state_dir):
    ids = _seed(state_dir)
    port = free_port()
    kernel = start_kernel(state_dir, "--listen", f"127.0.0.1:{port}")
    admin = Client(state_dir / "vfmd.sock")
    tokens = {t: admin.token_create(t)[0] for t in TENANTS}
    clients = {t: Client(target=f"127.0.0.1:{port}", token=tokens[t]) for t in TENANTS}
    yield {"admin": admin, **clients, "ids": ids, "kernel": kernel, "port": port,
           "tokens": tokens}
    for client in (admin, *clients.values()):
        client.close()
    kernel.stop()


def test_each_tenant_lists_only_its_own_audit_records(stack):
    alice, bob, admin = stack["alice"], stack["bob"], stack["admin"]
    assert {r.tenant for r in alice.audit()} == {"alice"}
    assert {r.tenant for r in bob.audit()} == {"bob"}
    assert len(alice.audit()) == 3 and len(admin.audit()) == 6
    assert alice.audit(pid=11) == []  # bob's pid: nothing, not an error
    [refused] = alice.audit(verdict="refuse")
    assert (refused.seq, refused.reasons, refused.checks[0].check) == (3, ["a reason"],
                                                                       "moderation")
    assert [r.seq for r in admin.audit(since=1001.5)] == [5, 6]


def test_audit_listing_follows_pages(state_dir):
    _seed(state_dir, asks_per_tenant=60)
    kernel = start_kernel(state_dir)
    try:
        with Client(state_dir / "vfmd.sock") as admin:
            assert [r.seq for r in admin.audit()] == list(range(1, 121))  # 2 pages of 100
    finally:
        kernel.stop()


def test_bad_audit_filters_are_refused_by_name(stack):
    with pytest.raises(InvalidArgument, match="kind"):
        stack["alice"].audit(kind="chat")
    with grpc.insecure_channel(f"127.0.0.1:{stack['port']}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            kernel_pb2_grpc.KernelServiceStub(channel).ListAudit(
                pb.ListAuditRequest(page_token="bogus"), timeout=10,
                metadata=(("authorization", f"Bearer {stack['tokens']['alice']}"),))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in raised.value.details()


def test_verify_holds_and_a_tenant_learns_only_the_verdict(stack):
    full = stack["admin"].verify_audit()
    assert (full.ok, full.records, full.head_seq) == (True, 6, 6)
    mine = stack["alice"].verify_audit()
    assert (mine.ok, mine.first_bad_seq, mine.reason, mine.records) == (True, 0, "", 0)


def test_verify_names_a_record_changed_while_the_kernel_was_down(stack, state_dir):
    stack["kernel"].stop()
    env = lmdb.open(str(state_dir / "kernel.lmdb"), max_dbs=16, subdir=True)
    with env.begin(write=True) as txn:
        db = env.open_db(b"audit", txn=txn)
        record = unpack(txn.get(U64.pack(4), db=db))
        record["verdict"] = "allow"
        txn.put(U64.pack(4), canonical(record), db=db)
    env.close()
    kernel = start_kernel(state_dir, "--listen", f"127.0.0.1:{stack['port']}")
    try:
        with Client(state_dir / "vfmd.sock") as admin:
            full = admin.verify_audit()
        assert (full.ok, full.first_bad_seq) == (False, 4) and "modified" in full.reason
        mine = stack["bob"].verify_audit()
        assert (mine.ok, mine.first_bad_seq, mine.reason) == (False, 4, "")
    finally:
        kernel.stop()


def test_a_kernel_started_after_a_crash_catches_its_head_file_up_and_says_so(stack, state_dir):
    stack["kernel"].stop()
    env = lmdb.open(str(state_dir / "kernel.lmdb"), max_dbs=16, subdir=True)
    with env.begin() as txn:  # the file as a kill between a commit and its rename leaves it
        named = unpack(txn.get(U64.pack(5), db=env.open_db(b"audit", txn=txn)))
    env.close()
    (state_dir / HEAD_FILE).write_bytes(pack([5, named["hash"]]))
    kernel = start_kernel(state_dir, "--listen", f"127.0.0.1:{stack['port']}")
    try:
        with Client(state_dir / "vfmd.sock") as admin:
            assert admin.verify_audit().ok
            [record] = admin.audit(kind="audit")
        assert (record.tenant, record.verdict) == ("vfmd", "caught_up")
        assert record.attributes["file_seq"] == "5" and record.attributes["store_seq"] != "5"
        assert stack["alice"].audit(kind="audit") == []   # the trail's own, not a tenant's
    finally:
        kernel.stop()


def test_escalations_stay_within_their_tenant(stack):
    alice, bob, ids = stack["alice"], stack["bob"], stack["ids"]
    assert [e.id for e in alice.escalations()] == [ids["alice"]]
    assert [e.id for e in bob.escalations(state="open")] == [ids["bob"]]
    assert {e.id for e in stack["admin"].escalations()} == set(ids.values())
    found = alice.escalation(ids["alice"])
    assert (found.state, found.outcome, found.escalation_rule, found.reasons) == (
        "open", "escalate", "refund", ["refund above 500"])
    for call in (lambda: bob.escalation(ids["alice"]),
                 lambda: bob.resolve_escalation(ids["alice"], "approve"),
                 lambda: bob.wait_escalation(ids["alice"], 0.1)):
        with pytest.raises(NotFound, match=f"no escalation with id {ids['alice']}"):
            call()
    assert alice.escalation(ids["alice"]).state == "open"
    assert [r.kind for r in alice.audit()] == ["ask"] * 3


def test_a_resolution_reaches_the_waiting_client_and_is_audited(stack):
    alice, ids = stack["alice"], stack["ids"]
    waited = {}

    def wait():
        with Client(target=f"127.0.0.1:{stack['port']}", token=stack["tokens"]["alice"]) as waiter:
            waited["escalation"] = waiter.wait_escalation(ids["alice"], 60)
    thread = threading.Thread(target=wait)
    thread.start()
    wait_for(lambda: thread.is_alive(), what="the waiter to start")
    time.sleep(0.5)  # let its call reach the kernel (resolved first, it would return at once)
    done = alice.resolve_escalation(ids["alice"], "reply", "Refund of 900 EUR approved.")
    thread.join(30)
    got = waited["escalation"]
    assert (got.resolved, got.state, got.text, got.resolved_by) == (
        True, "replied", "Refund of 900 EUR approved.", "alice")
    [record] = alice.audit(kind="escalation")
    assert (record.seq, done.audit_seq) == (7, 7)
    assert (record.attributes["escalation_id"], record.attributes["decision"],
            record.verdict) == (ids["alice"], "reply", "replied")
    assert stack["bob"].audit(kind="escalation") == []
    with pytest.raises(FailedPrecondition, match="already replied"):
        stack["admin"].resolve_escalation(ids["alice"], "reject")
    assert stack["admin"].verify_audit().ok


def test_an_administrator_resolves_any_tenants_escalation(stack):
    done = stack["admin"].resolve_escalation(stack["ids"]["bob"], "approve")
    assert done.state == "approved" and done.resolved_by.endswith("(admin)")
    assert stack["bob"].escalation(stack["ids"]["bob"]).state == "approved"


def test_a_wait_ends_at_its_timeout_with_the_escalation_open(stack):
    got = stack["alice"].wait_escalation(stack["ids"]["alice"], 0.2)
    assert (got.resolved, got.state) == (False, "open")


@pytest.mark.parametrize("call, field", [
    (lambda c: c.escalation("not-an-id"), "id"),
    (lambda c: c.resolve_escalation("0" * 12, "reply", ""), "text"),
    (lambda c: c.resolve_escalation("0" * 12, "maybe"), "decision"),
    (lambda c: c.wait_escalation("0" * 12, 7200), "timeout"),
    (lambda c: c.escalations(state="pending"), "state"),
])
def test_bad_escalation_input_names_the_field(stack, call, field):
    client = stack["alice"]
    if field == "text":  # a real, open id: the text is what is wrong
        call = (lambda c: c.resolve_escalation(stack["ids"]["alice"], "reply", " "))
    with pytest.raises(InvalidArgument, match=field):
        call(client)


# --- policies: need vfm-trustd ----------------------------------------------------------

POLICY = "level: standard\n"
BAD_POLICY = "level: standard\nthresholds:\n  moderation: 1.4\n"


def test_policy_calls_without_vfm_trustd_name_it(stack):
    from libvfm.errors import Unavailable
    with pytest.raises(Unavailable, match="vfm-trustd"):
        stack["alice"].apply_policy(POLICY, filename="policy.yaml")
    with pytest.raises(Unavailable, match="vfm-trustd"):
        stack["alice"].get_policy()
    assert stack["alice"].audit(kind="policy") == []  # nothing was set, nothing audited


def test_policy_input_is_checked_before_it_is_forwarded(stack):
    with pytest.raises(InvalidArgument, match="document"):
        stack["alice"].apply_policy("  ", filename="policy.yaml")
    with pytest.raises(InvalidArgument, match="text"):
        stack["alice"].test_policy("", document=POLICY)
    with pytest.raises(NotFound):
        stack["alice"].apply_policy(POLICY, pid=999)


def _with_trustd(stack, state_dir: Path, *args: str):
    trustd = Daemon(["-m", "services.trust.main", "--state-dir", str(state_dir),
                     "--kernel-socket", str(state_dir / "vfmd.sock"), *args],
                    state_dir / "logs" / "vfm-trustd.log").start()
    wait_for(lambda: _answers(stack["admin"]), 180, "vfm-trustd to answer", log=trustd.log)
    return trustd


@pytest.fixture
def trust_stack(stack, state_dir):
    trustd = _with_trustd(stack, state_dir)
    yield stack
    trustd.stop()


@pytest.fixture
def policy_stack(stack, state_dir):
    """vfm-trustd with its tenant rules only (`--checks rules`, no models to load): enough
    for what stores, scopes, validates and audits policies, in a second instead of seven."""
    trustd = _with_trustd(stack, state_dir, "--checks", "rules")
    yield stack
    trustd.stop()


def test_a_policy_applies_to_its_tenant_only_and_is_audited(policy_stack):
    alice, bob = policy_stack["alice"], policy_stack["bob"]
    applied = alice.apply_policy(POLICY, filename="policy.yaml")
    assert applied.version == 1 and applied.audit_seq == 7
    assert alice.get_policy().origin == "tenant"
    assert bob.get_policy().origin == "default"
    [record] = alice.audit(kind="policy")
    assert (record.tenant, record.policy_version, record.attributes["author"],
            record.attributes["document_sha256"]) == ("alice", 1, "alice",
                                                      applied.document_sha256)
    assert bob.audit(kind="policy") == []
    assert policy_stack["admin"].verify_audit().ok


def test_a_process_policy_needs_the_callers_process(policy_stack):
    alice, bob = policy_stack["alice"], policy_stack["bob"]
    pid = alice.spawn("agent").pid
    assert alice.apply_policy(POLICY, pid=pid).version == 1
    assert alice.get_policy(pid).origin == "process"
    with pytest.raises(NotFound, match=f"no process with pid {pid}"):
        bob.apply_policy(POLICY, pid=pid)
    with pytest.raises(NotFound):
        bob.get_policy(pid)


def test_a_bad_policy_is_refused_with_its_line_and_nothing_is_audited(policy_stack):
    with pytest.raises(InvalidArgument, match=r"policy\.yaml:3: thresholds\.moderation"):
        policy_stack["alice"].apply_policy(BAD_POLICY, filename="policy.yaml")
    assert policy_stack["alice"].audit(kind="policy") == []


def test_test_policy_returns_every_score_and_the_verdict(trust_stack):
    result = trust_stack["alice"].test_policy("How do I reset my password?", document=POLICY,
                                              output_text="Click 'forgot password'.")
    assert result.input.outcome == "allow" and result.input.checks
    assert all(0.0 <= c.score <= 1.0 for c in result.input.checks)
    assert result.output is not None and result.output.outcome


def _answers(client: Client) -> bool:
    from libvfm.errors import Unavailable
    try:
        client.get_policy()
        return True
    except Unavailable:
        return False
