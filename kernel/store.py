"""LMDB storage of the kernel: processes, tokens and registered services, msgpack values."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Iterator

from kernel.process import ProcRecord
from kernel.writer import GroupCommitWriter
from vfmos_runtime.storage import U64 as _PID
from vfmos_runtime.storage import open_env
from vfmos_runtime.storage import pack as _pack
from vfmos_runtime.storage import unpack as _unpack

_NEXT_PID = b"next_pid"
_REAPED_TOTALS = b"reaped_totals"


class KernelStore:
    """Reads are LMDB read transactions, answered at once (readers never wait on the writer).
    Every write goes to the one group-commit writer and returns a Future that settles when
    it is durable (fsync): a syscall awaits it before its reply, bookkeeping lets it go.
    Values are encoded when the write is queued, so later changes in memory cannot leak in."""

    def __init__(self, path: Path, map_size: int = 1 << 30,
                 before_commit: Callable[[], None] | None = None):
        # Sub-databases: the five below, the outbox's, the audit trail's two and the
        # escalations' (kernel/outbox.py, audit.py, escalations.py), with room to spare.
        self._env = open_env(path / "kernel.lmdb", map_size=map_size, max_dbs=16)
        self._meta = self._env.open_db(b"meta")
        self._procs = self._env.open_db(b"procs")
        self._tokens = self._env.open_db(b"tokens")
        self._services = self._env.open_db(b"services")
        self._pages = self._env.open_db(b"pages")
        self._writer = GroupCommitWriter(self._env, before_commit)
        self._staged_pages: dict[int, bytes] = {}

    @property
    def transactions(self) -> int:
        """Write transactions committed so far (each one fsync)."""
        return self._writer.transactions

    def after_each_transaction(self, hook: Callable[[bool], None]) -> None:
        """`hook(committed)` on the writer thread after each transaction (see the writer)."""
        self._writer.after_each_transaction(hook)

    def close(self) -> None:
        """Write what is staged or queued, then close."""
        for pid, table in self._staged_pages.items():
            self._put(_PID.pack(pid), table, self._pages)
        self._staged_pages.clear()
        self._writer.close()
        self._env.close()

    # processes
    def create_process(self, build: Callable[[int], ProcRecord]) -> Future:
        """Allocate the next pid and store the record `build(pid)` in one transaction; the
        Future holds the record. `build` runs on the writer thread: keep it pure."""
        def write(txn) -> ProcRecord:
            raw = txn.get(_NEXT_PID, db=self._meta)
            pid = _unpack(raw) if raw else 1
            record = build(pid)
            txn.put(_PID.pack(pid), _pack(record.to_dict()), db=self._procs)
            txn.put(_NEXT_PID, _pack(pid + 1), db=self._meta)
            return record
        return self._writer.submit(write)

    def put_process(self, record: ProcRecord) -> Future:
        """The record, and the process's staged page table with it (one transaction)."""
        key, value = _PID.pack(record.pid), _pack(record.to_dict())
        table = self._staged_pages.pop(record.pid, None)

        def write(txn) -> None:
            txn.put(key, value, db=self._procs)
            if table is not None:
                txn.put(key, table, db=self._pages)
        return self._writer.submit(write)

    def put_processes(self, records: list[ProcRecord]) -> Future:
        rows = [(_PID.pack(r.pid), _pack(r.to_dict())) for r in records]

        def write(txn) -> None:
            for key, value in rows:
                txn.put(key, value, db=self._procs)
        return self._writer.submit(write)

    def reap_processes(self, pids: list[int], totals: dict) -> Future:
        """Remove ended processes (their records and page tables) and store `totals`, the
        per-tenant accounting that now holds their counters, in one transaction: a crash
        leaves them either still stored and uncounted, or gone and counted."""
        keys = [_PID.pack(pid) for pid in pids]
        for pid in pids:
            self._staged_pages.pop(pid, None)
        packed = _pack(totals)

        def write(txn) -> None:
            for key in keys:
                txn.delete(key, db=self._procs)
                txn.delete(key, db=self._pages)
            txn.put(_REAPED_TOTALS, packed, db=self._meta)
        return self._writer.submit(write)

    def reaped_totals(self) -> dict:
        """Per tenant, the summed counters of its processes reaped so far."""
        with self._env.begin() as txn:
            raw = txn.get(_REAPED_TOTALS, db=self._meta)
        return _unpack(raw) if raw else {}

    def processes(self) -> Iterator[ProcRecord]:
        with self._env.begin() as txn:
            for _, raw in txn.cursor(db=self._procs):
                yield ProcRecord.from_dict(_unpack(raw))

    # small settings (tenant weights, ...)
    def put_meta(self, key: str, value) -> Future:
        return self._put(key.encode(), _pack(value), self._meta)

    def get_meta(self, key: str):
        with self._env.begin() as txn:
            raw = txn.get(key.encode(), db=self._meta)
        return _unpack(raw) if raw else None

    # bearer tokens, keyed by the sha256 of the secret
    def put_token(self, digest: bytes, info: dict) -> Future:
        return self._put(digest, _pack(info), self._tokens)

    def put_token_usage(self, digest: bytes, usage: dict) -> Future:
        """Set the usage fields of a token's record, if it is still stored: a revoke queued
        before this write wins, and a revoked token is never written back."""
        fields = dict(usage)  # the values as they are now: later charges go in a later write

        def write(txn) -> None:
            raw = txn.get(digest, db=self._tokens)
            if raw is not None:
                txn.put(digest, _pack({**_unpack(raw), **fields}), db=self._tokens)
        return self._writer.submit(write)

    def get_token(self, digest: bytes) -> dict | None:
        with self._env.begin() as txn:
            raw = txn.get(digest, db=self._tokens)
        return _unpack(raw) if raw else None

    def tokens(self) -> list[tuple[bytes, dict]]:
        with self._env.begin() as txn:
            return [(bytes(k), _unpack(v)) for k, v in txn.cursor(db=self._tokens)]

    def delete_token(self, digest: bytes) -> Future:
        return self._writer.submit(lambda txn: txn.delete(digest, db=self._tokens))

    # service registry
    def put_service(self, name: str, info: dict) -> Future:
        return self._put(name.encode(), _pack(info), self._services)

    def services(self) -> dict[str, dict]:
        with self._env.begin() as txn:
            return {k.decode(): _unpack(v) for k, v in txn.cursor(db=self._services)}

    # page tables of the virtual context memory: one record per process
    def stage_page_table(self, pid: int, table: dict) -> None:
        """Keep `table` for the process's next record write (an Ask's end), so that an Ask's
        accounting is one transaction; close() writes whatever is still staged."""
        self._staged_pages[pid] = _pack(table)

    def get_page_table(self, pid: int) -> dict | None:
        """The committed table (the kernel's PageTable keeps the latest one in memory)."""
        with self._env.begin() as txn:
            raw = txn.get(_PID.pack(pid), db=self._pages)
        return _unpack(raw) if raw else None

    def delete_page_table(self, pid: int) -> Future:
        self._staged_pages.pop(pid, None)
        key = _PID.pack(pid)
        return self._writer.submit(lambda txn: txn.delete(key, db=self._pages))

    # sub-databases of other kernel modules (the exchange outbox): this env, this writer
    def open_table(self, name: bytes):
        """A sub-database for a module that keeps its own records (open it before writing)."""
        return self._env.open_db(name)

    def read(self):
        """A read transaction, as a context manager."""
        return self._env.begin()

    def submit(self, write: Callable) -> Future:
        """Queue `write(txn)` to the group-commit writer; the Future settles once durable."""
        return self._writer.submit(write)

    # helpers
    def _put(self, key: bytes, value: bytes, db) -> Future:
        def write(txn) -> None:
            txn.put(key, value, db=db)
        return self._writer.submit(write)
