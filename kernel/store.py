"""LMDB storage of the kernel: processes, tokens and registered services, msgpack values."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from kernel.process import ProcRecord
from vfmos_runtime.storage import U64 as _PID
from vfmos_runtime.storage import open_env
from vfmos_runtime.storage import pack as _pack
from vfmos_runtime.storage import unpack as _unpack

_NEXT_PID = b"next_pid"


class KernelStore:
    """Every write commits with fsync before it returns, so an acknowledged syscall survives kill -9."""

    def __init__(self, path: Path, map_size: int = 1 << 30):
        self._env = open_env(path / "kernel.lmdb", map_size=map_size, max_dbs=8)
        self._meta = self._env.open_db(b"meta")
        self._procs = self._env.open_db(b"procs")
        self._tokens = self._env.open_db(b"tokens")
        self._services = self._env.open_db(b"services")
        self._pages = self._env.open_db(b"pages")

    def close(self) -> None:
        self._env.close()

    # processes
    def create_process(self, build: Callable[[int], ProcRecord]) -> ProcRecord:
        """Allocate the next pid and store the record `build(pid)` in one transaction."""
        with self._env.begin(write=True) as txn:
            raw = txn.get(_NEXT_PID, db=self._meta)
            pid = _unpack(raw) if raw else 1
            record = build(pid)
            txn.put(_PID.pack(pid), _pack(record.to_dict()), db=self._procs)
            txn.put(_NEXT_PID, _pack(pid + 1), db=self._meta)
        return record

    def put_process(self, record: ProcRecord) -> None:
        with self._env.begin(write=True) as txn:
            txn.put(_PID.pack(record.pid), _pack(record.to_dict()), db=self._procs)

    def put_processes(self, records: list[ProcRecord]) -> None:
        with self._env.begin(write=True) as txn:
            for record in records:
                txn.put(_PID.pack(record.pid), _pack(record.to_dict()), db=self._procs)

    def processes(self) -> Iterator[ProcRecord]:
        with self._env.begin() as txn:
            for _, raw in txn.cursor(db=self._procs):
                yield ProcRecord.from_dict(_unpack(raw))

    # small settings (tenant weights, ...)
    def put_meta(self, key: str, value) -> None:
        with self._env.begin(write=True) as txn:
            txn.put(key.encode(), _pack(value), db=self._meta)

    def get_meta(self, key: str):
        with self._env.begin() as txn:
            raw = txn.get(key.encode(), db=self._meta)
        return _unpack(raw) if raw else None

    # bearer tokens, keyed by the sha256 of the secret
    def put_token(self, digest: bytes, info: dict) -> None:
        with self._env.begin(write=True) as txn:
            txn.put(digest, _pack(info), db=self._tokens)

    def get_token(self, digest: bytes) -> dict | None:
        with self._env.begin() as txn:
            raw = txn.get(digest, db=self._tokens)
        return _unpack(raw) if raw else None

    def tokens(self) -> list[tuple[bytes, dict]]:
        with self._env.begin() as txn:
            return [(bytes(k), _unpack(v)) for k, v in txn.cursor(db=self._tokens)]

    def delete_token(self, digest: bytes) -> None:
        with self._env.begin(write=True) as txn:
            txn.delete(digest, db=self._tokens)

    # service registry
    def put_service(self, name: str, info: dict) -> None:
        with self._env.begin(write=True) as txn:
            txn.put(name.encode(), _pack(info), db=self._services)

    def services(self) -> dict[str, dict]:
        with self._env.begin() as txn:
            return {k.decode(): _unpack(v) for k, v in txn.cursor(db=self._services)}

    # page tables of the virtual context memory: one record per process
    def put_page_table(self, pid: int, table: dict) -> None:
        with self._env.begin(write=True) as txn:
            txn.put(_PID.pack(pid), _pack(table), db=self._pages)

    def get_page_table(self, pid: int) -> dict | None:
        with self._env.begin() as txn:
            raw = txn.get(_PID.pack(pid), db=self._pages)
        return _unpack(raw) if raw else None

    def delete_page_table(self, pid: int) -> None:
        with self._env.begin(write=True) as txn:
            txn.delete(_PID.pack(pid), db=self._pages)
