"""The exchange outbox: Ask exchanges kept in the kernel store until vfm-datad has them."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass

import lmdb

from kernel.ports import DataClient, MemoryEntry
from kernel.store import KernelStore
from kernel.writer import WriterClosed
from vfmos_runtime.errors import (AlreadyExists, DeadlineExceeded, FailedPrecondition,
                                  InvalidArgument, NotFound, PermissionDenied, QuotaExceeded,
                                  Unauthenticated, Unavailable, VfmError)
from vfmos_runtime.protocol import DATA_SERVICE
from vfmos_runtime.storage import U64, pack, unpack

log = logging.getLogger("vfmd.outbox")

RETRY_MIN_S = 0.2
RETRY_MAX_S = 2.0
LANES = 16                  # processes whose next exchange is delivered at the same time
MAX_ATTEMPTS = 5            # for failures that are neither "not there now" nor "bad request"
MAX_BYTES = 256 << 20       # of the kernel store's 1 GiB map, at most this much waits here
# vfm-datad is not there now (down, restarting, not yet re-registered with a new secret):
# the exchange waits however long that takes.
_NOT_NOW = (Unavailable, DeadlineExceeded, Unauthenticated)
# vfm-datad will never take it: trying again cannot help.
_NEVER = (InvalidArgument, NotFound, PermissionDenied, FailedPrecondition, AlreadyExists,
          QuotaExceeded)


@dataclass(frozen=True)
class Exchange:
    """One Ask's question and answer for one process's memory. `id` travels with every
    delivery, and vfm-datad keeps it with what it appended, so a second delivery (the reply
    to the first was lost, or the kernel restarted before it heard it) appends nothing."""

    id: str
    tenant: str
    pid: int
    entries: tuple[MemoryEntry, ...]

    def to_dict(self) -> dict:
        return {"id": self.id, "tenant": self.tenant, "pid": self.pid,
                "entries": [[e.speaker, e.text, e.time] for e in self.entries]}

    @classmethod
    def from_dict(cls, d: dict) -> "Exchange":
        return cls(d["id"], d["tenant"], d["pid"],
                   tuple(MemoryEntry(speaker, text, when) for speaker, text, when in d["entries"]))


class OutboxStore:
    """The outbox's records in the kernel store (sub-database `outbox`), keyed by arrival."""

    def __init__(self, store: KernelStore):
        self._store = store
        self._db = store.open_table(b"outbox")

    def load(self) -> list[tuple[int, Exchange, int]]:
        """Every waiting exchange, oldest first, with the size of its record."""
        with self._store.read() as txn:
            return [(U64.unpack(bytes(key))[0], Exchange.from_dict(unpack(raw)), len(raw))
                    for key, raw in txn.cursor(db=self._db)]

    def put(self, key: int, value: bytes) -> Future:
        raw_key, db = U64.pack(key), self._db
        return self._store.submit(lambda txn: txn.put(raw_key, value, db=db))

    def delete(self, key: int) -> Future:
        raw_key, db = U64.pack(key), self._db
        return self._store.submit(lambda txn: txn.delete(raw_key, db=db))


