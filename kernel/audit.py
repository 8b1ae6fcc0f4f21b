"""The kernel's audit trail: append-only records in LMDB, hash-chained, with the head kept twice.

Each record is the canonical msgpack of a dict {seq, time, kind, tenant, pid, ...fields,
prev_hash, hash}: `hash` is the SHA-256 of the record's canonical bytes without `hash`, and
`prev_hash` is the hash of the record before it (64 zeros for the first). The chain's head
(seq, hash) is written twice outside the chain: under a key of its own sub-database, in the
same transaction as the record, and to the file `audit.head` beside the kernel store once
that transaction is durable. So a record changed, deleted, inserted or moved breaks the
chain where it happened, and a deleted tail leaves a head that names a record not there.

What this does not do: someone who may write the store and the head file can rewrite the
whole chain from a changed record on, hashes and heads included. Against that the head would
have to leave the host, or be signed with a key the kernel alone holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import msgpack

from kernel.store import KernelStore
from vfmos_runtime.errors import InvalidArgument
from vfmos_runtime.storage import U64, pack, unpack

log = logging.getLogger("vfmd.audit")

KINDS = ("ask", "policy", "escalation", "feedback", "audit")
# The tenant of the trail's records about itself (kind "audit"): administrators see them.
TRAIL_TENANT = "vfmd"
GENESIS = "0" * 64              # the prev_hash of the first record
HEAD_FILE = "audit.head"
_HEAD_KEY = b"head"
MAX_LIST = 1000                 # records one list call returns at most


def canonical(record: dict) -> bytes:
    """The bytes a record is hashed and stored as: msgpack with every map's keys sorted, so
    equal records encode equally whatever order their dicts were built in."""
    def norm(value):
        if isinstance(value, dict):
            return {k: norm(value[k]) for k in sorted(value)}
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        return value
    return pack(norm(record))


def record_hash(record: dict) -> str:
    """SHA-256 (hex) of the record without its own `hash` field."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


@dataclass(frozen=True)
class Head:
    """The last record of the chain: its seq (0 = empty chain) and hash."""

    seq: int
    hash: str

    def to_bytes(self) -> bytes:
        return pack([self.seq, self.hash])

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Head":
        seq, digest = unpack(raw)
        return cls(int(seq), str(digest))


EMPTY = Head(0, GENESIS)


@dataclass(frozen=True)
class Verification:
    """`ok`, else the first record found bad (seq) and why, in words."""

    ok: bool
    first_bad_seq: int = 0
    reason: str = ""
    records: int = 0           # records checked
    head_seq: int = 0          # the head the store names


def verify_chain(rows: Iterable[tuple[bytes, bytes]], store_head: Head | None,
                 file_head: Head | None) -> Verification:
    """Check a chain given as (key, value) rows in key order and the two heads kept outside
    it (None: missing). Pure: the tests feed it tampered rows as well as the store does."""
    prev, expected, count = EMPTY, 1, 0

    def bad(seq: int, reason: str) -> Verification:
        return Verification(False, seq, reason, count, store_head.seq if store_head else 0)

    for key, raw in rows:
        if len(key) != U64.size:
            return bad(expected, f"a record under a key that is no seq ({bytes(key).hex()}) "
                                 f"lies after seq {expected - 1}: inserted")
        seq = U64.unpack(bytes(key))[0]
        if seq != expected:
            if seq > expected:
                return bad(expected, f"seq {expected} is missing (the next record is seq "
                                     f"{seq}): deleted")
            return bad(seq, f"seq {seq} appears twice: inserted")
        try:
            record = unpack(raw)
            stored_hash, stated_seq = record["hash"], record["seq"]
        except (ValueError, TypeError, KeyError, msgpack.UnpackException):
            return bad(seq, f"seq {seq} cannot be read as an audit record: modified")
        if record_hash(record) != stored_hash:
            return bad(seq, f"seq {seq} does not match its hash: modified")
        if stated_seq != seq:
            return bad(seq, f"the record stored as seq {seq} is seq {stated_seq}: "
                            "moved (reordered or inserted)")
        if record.get("prev_hash") != prev.hash:
            return bad(seq, f"seq {seq} does not follow seq {seq - 1} (its prev_hash is not "
                            f"that record's hash): inserted, reordered or replaced")
        prev, expected, count = Head(seq, stored_hash), expected + 1, count + 1
    for name, head in (("the store's head", store_head), (f"the {HEAD_FILE} file", file_head)):
        if head is None:
            if prev.seq:
                return bad(prev.seq, f"{name} is missing (the chain ends at seq {prev.seq})")
            continue
        if head.seq > prev.seq:
            return bad(prev.seq + 1, f"{name} names seq {head.seq} but the chain ends at seq "
                                     f"{prev.seq}: records {prev.seq + 1}..{head.seq} were "
                                     "deleted (truncated)")
        if head.seq < prev.seq:
            return bad(head.seq + 1, f"{name} names seq {head.seq} but the chain goes on to "
                                     f"seq {prev.seq}: records after it were added outside "
                                     "the kernel")
        if head.hash != prev.hash:
            return bad(head.seq, f"{name} names another record as seq {head.seq}: replaced")
    return Verification(True, 0, "", count, store_head.seq if store_head else 0)


