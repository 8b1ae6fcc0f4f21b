"""The audit chain in a real kernel store: appends verify, and each kind of tampering is named."""

from __future__ import annotations

import asyncio

import lmdb
import pytest

from kernel.audit import HEAD_FILE, AuditLog, AuditStore, canonical, record_hash
from kernel.store import KernelStore
from vfmos_runtime.errors import InvalidArgument
from vfmos_runtime.storage import U64, pack, unpack


def _open(path):
    store = KernelStore(path)
    return store, AuditLog(AuditStore(store, path / HEAD_FILE))


def _ask(tenant="alice", pid=1, verdict="allow", i=0):
    return {"kind": "ask", "tenant": tenant, "pid": pid, "time": 1000.0 + i, "model": "tiny",
            "policy_version": 1, "verdict": verdict, "reasons": [], "tokens_in": 3,
            "tokens_out": 4, "cost": 0.0, "prompt_sha256": "a" * 64, "answer_sha256": "b" * 64,
            "checks": [{"check": "pii", "score": 0.1, "threshold": 0.5}]}


@pytest.fixture
def chain(tmp_path):
    """A store with ten records, closed so that a test can open the LMDB itself."""
    store, audit = _open(tmp_path)
    for i in range(10):
        audit.append(_ask(tenant="alice" if i % 2 else "bob", pid=i % 3 + 1, i=i))
    store.close()
    return tmp_path


def _verify(path):
    store, audit = _open(path)
    try:
        return audit.verify()
    finally:
        store.close()


def _tamper(path, change):
    env = lmdb.open(str(path / "kernel.lmdb"), max_dbs=16, subdir=True)
    with env.begin(write=True) as txn:
        change(txn, env.open_db(b"audit", txn=txn), env.open_db(b"audit_head", txn=txn))
    env.close()


def _key(seq):
    return U64.pack(seq)


def test_appends_verify_and_survive_a_restart(chain):
    result = _verify(chain)
    assert (result.ok, result.records, result.head_seq) == (True, 10, 10)
    store, audit = _open(chain)
    assert audit.append(_ask()) == 11  # the chain goes on where it was
    store.close()
    assert _verify(chain).ok


def test_records_are_linked_by_their_hashes(chain):
    store, audit = _open(chain)
    records, _ = audit.list(None, limit=100)
    store.close()
    assert [r["seq"] for r in records] == list(range(1, 11))
    for before, after in zip(records, records[1:]):
        assert after["prev_hash"] == before["hash"] == record_hash(before)


def test_a_modified_field_is_named(chain):
    def change(txn, db, _):
        record = unpack(txn.get(_key(4), db=db))
        record["verdict"] = "refuse"
        txn.put(_key(4), canonical(record), db=db)
    _tamper(chain, change)
    result = _verify(chain)
    assert (result.ok, result.first_bad_seq) == (False, 4)
    assert "modified" in result.reason


