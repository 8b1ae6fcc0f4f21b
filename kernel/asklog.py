"""Every Ask's id, kept with its tenant, process and model so that feedback can name an answer
(and be refused for another tenant's): one small record per Ask in the kernel's LMDB."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass

from kernel.store import KernelStore
from vfmos_runtime.storage import pack, unpack

log = logging.getLogger("vfmd.asks")
MAX_ASKS = 1_000_000  # records kept (oldest dropped first): ~100 bytes each


def new_ask_id() -> str:
    """24 hex digits: nanoseconds since the epoch, then 32 random bits (sorts by time)."""
    return f"{time.time_ns():016x}{os.urandom(4).hex()}"


@dataclass(frozen=True)
class AskEntry:
    ask_id: str
    tenant: str
    pid: int
    model: str
    routed: bool
    time: float
    judged_by: tuple[str, ...] = ()


class AskLog:
    def __init__(self, store: KernelStore):
        self._store = store
        self._db = store.open_table(b"asks")

    def record(self, entry: AskEntry) -> Future:
        """Queued with the group-commit writer: durable with the next commit (a failed write is
        logged: that Ask then takes no feedback)."""
        key, value = entry.ask_id.encode(), pack(self._to_dict(entry))

        def write(txn) -> None:
            txn.put(key, value, db=self._db)
            if txn.stat(self._db)["entries"] > MAX_ASKS:
                cursor = txn.cursor(db=self._db)
                if cursor.first():
                    cursor.delete()
        future = self._store.submit(write)
        future.add_done_callback(_log_failure)
        return future

    def get(self, ask_id: str) -> AskEntry | None:
        if not ask_id or len(ask_id) > 64:
            return None
        with self._store.read() as txn:
            raw = txn.get(ask_id.encode(), db=self._db)
        if raw is None:
            return None
        d = unpack(raw)
        return AskEntry(ask_id, d["tenant"], d["pid"], d["model"], d["routed"], d["time"],
                        tuple(d.get("judged_by") or ()))

    @staticmethod
    def _to_dict(e: AskEntry) -> dict:
        return {"tenant": e.tenant, "pid": e.pid, "model": e.model, "routed": e.routed,
                "time": e.time, "judged_by": list(e.judged_by)}


def _log_failure(future: Future) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("an Ask's id was not stored (feedback on it will read as unknown): %s", exc)