class AuditStore:
    """The records (sub-database `audit`, keyed by seq), the head (sub-database
    `audit_head`) and the head file, in the kernel store and beside it."""

    def __init__(self, store: KernelStore, head_path: Path):
        self._store = store
        self._db = store.open_table(b"audit")
        self._head_db = store.open_table(b"audit_head")
        self.head_path = head_path
        self._file_lock = threading.Lock()
        self._file_seq = 0  # the seq the head file was last written with
        # The newest head written by the transaction in progress (writer thread only).
        self._staged: tuple[int, bytes] | None = None
        store.after_each_transaction(self._file_staged_head)

    def head(self) -> Head | None:
        with self._store.read() as txn:
            raw = txn.get(_HEAD_KEY, db=self._head_db)
        return Head.from_bytes(raw) if raw else None

    def file_head(self) -> Head | None:
        try:
            return Head.from_bytes(self.head_path.read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, msgpack.UnpackException):
            return Head(-1, "")  # unreadable: names no record of the chain

    def append(self, seq: int, value: bytes, head: Head,
               also: Callable | None = None) -> Future:
        """Queue the record and the new head (and `also(txn)`, in the same transaction);
        once durable, the head file is replaced by the new head."""
        key, packed = U64.pack(seq), head.to_bytes()

        def write(txn):
            txn.put(key, value, db=self._db)
            txn.put(_HEAD_KEY, packed, db=self._head_db)
            if self._staged is None or head.seq > self._staged[0]:
                self._staged = (head.seq, packed)
            return also(txn) if also is not None else None
        # Once the transaction is durable, and before anyone awaiting it goes on, the head
        # file is replaced with the newest head it wrote: one fsync for all of a group's
        # records, not one each. The file never names a record that is not durable, and
        # never goes back.
        return self._store.submit(write)

    def _file_staged_head(self, committed: bool) -> None:
        staged, self._staged = self._staged, None
        if committed and staged is not None:
            self._write_head_file(*staged)

    def rows(self, after: int = 0) -> Iterable[tuple[bytes, bytes]]:
        """(key, value) pairs from seq `after + 1` on, in key order; a read transaction each."""
        with self._store.read() as txn:
            cursor = txn.cursor(db=self._db)
            if not cursor.set_range(U64.pack(after + 1)):
                return
            for key, raw in cursor:
                yield bytes(key), bytes(raw)

    def view(self):
        """A read transaction and the head file, taken together: (txn, file head). The
        caller aborts the transaction when done."""
        return self._store.read(), self.file_head()

    def rows_in(self, txn) -> Iterable[tuple[bytes, bytes]]:
        for key, raw in txn.cursor(db=self._db):
            yield bytes(key), bytes(raw)

    def head_in(self, txn) -> Head | None:
        raw = txn.get(_HEAD_KEY, db=self._head_db)
        return Head.from_bytes(raw) if raw else None

    def after_writes(self, fn: Callable[[], object]) -> Future:
        """`fn()` on the writer thread once every write queued before it is committed and
        named by the head file (done callbacks run before the writer takes its next group,
        and appends come from one thread, the event loop, which registers them at once)."""
        return self._store.submit(lambda txn: fn())

    def _write_head_file(self, seq: int, packed: bytes) -> None:
        """Replace the file atomically (write, fsync, rename), never with an older head."""
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        with self._file_lock:
            if seq <= self._file_seq:
                return
            try:
                with open(tmp, "wb") as f:
                    f.write(packed)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.head_path)
                self._file_seq = seq
            except OSError as exc:
                log.error("cannot write %s: %s (audit verify will report it)",
                          self.head_path, exc)


