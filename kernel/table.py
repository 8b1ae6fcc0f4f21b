"""The process table: spawn, signal and account FM processes, durable in LMDB, per tenant.

Syscalls that change a process are coroutines: the change shows in memory at once and the
reply waits until the store has made it durable, while the event loop serves other calls.
The Ask path's bookkeeping is synchronous and never waits: an Ask's accounting is one
queued write at its end."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import replace
from typing import Callable

from kernel.identity import LOCAL_TENANT_PREFIX, Caller
from kernel.process import (DEFAULT_REAP_AFTER_S, ON_RECOVERY, TERMINAL, ProcRecord, ProcState,
                            validate_priority, validate_quota, validate_spec)
from kernel.quota import TokenBucket, admit
from kernel.store import KernelStore
from vfmos_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, QuotaExceeded
from vfmos_runtime.types import Counters, ProcessSpec, Quota, Usage
from vfmos_runtime.validate import pid as validate_pid

log = logging.getLogger("vfmd.table")

MAX_LIVE_PER_TENANT = 10_000
Listener = Callable[[str], None]  # hears "killed", "suspended" or "resumed" for a process


class ProcessTable:
    def __init__(self, store: KernelStore, clock: Callable[[], float] = time.time,
                 reap_after_s: float = DEFAULT_REAP_AFTER_S):
        self._store = store
        self._clock = clock
        self._reap_after_s = reap_after_s
        # Per tenant, the counters of its reaped processes: accounting outlives the records.
        self._reaped: dict[str, Counters] = {
            tenant: Counters(**sums) for tenant, sums in store.reaped_totals().items()}
        self._procs: dict[int, ProcRecord] = {}
        self._running: dict[int, int] = {}
        self._buckets: dict[int, TokenBucket] = {}
        self._slots: dict[int, int] = {}
        self._listeners: dict[int, set[Listener]] = {}
        self._spawning: Counter[str] = Counter()  # per tenant: spawns waiting on their commit
        self._weights: dict[str, float] = dict(store.get_meta("tenant_weights") or {})
        self._recover()

    def _recover(self) -> None:
        """Reload every process; those caught mid-work come back READY."""
        changed = []
        for record in self._store.processes():
            dirty = _into_local_namespace(record)
            if record.state in ON_RECOVERY:
                record.state = ON_RECOVERY[record.state]
                record.updated_at = self._clock()
                dirty = True
            if dirty:
                changed.append(record)
            self._procs[record.pid] = record
        if changed:
            self._store.put_processes(changed).result()  # before serving: waiting is fine
        log.info("recovered %d processes (%d mid-work or renamed)", len(self._procs), len(changed))

    # lookups
    def get(self, caller: Caller, pid: int) -> ProcRecord:
        record = self._procs.get(validate_pid(pid))
        # Another tenant's pid reads as missing: existence itself is not to be learned.
        if record is None or not caller.may_touch(record.tenant):
            raise NotFound(f"no process with pid {pid}")
        return record

    def list(self, caller: Caller, include_ended: bool = False) -> list[ProcRecord]:
        return [r for r in self._procs.values()
                if caller.may_touch(r.tenant) and (include_ended or r.state not in TERMINAL)]

    def running(self, pid: int) -> int:
        return self._running.get(pid, 0)

    # process syscalls
    async def spawn(self, caller: Caller, spec: ProcessSpec) -> ProcRecord:
        validate_spec(spec)
        live = self._spawning[caller.tenant] + sum(
            1 for r in self._procs.values()
            if r.tenant == caller.tenant and r.state not in TERMINAL)
        if live >= MAX_LIVE_PER_TENANT:
            raise QuotaExceeded(f"tenant {caller.tenant} already has {live} live processes",
                                "max_processes", f"tenant {caller.tenant}")
        now = self._clock()

        def build(pid: int) -> ProcRecord:
            record = ProcRecord(pid=pid, tenant=caller.tenant, owner_uid=caller.uid, spec=spec,
                                created_at=now, updated_at=now)
            record.move(ProcState.READY)
            return record

        # The pid is allocated in the commit, and the process appears once it is durable.
        # Shielded: a caller that goes away meanwhile cannot leave a stored process the
        # table does not know.
        written = self._store.create_process(build)
        self._spawning[caller.tenant] += 1
        return await asyncio.shield(self._created(caller.tenant, written))

    async def kill(self, caller: Caller, pid: int) -> ProcRecord:
        record = self.get(caller, pid)
        return await _durable(*self._transition(record, ProcState.KILLED, "killed"))

    async def suspend(self, caller: Caller, pid: int) -> ProcRecord:
        record = self.get(caller, pid)
        return await _durable(*self._transition(record, ProcState.SUSPENDED, "suspended"))

    async def resume(self, caller: Caller, pid: int) -> ProcRecord:
        record = self.get(caller, pid)
        if record.state != ProcState.SUSPENDED:
            raise FailedPrecondition(f"process {pid} is {record.state.name}, not SUSPENDED")
        return await _durable(*self._transition(record, ProcState.READY, "resumed"))

    async def set_quota(self, caller: Caller, pid: int, quota: Quota) -> ProcRecord:
        record = self._live(caller, pid)
        validate_quota(quota)
        return await _durable(*self._update(record, replace(record.spec, quota=quota)))

    async def set_priority(self, caller: Caller, pid: int, priority: int) -> ProcRecord:
        record = self._live(caller, pid)
        validate_priority(priority)
        return await _durable(*self._update(record, replace(record.spec, priority=priority)))

    # the Ask path's bookkeeping
    def begin_ask(self, caller: Caller, pid: int, listener: Listener) -> ProcRecord:
        """Admit one Ask (state and quotas); `listener` hears kill, suspend and resume."""
        record = self.get(caller, pid)
        if record.state not in (ProcState.READY, ProcState.RUNNING):
            raise FailedPrecondition(f"process {pid} is {record.state.name}; it cannot ask now")
        now = self._clock()
        admit(pid, record.spec.quota, record.counters, self.running(pid), self._bucket(record), now)
        self._running[pid] = self.running(pid) + 1
        self._listeners.setdefault(pid, set()).add(listener)
        return record

    def segment_started(self, pid: int) -> None:
        """An ask of `pid` got a model slot: the process is RUNNING while any ask holds one.
        In memory only: a restart brings RUNNING back READY anyway."""
        self._slots[pid] = self._slots.get(pid, 0) + 1
        record = self._procs[pid]
        if record.state == ProcState.READY:
            record.move(ProcState.RUNNING)

    def segment_ended(self, pid: int) -> None:
        self._slots[pid] = max(0, self._slots.get(pid, 0) - 1)
        record = self._procs[pid]
        if self._slots[pid] == 0 and record.state == ProcState.RUNNING:
            record.move(ProcState.READY)

    def state(self, pid: int) -> ProcState:
        return self._procs[pid].state

    def end_ask(self, pid: int, listener: Listener, usage: Usage) -> ProcRecord:
        """Account a finished Ask: the one write it makes, queued (with the page table its
        working set touched), not waited for; a crash before its commit loses only this."""
        record = self._procs[pid]
        c = record.counters
        c.tokens_in += usage.tokens_in
        c.tokens_out += usage.tokens_out
        c.cost += usage.cost
        c.asks += 1
        c.queue_ms += usage.queue_ms
        c.ttft_ms += usage.ttft_ms
        c.decode_ms += usage.decode_ms
        c.preemptions += usage.preemptions
        bucket = self._bucket(record)
        if bucket is not None:
            bucket.charge(usage.tokens_in + usage.tokens_out, self._clock())
        self._running[pid] = max(0, self.running(pid) - 1)
        self._listeners.get(pid, set()).discard(listener)
        record.updated_at = self._clock()
        self._store.put_process(record)
        return record

    def count_pages(self, pid: int, faults: int, hits: int) -> None:
        """Page faults and hits of the virtual context memory (from each working set)."""
        record = self._procs.get(pid)
        if record is None:  # reaped while its working set was assembled
            return
        record.counters.page_faults += faults
        record.counters.page_hits += hits
        if not self.running(pid):  # a Context syscall: no end_ask will write them
            self._store.put_process(record)

    async def fork(self, caller: Caller, pid: int, name: str) -> tuple[ProcRecord, ProcRecord]:
        """A new process with the parent's spec; its memory is shared by the caller."""
        parent = self._live(caller, pid)
        child = await self.spawn(caller, replace(parent.spec,
                                                 name=name or f"{parent.spec.name}-fork"))
        return parent, child

    # tenants
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    async def set_weight(self, tenant: str, weight: float) -> None:
        if not 0.01 <= weight <= 1000:
            raise InvalidArgument(f"tenant weight must be between 0.01 and 1000, got {weight}")
        self._weights[tenant] = weight
        await asyncio.wrap_future(self._store.put_meta("tenant_weights", self._weights))

    def tenant_totals(self, caller: Caller) -> dict[str, tuple[int, Counters]]:
        """Per visible tenant: live processes and summed counters (ended processes count
        too, reaped ones included)."""
        totals: dict[str, tuple[int, Counters]] = {
            tenant: (0, replace(sums)) for tenant, sums in self._reaped.items()
            if caller.may_touch(tenant)}
        for r in self._procs.values():
            if not caller.may_touch(r.tenant):
                continue
            live, sums = totals.get(r.tenant, (0, Counters()))
            _add(sums, r.counters)
            totals[r.tenant] = (live + (r.state not in TERMINAL), sums)
        return totals

    # reaping
    def reap(self) -> list[int]:
        """Remove processes that ended (EXITED, KILLED) more than the retention period ago;
        their counters stay in their tenant's totals. One queued write; the pids reaped."""
        cutoff = self._clock() - self._reap_after_s
        gone = [r for r in self._procs.values()
                if r.state in TERMINAL and r.updated_at <= cutoff and not self.running(r.pid)]
        if not gone:
            return []
        for record in gone:
            _add(self._reaped.setdefault(record.tenant, Counters()), record.counters)
            pid = record.pid
            del self._procs[pid]
            for per_pid in (self._running, self._buckets, self._slots, self._listeners):
                per_pid.pop(pid, None)
        self._store.reap_processes([r.pid for r in gone],
                                   {t: vars(c) for t, c in self._reaped.items()})
        log.info("reaped %d ended processes", len(gone))
        return [r.pid for r in gone]

    async def reap_forever(self, forget: Callable[[int], None]) -> None:
        """Reap every so often (a tenth of the retention period, at most a minute);
        `forget(pid)` hears each reaped pid (to drop what other parts keep for it)."""
        every_s = min(60.0, self._reap_after_s / 10)
        while True:
            for pid in self.reap():
                forget(pid)
            await asyncio.sleep(every_s)

    # helpers
    def _bucket(self, record: ProcRecord) -> TokenBucket | None:
        rate = record.spec.quota.tokens_per_minute
        if rate <= 0:
            self._buckets.pop(record.pid, None)
            return None
        bucket = self._buckets.get(record.pid)
        if bucket is None or bucket.rate_per_minute != rate:
            bucket = TokenBucket.full(rate, self._clock())
            self._buckets[record.pid] = bucket
        return bucket

    def _live(self, caller: Caller, pid: int) -> ProcRecord:
        record = self.get(caller, pid)
        if record.state in TERMINAL:
            raise FailedPrecondition(f"process {pid} is {record.state.name}")
        return record

    async def _created(self, tenant: str, written: Future) -> ProcRecord:
        try:
            record = await asyncio.wrap_future(written)
        finally:
            self._spawning[tenant] -= 1
        self._procs[record.pid] = record
        return record

    # A change applies to memory at once and its write is queued in the same step, so the
    # store sees changes in the order the table made them; the syscall awaits the write.
    def _update(self, record: ProcRecord, spec: ProcessSpec) -> tuple[ProcRecord, Future]:
        updated = replace(record, spec=spec, updated_at=self._clock())
        written = self._store.put_process(updated)
        self._procs[record.pid] = updated
        return updated, written

    def _transition(self, record: ProcRecord, target: ProcState,
                    reason: str) -> tuple[ProcRecord, Future]:
        updated = replace(record, counters=record.counters)
        updated.move(target)
        updated.updated_at = self._clock()  # for a final state: when it ended (see reap)
        written = self._store.put_process(updated)
        self._procs[record.pid] = updated
        for listener in list(self._listeners.get(record.pid, ())):
            listener(reason)
        return updated, written


def _add(sums: Counters, counters: Counters) -> None:
    for name, value in vars(counters).items():
        setattr(sums, name, getattr(sums, name) + value)


def _into_local_namespace(record: ProcRecord) -> bool:
    """A process a local user spawned before local tenants had their own namespace was
    stored under the bare user name, which a token tenant of that name would now own:
    move it to "unix:NAME". Token callers have no uid (-1)."""
    if record.owner_uid < 0 or record.tenant.startswith(LOCAL_TENANT_PREFIX):
        return False
    record.tenant = LOCAL_TENANT_PREFIX + record.tenant
    return True


async def _durable(record: ProcRecord, written: Future) -> ProcRecord:
    """`record` once its write is durable: only then is the syscall that made it answered."""
    await asyncio.wrap_future(written)
    return record