def test_a_flipped_byte_is_named(chain):
    def change(txn, db, _):
        raw = bytearray(txn.get(_key(7), db=db))
        raw[len(raw) // 2] ^= 0x01
        txn.put(_key(7), bytes(raw), db=db)
    _tamper(chain, change)
    result = _verify(chain)
    assert (result.ok, result.first_bad_seq) == (False, 7)


def test_a_modified_record_with_a_recomputed_hash_breaks_the_next_link(chain):
    def change(txn, db, _):
        record = unpack(txn.get(_key(4), db=db))
        record["tokens_out"] = 1
        record["hash"] = record_hash(record)
        txn.put(_key(4), canonical(record), db=db)
    _tamper(chain, change)
    result = _verify(chain)
    assert (result.ok, result.first_bad_seq) == (False, 5)
    assert "does not follow seq 4" in result.reason


def test_a_deleted_record_is_named(chain):
    _tamper(chain, lambda txn, db, _: txn.delete(_key(6), db=db))
    result = _verify(chain)
    assert (result.ok, result.first_bad_seq) == (False, 6)
    assert "deleted" in result.reason


def test_an_inserted_record_is_named(chain):
    def change(txn, db, _):
        # a forged record between 3 and 4, well formed and linked to 3
        prev = unpack(txn.get(_key(3), db=db))
        forged = {**_ask(tenant="mallory"), "seq": 4, "prev_hash": prev["hash"]}
        forged["hash"] = record_hash(forged)
        rows = [(k, bytes(v)) for k, v in txn.cursor(db=db) if U64.unpack(k)[0] >= 4]
        for key, value in reversed(rows):  # shift 4.. up by one
            txn.put(U64.pack(U64.unpack(key)[0] + 1), value, db=db)
        txn.put(_key(4), canonical(forged), db=db)
    _tamper(chain, change)
    result = _verify(chain)
    # The forged record itself links up; the one it pushed away no longer does.
    assert (result.ok, result.first_bad_seq) == (False, 5)


def test_a_record_slipped_in_under_a_foreign_key_is_named(chain):
    _tamper(chain, lambda txn, db, _: txn.put(_key(3) + b"\x00", pack({"x": 1}), db=db))
    result = _verify(chain)
    assert (result.ok, result.first_bad_seq) == (False, 4)
    assert "inserted" in result.reason


def test_reordered_records_are_named(chain):
    def change(txn, db, _):
        a, b = bytes(txn.get(_key(5), db=db)), bytes(txn.get(_key(6), db=db))
        txn.put(_key(5), b, db=db)
        txn.put(_key(6), a, db=db)
    _tamper(chain, change)
    result = _verify(chain)
    assert (result.ok, result.first_bad_seq) == (False, 5)
    assert "moved" in result.reason


def test_a_truncated_tail_is_named_by_the_store_head(chain):
    def change(txn, db, _):
        for seq in (9, 10):
            txn.delete(_key(seq), db=db)
    _tamper(chain, change)
    result = _verify(chain)
    assert (result.ok, result.first_bad_seq) == (False, 9)
    assert "truncated" in result.reason


def test_a_deleted_tail_with_a_rewritten_store_head_is_caught_by_the_head_file(chain):
    def change(txn, db, head_db):
        last = unpack(txn.get(_key(8), db=db))
        for seq in (9, 10):
            txn.delete(_key(seq), db=db)
        txn.put(b"head", pack([8, last["hash"]]), db=head_db)
    _tamper(chain, change)
    result = _verify(chain)
    assert (result.ok, result.first_bad_seq) == (False, 9)
    assert HEAD_FILE in result.reason and "truncated" in result.reason


def test_a_missing_head_file_is_reported(chain):
    (chain / HEAD_FILE).unlink()
    result = _verify(chain)
    assert (result.ok, result.first_bad_seq) == (False, 10)
    assert HEAD_FILE in result.reason


def test_an_empty_chain_verifies(tmp_path):
    assert _verify(tmp_path).ok


def test_list_filters_by_tenant_pid_time_and_verdict(tmp_path):
    store, audit = _open(tmp_path)
    for i in range(6):
        audit.append(_ask(tenant="alice" if i < 4 else "bob", pid=1 + i % 2,
                          verdict="refuse" if i == 3 else "allow", i=i))
    store.submit(lambda txn: None).result(10)  # appends are durable in order: wait for them
    try:
        assert [r["seq"] for r in audit.list("alice")[0]] == [1, 2, 3, 4]
        assert [r["seq"] for r in audit.list("bob")[0]] == [5, 6]
        assert [r["seq"] for r in audit.list("alice", pid=2)[0]] == [2, 4]
        assert [r["seq"] for r in audit.list(None, since=1003.0)[0]] == [4, 5, 6]
        assert [r["seq"] for r in audit.list("alice", verdict="REFUSE")[0]] == [4]
        page, after = audit.list(None, limit=4)
        assert ([r["seq"] for r in page], after) == ([1, 2, 3, 4], 4)
        assert [r["seq"] for r in audit.list(None, after=after)[0]] == [5, 6]
    finally:
        store.close()


def test_record_waits_until_durable_and_verify_async_sees_it(tmp_path):
    store, audit = _open(tmp_path)

    async def run():
        seq = await audit.record({"kind": "policy", "tenant": "alice", "pid": 0, "version": 1,
                                  "author": "alice", "document_sha256": "c" * 64})
        return seq, await audit.verify_async()
    try:
        seq, result = asyncio.run(run())
        assert seq == 1 and result.ok and result.records == 1
    finally:
        store.close()


def test_verify_async_right_after_appends_sees_them_all(tmp_path):
    store, audit = _open(tmp_path)

    async def run():
        for i in range(50):
            audit.append(_ask(i=i))
        first = await audit.verify_async()
        for i in range(50):
            audit.append(_ask(i=i))
        return first, await audit.verify_async()
    try:
        first, second = asyncio.run(run())
        assert (first.ok, first.records, second.ok, second.records) == (True, 50, True, 100)
    finally:
        store.close()


@pytest.mark.parametrize("record, field", [
    ({"kind": "chat", "tenant": "a", "pid": 1}, "kind"),
    ({"kind": "ask", "tenant": "", "pid": 1}, "tenant"),
    ({"kind": "ask", "tenant": "a", "pid": -1}, "pid"),
])
def test_a_malformed_record_is_refused_and_leaves_the_chain_alone(tmp_path, record, field):
    store, audit = _open(tmp_path)
    try:
        with pytest.raises(InvalidArgument, match=field):
            audit.append(record)
        assert audit.head.seq == 0
    finally:
        store.close()


def test_a_record_with_missing_or_null_fields_still_reads_on_the_wire():
    from kernel.trust_syscalls import record_to_pb
    msg = record_to_pb({"seq": 3, "kind": "ask", "tenant": "a", "pid": 1, "time": 5.0,
                        "tokens_in": None, "cost": None, "checks": [{"score": None}, "junk"],
                        "reasons": None, "exchange": "x1"})
    assert (msg.seq, msg.tokens_in, msg.cost, len(msg.checks), msg.attributes["exchange"]) == (
        3, 0, 0.0, 1, "x1")


def _behind(path, seq):
    """The head file as a crash between a commit and the file's rename leaves it."""
    store = KernelStore(path)
    named = next(iter(AuditStore(store, path / HEAD_FILE).rows(seq - 1)))
    store.close()
    (path / HEAD_FILE).write_bytes(pack([seq, unpack(named[1])["hash"]]))


def test_a_head_file_left_behind_by_a_crash_is_caught_up_and_the_trail_says_so(chain):
    _behind(chain, 8)
    result = _verify(chain)
    assert not result.ok and HEAD_FILE in result.reason   # what verify said after a crash
    store, audit = _open(chain)                              # the next start of vfmd
    seq = audit.catch_up_head_file()
    store.close()
    assert seq == 11
    result = _verify(chain)
    assert (result.ok, result.records) == (True, 11)
    store, audit = _open(chain)
    [record] = audit.list(None, kind="audit")[0]
    store.close()
    assert (record["tenant"], record["file_seq"], record["store_seq"]) == ("vfmd", 8, 10)
    assert "records 9..10 were not covered" in record["reasons"][0]


@pytest.mark.parametrize("damage", ["wrong hash", "modified record", "file ahead"])
def test_a_head_file_that_is_not_just_behind_stays_an_alarm(chain, damage):
    if damage == "wrong hash":
        (chain / HEAD_FILE).write_bytes(pack([8, "f" * 64]))
    elif damage == "modified record":
        _behind(chain, 8)

        def change(txn, db, _):
            record = unpack(txn.get(_key(9), db=db))
            record["tokens_out"] = 999
            txn.put(_key(9), canonical(record), db=db)
        _tamper(chain, change)
    else:
        (chain / HEAD_FILE).write_bytes(pack([12, "f" * 64]))
    store, audit = _open(chain)
    assert audit.catch_up_head_file() == 0
    store.close()
    assert not _verify(chain).ok
