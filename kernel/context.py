"""The kernel's side of the Data Agent: working sets for Ask and Context, memory of exchanges."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from kernel.memory import (DEFAULT_BUDGET, RANKED_LIMIT, RECENT_TURNS, Assembly, Candidates,
                           Item, PageTable, assemble)
from kernel.process import ProcRecord
from kernel.registry import ServiceRegistry
from kernel.table import ProcessTable
from vfmos_runtime.errors import InvalidArgument, Unavailable, VfmError, from_rpc_error
from vfmos_runtime.protocol import DATA_SERVICE
from vfmos.data.v1 import data_pb2, data_pb2_grpc

log = logging.getLogger("vfmd.context")
MAX_BUDGET = 1 << 20
CALL_TIMEOUT_S = 30.0


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

    def __init__(self, table: ProcessTable, registry: ServiceRegistry, pages: PageTable):
        self._table = table
        self._registry = registry
        self.pages = pages
        self._warned = False
        self._background: set[asyncio.Task] = set()

    def stub(self) -> data_pb2_grpc.DataStub:
        return data_pb2_grpc.DataStub(self._registry.channel(DATA_SERVICE))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._registry.metadata(DATA_SERVICE)

    async def call(self, method: str, request, timeout: float = CALL_TIMEOUT_S):
        """One unary call to vfm-datad, its errors in our vocabulary."""
        try:
            return await getattr(self.stub(), method)(
                request, timeout=timeout, metadata=self._registry.metadata(DATA_SERVICE))
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def error(self, exc: grpc.RpcError) -> VfmError:
        err = from_rpc_error(exc)
        if err.code == grpc.StatusCode.UNAVAILABLE:
            self._registry.suspect(DATA_SERVICE)
            return Unavailable(f"service {DATA_SERVICE} is unavailable: {err.message}")
        return err

    async def working_set(self, record: ProcRecord, question: str, budget: int = 0,
                          now: float = 0.0, touch: bool = False) -> WorkingSet:
        budget = budget or record.spec.context_budget or DEFAULT_BUDGET
        if not 0 < budget <= MAX_BUDGET:
            raise InvalidArgument(f"budget must be 1..{MAX_BUDGET} tokens, got {budget}")
        started = time.perf_counter()
        reply = await self.call("Candidates", data_pb2.CandidatesRequest(
            tenant=record.tenant, pid=record.pid, question=question, limit=RANKED_LIMIT,
            recent=RECENT_TURNS, collections=record.spec.collections, knowledge_k=8, now=now))
        assembly = assemble(_candidates(reply), budget, record.spec.quota.max_resident_pages)
        ws = WorkingSet(assembly, pages=reply.pages,
                        pagein_ms=(time.perf_counter() - started) * 1000)
        if touch:
            ws.faults, ws.hits, ws.resident = self.pages.touch(record.pid, assembly.items)
            self._table.count_pages(record.pid, ws.faults, ws.hits)
        else:
            ws.resident = self.pages.resident(record.pid)
        return ws

    async def for_ask(self, record: ProcRecord, question: str) -> list[Item]:
        """The Ask path's working set; without a Data Agent the Ask goes on without one."""
        try:
            ws = await self.working_set(record, question, touch=True)
        except Unavailable as err:
            if not self._warned:
                log.warning("asking without memory or knowledge: %s", err.message)
                self._warned = True
            return []
        self._warned = False
        return ws.assembly.items

    def remember_exchange(self, record: ProcRecord, question: str, answer: str) -> None:
        """Remember an Ask's question and answer, in the background (never on the Ask path)."""
        now = time.time()
        entries = [data_pb2.MemoryEntry(speaker="user", text=question, time=now)]
        if answer.strip():
            entries.append(data_pb2.MemoryEntry(speaker="assistant", text=answer, time=now))
        request = data_pb2.RememberRequest(tenant=record.tenant, pid=record.pid, entries=entries)

        async def send() -> None:
            try:
                await self.call("Remember", request)
            except VfmError as err:
                log.debug("exchange of process %d not remembered: %s", record.pid, err.message)

        task = asyncio.get_running_loop().create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _entry_item(kind: str, e: data_pb2.MemoryEntry, score: float = 0.0) -> Item:
    return Item(kind=kind, text=e.line or f"{e.speaker}: {e.text}", tokens=e.tokens,
                source_ids=[f"mem:{e.seq}", f"page:{e.page}"], score=score, page=e.page,
                seq=e.seq, speaker=e.speaker, time=e.time, meta=dict(e.meta), group=e.group,
                group_tokens=e.group_tokens)


def _candidates(reply: data_pb2.CandidatesResponse) -> Candidates:
    knowledge = [Item(kind="knowledge", text=f"[{h.title or h.source}] {h.text}",
                      tokens=h.tokens or max(1, len(h.text) // 4),
                      source_ids=[f"{h.collection}/{h.chunk_id}"], score=h.score,
                      meta={**h.meta, "source": h.source, "position": h.position})
                 for h in reply.knowledge]
    summaries = [Item(kind="summary", text=s.text, tokens=s.tokens,
                      source_ids=[f"pages:{s.first_page}-{s.last_page}"],
                      meta={"pages": f"{s.first_page}-{s.last_page}"})
                 for s in reply.summaries]
    return Candidates(pinned=[_entry_item("pinned", e) for e in reply.pinned],
                      recent=[_entry_item("recent", e) for e in reply.recent],
                      ranked=[_entry_item("memory", h.entry, h.score) for h in reply.ranked],
                      knowledge=knowledge, summaries=summaries)
