"""The process table: spawn, signal and account FM processes, durable in LMDB, per tenant."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable

from kernel.identity import Caller
from kernel.process import (ON_RECOVERY, TERMINAL, ProcRecord, ProcState, validate_priority,
                            validate_quota, validate_spec)
from kernel.quota import TokenBucket, admit
from kernel.store import KernelStore
from libvfm.errors import FailedPrecondition, NotFound, QuotaExceeded
from libvfm.types import ProcessSpec, Quota

log = logging.getLogger("vfmd.table")

MAX_LIVE_PER_TENANT = 10_000
Preempt = Callable[[str], None]  # called with the reason when a running Ask must stop


class ProcessTable:
    def __init__(self, store: KernelStore, clock: Callable[[], float] = time.time):
        self._store = store
        self._clock = clock
        self._procs: dict[int, ProcRecord] = {}
        self._running: dict[int, int] = {}
        self._buckets: dict[int, TokenBucket] = {}
        self._preempt: dict[int, set[Preempt]] = {}
        self._recover()

    def _recover(self) -> None:
        """Reload every process; those caught mid-work come back READY."""
        changed = []
        for record in self._store.processes():
            if record.state in ON_RECOVERY:
                record.state = ON_RECOVERY[record.state]
                record.updated_at = self._clock()
                changed.append(record)
            self._procs[record.pid] = record
        if changed:
            self._store.put_processes(changed)
        log.info("recovered %d processes (%d were mid-work)", len(self._procs), len(changed))

    # lookups
    def get(self, caller: Caller, pid: int) -> ProcRecord:
        record = self._procs.get(pid)
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
    def spawn(self, caller: Caller, spec: ProcessSpec) -> ProcRecord:
        validate_spec(spec)
        live = sum(1 for r in self._procs.values()
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

        record = self._store.create_process(build)
        self._procs[record.pid] = record
        return record

    def kill(self, caller: Caller, pid: int) -> ProcRecord:
        record = self.get(caller, pid)
        return self._transition(record, ProcState.KILLED, "killed")

    def suspend(self, caller: Caller, pid: int) -> ProcRecord:
        record = self.get(caller, pid)
        return self._transition(record, ProcState.SUSPENDED, "suspended")

    def resume(self, caller: Caller, pid: int) -> ProcRecord:
        record = self.get(caller, pid)
        if record.state != ProcState.SUSPENDED:
            raise FailedPrecondition(f"process {pid} is {record.state.name}, not SUSPENDED")
        return self._transition(record, ProcState.READY, "resumed")

    def set_quota(self, caller: Caller, pid: int, quota: Quota) -> ProcRecord:
        record = self._live(caller, pid)
        validate_quota(quota)
        return self._update(record, replace(record.spec, quota=quota))

    def set_priority(self, caller: Caller, pid: int, priority: int) -> ProcRecord:
        record = self._live(caller, pid)
        validate_priority(priority)
        return self._update(record, replace(record.spec, priority=priority))

    # the Ask path's bookkeeping
    def begin_ask(self, caller: Caller, pid: int, on_preempt: Preempt) -> ProcRecord:
        """Admit one Ask: check state and quotas, mark the process RUNNING."""
        record = self.get(caller, pid)
        if record.state not in (ProcState.READY, ProcState.RUNNING):
            raise FailedPrecondition(f"process {pid} is {record.state.name}; it cannot ask now")
        now = self._clock()
        admit(pid, record.spec.quota, record.counters, self.running(pid), self._bucket(record), now)
        if record.state == ProcState.READY:
            record.move(ProcState.RUNNING)
            self._store.put_process(record)
        self._running[pid] = self.running(pid) + 1
        self._preempt.setdefault(pid, set()).add(on_preempt)
        return record

    def end_ask(self, pid: int, on_preempt: Preempt, tokens_in: int, tokens_out: int,
                cost: float) -> ProcRecord:
        record = self._procs[pid]
        counters = record.counters
        counters.tokens_in += tokens_in
        counters.tokens_out += tokens_out
        counters.cost += cost
        counters.asks += 1
        bucket = self._bucket(record)
        if bucket is not None:
            bucket.charge(tokens_in + tokens_out, self._clock())
        self._running[pid] = max(0, self.running(pid) - 1)
        self._preempt.get(pid, set()).discard(on_preempt)
        if self._running[pid] == 0 and record.state == ProcState.RUNNING:
            record.move(ProcState.READY)
        record.updated_at = self._clock()
        self._store.put_process(record)
        return record

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

    def _update(self, record: ProcRecord, spec: ProcessSpec) -> ProcRecord:
        updated = replace(record, spec=spec, updated_at=self._clock())
        self._store.put_process(updated)
        self._procs[record.pid] = updated
        return updated

    def _transition(self, record: ProcRecord, target: ProcState, reason: str) -> ProcRecord:
        updated = replace(record, counters=record.counters)
        updated.move(target)
        self._store.put_process(updated)  # durable before the syscall is acknowledged
        self._procs[record.pid] = updated
        for preempt in list(self._preempt.get(record.pid, ())):
            preempt(reason)
        return updated