class AuditLog:
    """Appends records to the chain and reads and verifies it.

    A record's seq and prev_hash are taken when it is appended, on the caller's thread,
    and the write is queued to the kernel store's one writer, which applies writes in the
    order they came: the event loop never waits on the disk, and the chain on disk is in
    the order of the appends. `append` returns at once (bookkeeping of the Ask path);
    `record` waits until the record is durable (a syscall that reports its audit seq).
    """

    def __init__(self, store: AuditStore, clock: Callable[[], float] = time.time):
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._head = store.head() or EMPTY

    @property
    def head(self) -> Head:
        return self._head

    def append(self, record: dict) -> int:
        """Queue `record` (kind, tenant, pid and the kind's fields; time defaults to now);
        returns its seq. Errors: InvalidArgument for a record without kind, tenant or pid."""
        seq, future = self.submit(record)
        future.add_done_callback(_log_failure)
        return seq

    async def record(self, record: dict, also: Callable | None = None) -> int:
        """Append and wait until durable; `also(txn, seq)` writes in the same transaction."""
        seq, future = self.submit(record, also)
        await asyncio.wrap_future(future)
        return seq

    def submit(self, record: dict, also: Callable | None = None) -> tuple[int, Future]:
        body = _checked(record, self._clock)
        with self._lock:
            seq = self._head.seq + 1
            body.update(seq=seq, prev_hash=self._head.hash)
            body["hash"] = record_hash(body)
            value = canonical(body)
            self._head = Head(seq, body["hash"])
            with_seq = (lambda txn: also(txn, seq)) if also is not None else None
            return seq, self._store.append(seq, value, self._head, with_seq)

    def list(self, tenant: str | None, pid: int = 0, since: float = 0.0, verdict: str = "",
             limit: int = 100, after: int = 0, kind: str = "") -> tuple[list[dict], int]:
        """Records of `tenant` (None: every tenant's, for an administrator) after seq
        `after`, oldest first, filtered; and the seq to continue after (0: no more)."""
        found: list[dict] = []
        verdict = verdict.lower()
        for _, raw in self._store.rows(after):
            record = unpack(raw)
            if tenant is not None and record.get("tenant") != tenant:
                continue
            if (pid and record.get("pid") != pid) or record.get("time", 0) < since:
                continue
            if verdict and str(record.get("verdict", "")).lower() != verdict:
                continue
            if kind and record.get("kind") != kind:
                continue
            if len(found) == limit:
                return found, found[-1]["seq"]
            found.append(record)
        return found, 0

    def catch_up_head_file(self) -> int:
        """At start. After an unclean stop the head file may name an earlier record than the
        store does: vfmd stopped between a commit and the file's rename, and `verify` would
        report records the file does not cover, after every crash. When the file names a
        record of the chain (its seq and hash) and the chain verifies up to the store's
        head, the trail says so in a record of its own (kind "audit", tenant "vfmd", the
        seqs the file and the store named), whose append brings the file up to date: the
        alarm ends, the event stays in the chain for an auditor to see. Returns that
        record's seq; 0 when there was nothing to do or the file or chain is wrong (missing,
        unreadable, ahead, naming another record: `verify` goes on reporting it)."""
        store_head, file_head = self._store.head(), self._store.file_head()
        if store_head is None or file_head is None or not 0 < file_head.seq < store_head.seq:
            return 0
        named = next(iter(self._store.rows(file_head.seq - 1)), None)
        if named is None or unpack(named[1]).get("hash") != file_head.hash:
            return 0
        if not verify_chain(self._store.rows(), store_head, store_head).ok:
            return 0
        seq = self.append({
            "kind": "audit", "tenant": TRAIL_TENANT, "pid": 0, "verdict": "caught_up",
            "reasons": [f"the {HEAD_FILE} file named seq {file_head.seq} but the chain went on "
                        f"to seq {store_head.seq}: vfmd had stopped before writing the file; "
                        f"records {file_head.seq + 1}..{store_head.seq} were not covered by it"],
            "file_seq": file_head.seq, "store_seq": store_head.seq})
        log.warning("the audit head file was behind the chain (seq %d < %d), as after an "
                    "unclean stop: brought up to date, and recorded as seq %d",
                    file_head.seq, store_head.seq, seq)
        return seq

    def verify(self) -> Verification:
        """Check the whole chain against both heads (blocking: a read of every record)."""
        txn, file_head = self._store.view()
        try:
            return verify_chain(self._store.rows_in(txn), self._store.head_in(txn), file_head)
        finally:
            txn.abort()

    async def verify_async(self) -> Verification:
        """`verify` of the chain as it is once every append queued so far is durable and
        named by the head file (so never a false alarm from a write in flight). Only the
        snapshot is taken on the store's writer thread; the hashing runs on a worker thread,
        so neither the event loop nor the writes behind it wait for a long chain."""
        # The first round commits every append queued before this call; the second takes
        # the view before anything queued meanwhile is committed.
        await asyncio.wrap_future(self._store.after_writes(lambda: None))
        txn, file_head = await asyncio.wrap_future(self._store.after_writes(self._store.view))
        try:
            return await asyncio.to_thread(lambda: verify_chain(
                self._store.rows_in(txn), self._store.head_in(txn), file_head))
        finally:
            txn.abort()


def _checked(record: dict, clock: Callable[[], float]) -> dict:
    kind, tenant, pid = record.get("kind"), record.get("tenant"), record.get("pid")
    if kind not in KINDS:
        raise InvalidArgument(f"kind: an audit record is one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(tenant, str) or not tenant:
        raise InvalidArgument("tenant: an audit record names its tenant")
    if not isinstance(pid, int) or pid < 0:
        raise InvalidArgument(f"pid: an audit record's pid is 0 or more, got {pid!r}")
    body = {k: v for k, v in record.items() if k not in ("seq", "prev_hash", "hash")}
    body["time"] = float(record.get("time") or clock())
    return body


def _log_failure(future: Future) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("an audit record was not written: %s (audit verify will report the gap)", exc)
