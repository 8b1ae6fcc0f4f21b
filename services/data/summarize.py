"""Abstraction in the background: summaries of full page ranges, asked of the model through the
kernel, stored as pages that stand in for the range when a working set leaves it out."""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

from libvfm import AsyncClient
from vfmos_runtime.errors import Unauthenticated, VfmError
from vfmos_runtime.storage import pack, unpack
from services.data.memory import EpisodicMemory, Stored
from services.data.tokens import TokenCounter

log = logging.getLogger("vfm-datad.summaries")
PROMPT = ("Summarise this part of a conversation in at most three sentences. Keep names, "
          "dates, places and facts; no preamble.\n\n{text}")
MAX_SOURCE_CHARS = 6000
PROCESS = "vfm-datad-summaries"


@dataclass
class Summary:
    first_page: int
    last_page: int
    text: str
    tokens: int


class SummaryStore:
    """Summaries per process, keyed by the first page they cover."""

    def __init__(self, env: lmdb.Environment):
        self._env = env
        self._db = env.open_db(b"m_summaries")

    @staticmethod
    def _key(tenant: str, pid: int, first: int = 0) -> bytes:
        return tenant.encode() + b"\x00" + struct.pack(">QQ", pid, first)

    def put(self, tenant: str, pid: int, s: Summary) -> None:
        with self._env.begin(write=True) as txn:
            txn.put(self._key(tenant, pid, s.first_page),
                    pack([s.first_page, s.last_page, s.text, s.tokens]), db=self._db)

    def list(self, tenant: str, pid: int) -> list[Summary]:
        lo, hi = self._key(tenant, pid), self._key(tenant, pid + 1)
        out = []
        with self._env.begin() as txn:
            cursor = txn.cursor(db=self._db)
            if cursor.set_range(lo):
                for key, raw in cursor:
                    if bytes(key) >= hi:
                        break
                    out.append(Summary(*unpack(raw)))
        return out


class SummaryAgents:
    """Each tenant's identity for its summaries: a bearer token an admin made for that
    tenant, kept here (the kernel stores only its hash), so the summaries' Asks are the
    tenant's own calls: its process, its quotas, its fair share."""

    def __init__(self, env: lmdb.Environment):
        self._env = env
        self._db = env.open_db(b"m_agents")

    def token(self, tenant: str) -> str | None:
        with self._env.begin() as txn:
            raw = txn.get(tenant.encode(), db=self._db)
        return raw.decode() if raw is not None else None

    def put(self, tenant: str, token: str) -> None:
        with self._env.begin(write=True) as txn:
            txn.put(tenant.encode(), token.encode(), db=self._db)

    def drop(self, tenant: str) -> None:
        with self._env.begin(write=True) as txn:
            txn.delete(tenant.encode(), db=self._db)