class ExchangeOutbox:
    """Every exchange goes into the store first and is delivered to vfm-datad from there: at
    once when it answers, else again every few seconds until it is back (after its restart,
    or after the kernel's own: whatever was waiting is delivered on start). An exchange
    leaves the outbox when vfm-datad has it, or when vfm-datad refuses it for good (bad
    input), which is logged. One process's exchanges go in order, one at a time, so its
    memory keeps the order of its asks; different processes' go at the same time."""

    def __init__(self, store: OutboxStore, data: DataClient, max_bytes: int = MAX_BYTES):
        self._store = store
        self._data = data
        self._max_bytes = max_bytes
        self._pending: dict[int, tuple[Exchange, int]] = {}  # key -> (exchange, record size)
        self._lanes: OrderedDict[tuple[str, int], deque[int]] = OrderedDict()
        self._attempts: dict[int, int] = {}
        self._writing: dict[int, Future] = {}  # key -> its record's write, until durable
        self._bytes = 0
        self._next = 1
        self._drain: asyncio.Task | None = None
        self._away = False    # vfm-datad did not answer the last attempt (logged once)
        self._behind = False  # exchanges waited (a replay on start, an outage): log the end
        for key, exchange, size in store.load():
            self._queue(key, exchange, size)
        if self._pending:
            self._next = max(self._pending) + 1
            self._behind = True
            log.info("%d exchanges wait to be remembered", len(self._pending))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, tenant: str, pid: int, entries: list[MemoryEntry]) -> Future:
        """Store an exchange and start delivering it. The Future settles once it is durable
        (or with why it could not be stored: the outbox is full, the store refused it)."""
        exchange = Exchange(uuid.uuid4().hex, tenant, pid, tuple(entries))
        value = pack(exchange.to_dict())
        if self._bytes + len(value) > self._max_bytes:
            refused: Future = Future()
            refused.set_exception(Unavailable(
                f"the kernel's outbox already holds {len(self._pending)} exchanges "
                f"({self._bytes / (1 << 20):.1f} MiB) waiting for {DATA_SERVICE}"))
            return refused
        key, self._next = self._next, self._next + 1
        written = self._store.put(key, value)  # WriterClosed when the kernel is stopping
        self._writing[key] = written
        self._queue(key, exchange, len(value))
        self.kick()
        return written

    def kick(self) -> None:
        """Deliver whatever waits (call on start; `add` calls it). A delivery under way
        takes new exchanges into its next round."""
        if self._pending and (self._drain is None or self._drain.done()):
            self._drain = asyncio.get_running_loop().create_task(self._deliver_all())

    def _queue(self, key: int, exchange: Exchange, size: int) -> None:
        self._pending[key] = (exchange, size)
        self._bytes += size
        self._lanes.setdefault((exchange.tenant, exchange.pid), deque()).append(key)

    async def _deliver_all(self) -> None:
        delay = RETRY_MIN_S
        while self._lanes:
            heads = [lane[0] for lane in list(self._lanes.values())[:LANES]]
            outcomes = await asyncio.gather(*(self._deliver(key) for key in heads))
            if all(outcomes):
                delay = RETRY_MIN_S
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _deliver(self, key: int) -> bool:
        """One attempt; True when the exchange is done with (delivered, or refused for good)."""
        exchange, _ = self._pending[key]
        lane = (exchange.tenant, exchange.pid)
        self._lanes.move_to_end(lane)  # lanes beyond LANES get their turn in the next rounds
        if not await self._stored(key):
            self._done(key, lane)  # the Ask was told: not remembered
            return True
        try:
            await self._data.remember(exchange.tenant, exchange.pid, list(exchange.entries),
                                      exchange_id=exchange.id)
        except _NOT_NOW as err:
            if not self._away:
                log.warning("%s not reachable: %d exchanges wait in the outbox to be "
                            "remembered (%s)", DATA_SERVICE, len(self._pending), err.message)
            self._away = self._behind = True
            return False
        except VfmError as err:
            attempts = self._attempts[key] = self._attempts.get(key, 0) + 1
            if not isinstance(err, _NEVER) and attempts < MAX_ATTEMPTS:
                return False
            log.warning("the exchange of process %d was not remembered: %s refused it (%s)",
                        exchange.pid, DATA_SERVICE, err.message)
        else:
            if self._away:
                log.info("%s is back: delivering the %d exchanges that waited", DATA_SERVICE,
                         len(self._pending))
                self._away = False
        self._done(key, lane)
        return True

    async def _stored(self, key: int) -> bool:
        """Wait until the exchange's record is durable; False if the store refused it.
        Delivering only what is stored puts the record's removal in a later transaction
        than the record: a crash in between means a replay (which vfm-datad recognises),
        never a loss."""
        written = self._writing.pop(key, None)
        if written is None:
            return True  # loaded from the store, or waited for by an earlier attempt
        try:
            await asyncio.wrap_future(written)
        except lmdb.Error:
            return False
        return True

    def _done(self, key: int, lane: tuple[str, int]) -> None:
        _, size = self._pending.pop(key)
        self._bytes -= size
        self._attempts.pop(key, None)
        keys = self._lanes[lane]
        keys.popleft()
        if not keys:
            del self._lanes[lane]
        if self._behind and not self._pending:
            log.info("every exchange that waited has been delivered to %s", DATA_SERVICE)
            self._behind = False
        try:
            self._store.delete(key)  # not waited for: a crash before it only means a replay
        except WriterClosed:
            pass  # stopping: the record stays, and the next start delivers it again (a no-op)
