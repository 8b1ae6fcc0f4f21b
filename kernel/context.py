"""The kernel's side of the Data Agent: working sets for Ask and Context, memory of exchanges."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import lmdb

from kernel.memory import (DEFAULT_BUDGET, RANKED_LIMIT, RECENT_TURNS, Assembly, Item, PageTable,
                           assemble)
from kernel.outbox import ExchangeOutbox
from kernel.ports import CandidatesQuery, DataClient, MemoryEntry
from kernel.process import MAX_CONTEXT_BUDGET, ProcRecord
from kernel.table import ProcessTable
from kernel.writer import WriterClosed
from vfmos_runtime.errors import DeadlineExceeded, InvalidArgument, Unavailable, VfmError
from vfmos_runtime.protocol import DATA_SERVICE

log = logging.getLogger("vfmd.context")


@dataclass
class WorkingSet:
    assembly: Assembly
    faults: int = 0
    hits: int = 0
    resident: int = 0
    pages: int = 0
    pagein_ms: float = 0.0


class ContextManager:
    """Builds each process's working set from what vfm-datad ranks, and keeps the page table."""

    def __init__(self, table: ProcessTable, data: DataClient, pages: PageTable,
                 outbox: ExchangeOutbox):
        self._table = table
        self.data = data
        self.pages = pages
        self._outbox = outbox
        self._warned = False

    async def working_set(self, record: ProcRecord, question: str, budget: int = 0,
                          now: float = 0.0, touch: bool = False) -> WorkingSet:
        budget = budget or record.spec.context_budget or DEFAULT_BUDGET
        if not 0 < budget <= MAX_CONTEXT_BUDGET:
            raise InvalidArgument(f"budget must be 1..{MAX_CONTEXT_BUDGET} tokens, got {budget}")
        started = time.perf_counter()
        reply = await self.data.candidates(CandidatesQuery(
            tenant=record.tenant, pid=record.pid, question=question, limit=RANKED_LIMIT,
            recent=RECENT_TURNS, collections=tuple(record.spec.collections), knowledge_k=8,
            now=now))
        assembly = assemble(reply.candidates, budget, record.spec.quota.max_resident_pages)
        ws = WorkingSet(assembly, pages=reply.pages,
                        pagein_ms=(time.perf_counter() - started) * 1000)
        if touch:
            ws.faults, ws.hits, ws.resident = self.pages.touch(record.pid, assembly.items)
            self._table.count_pages(record.pid, ws.faults, ws.hits)
        else:
            ws.resident = self.pages.resident(record.pid)
        return ws

    async def for_ask(self, record: ProcRecord, question: str) -> tuple[list[Item], str]:
        """The Ask path's working set, and "" or why there is none: without a Data Agent
        the Ask goes on without one, and its result says so."""
        try:
            ws = await self.working_set(record, question, touch=True)
        except Unavailable as err:
            return self._without(err, f"{DATA_SERVICE} not reachable")
        except DeadlineExceeded as err:
            return self._without(err, f"{DATA_SERVICE} did not answer in time")
        self._warned = False
        return ws.assembly.items, ""

    def _without(self, err: VfmError, reason: str) -> tuple[list[Item], str]:
        if not self._warned:  # once per outage, not once per Ask
            log.warning("asking without memory or knowledge: %s", err.message)
            self._warned = True
        return [], reason

    async def remember_exchange(self, record: ProcRecord, question: str, answer: str) -> str:
        """Remember an Ask's question and answer: stored in the kernel's outbox, durable when
        this returns, and delivered to vfm-datad from there (now, or when it is back).
        Returns "" or why the exchange will not be remembered."""
        now = time.time()
        entries = [MemoryEntry(speaker="user", text=question, time=now)]
        if answer.strip():
            entries.append(MemoryEntry(speaker="assistant", text=answer, time=now))
        try:
            await asyncio.wrap_future(self._outbox.add(record.tenant, record.pid, entries))
        except (VfmError, WriterClosed, lmdb.Error) as err:
            reason = getattr(err, "message", None) or str(err)
            log.warning("the exchange of process %d will not be remembered: %s", record.pid,
                        reason)
            return reason
        return ""