class Summarizer:
    """Every `interval_s`, summarise each complete range of `span` pages that has none yet.

    The model work is charged to the tenant whose memory it summarises: an Ask (stateless,
    priority 0) of that tenant's own FM process `vfm-datad-summaries`, made through the
    kernel as that tenant. So the scheduler counts it in the tenant's fair share, the
    process's quotas bound it, and the tenant (or an admin) pauses it with `vfmctl suspend`
    of that process and resumes it with `vfmctl resume`. Each tenant is served by its own
    task: one tenant's paused or slow summaries never hold up another's. It is never on an
    Ask's path, and a missing model service just means no summaries yet."""

    def __init__(self, memory: EpisodicMemory, store: SummaryStore, counter: TokenCounter,
                 kernel_socket: Path, span: int = 4, interval_s: float = 10.0,
                 agents: SummaryAgents | None = None):
        self._memory = memory
        self._store = store
        self._counter = counter
        self._kernel_socket = kernel_socket
        self._agents = agents
        self.span = span
        self.interval_s = interval_s
        self._tasks: dict[str, asyncio.Task] = {}
        self._clients: dict[str, AsyncClient] = {}
        self._quiet: set[str] = set()  # tenants whose last round was logged as not done

    async def run(self, run_in_thread) -> None:
        async with AsyncClient(self._kernel_socket, timeout=300) as admin:
            try:
                while True:
                    await asyncio.sleep(self.interval_s)
                    for tenant, pids in _by_tenant(self._memory.dirty_processes()).items():
                        if tenant not in self._tasks:
                            self._tasks[tenant] = asyncio.create_task(
                                self._serve(admin, run_in_thread, tenant, pids))
                            self._tasks[tenant].add_done_callback(
                                lambda _, t=tenant: self._tasks.pop(t, None))
            finally:
                for task in list(self._tasks.values()):
                    task.cancel()
                for client in self._clients.values():
                    await client.close()

    async def _serve(self, admin: AsyncClient, run_in_thread, tenant: str,
                     pids: list[int]) -> None:
        """One round for one tenant: its processes' new complete ranges, unless paused."""
        try:
            kernel = await self._client(admin, run_in_thread, tenant)
            for pid in pids:
                process = await self._process(kernel, tenant)
                if process is None:
                    return  # paused: the ranges stay dirty for when it is resumed
                await self._summarise(kernel, process, run_in_thread, tenant, pid)
                self._memory.clean(tenant, pid)
            self._quiet.discard(tenant)
        except Unauthenticated:
            # The token was revoked (or the kernel's store lost): make a new one next round.
            await run_in_thread(tenant, self._agents.drop, tenant)
            client = self._clients.pop(tenant, None)
            if client is not None:
                await client.close()
        except VfmError as err:
            self._note(tenant, f"no summaries for now: {err.message}")

    async def _client(self, admin: AsyncClient, run_in_thread, tenant: str) -> AsyncClient:
        if tenant not in self._clients:
            token = await run_in_thread(tenant, self._agents.token, tenant)
            if token is None:
                token, _ = await admin.token_create(tenant, label=f"{PROCESS} for {tenant}")
                await run_in_thread(tenant, self._agents.put, tenant, token)
            self._clients[tenant] = AsyncClient(self._kernel_socket, token=token, timeout=300)
        return self._clients[tenant]

    async def _process(self, kernel: AsyncClient, tenant: str) -> int | None:
        """The tenant's live summaries process (spawned if it has none); None while paused."""
        mine = [p for p in await kernel.ps() if p.name == PROCESS]
        if any(p.state == "SUSPENDED" for p in mine):
            self._note(tenant, f"summaries of tenant {tenant} paused ({PROCESS} suspended)")
            return None
        if mine:
            return mine[0].pid
        return (await kernel.spawn(PROCESS, priority=0)).pid

    def _note(self, tenant: str, message: str) -> None:
        if tenant not in self._quiet:
            log.info("%s", message)
            self._quiet.add(tenant)

    async def _summarise(self, kernel: AsyncClient, process: int, run_in_thread, tenant: str,
                         pid: int) -> None:
        entries: list[Stored] = await run_in_thread(tenant, self._memory.entries, tenant, pid)
        if not entries:
            return
        done = {s.first_page for s in await run_in_thread(tenant, self._store.list, tenant, pid)}
        complete = entries[-1].page  # the last page may still grow
        for first in range(0, complete - self.span + 1, self.span):
            if first in done:
                continue
            last = first + self.span - 1
            text = "\n".join(_dated(e) for e in entries if first <= e.page <= last)
            started = time.monotonic()
            answer = await kernel.ask(process, PROMPT.format(text=text[:MAX_SOURCE_CHARS]),
                                      max_new_tokens=64, stateless=True)
            line = f"[summary of pages {first}-{last}] {' '.join(answer.text.split())}"
            tokens = (await run_in_thread(tenant, self._counter.count, [line]))[0]
            await run_in_thread(tenant, self._store.put, tenant, pid,
                                Summary(first, last, line, tokens))
            log.info("summarised pages %d-%d of process %d (%s) in %.1f s, as process %d",
                     first, last, pid, tenant, time.monotonic() - started, process)


def _by_tenant(processes: list[tuple[str, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for tenant, pid in sorted(processes):
        out.setdefault(tenant, []).append(pid)
    return out


def _dated(entry: Stored) -> str:
    return f"[{entry.group}] {entry.line}" if entry.group else entry.line
