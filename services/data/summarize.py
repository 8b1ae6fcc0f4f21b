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
from vfmos_runtime.errors import VfmError
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


class Summarizer:
    """Every `interval_s`, summarise each complete range of `span` pages that has none yet.

    The model work is an Ask of the FM process `vfm-datad-summaries` (priority 0,
    stateless) through the kernel, so the scheduler accounts for it like any other work
    and it never takes a slot an Ask was promised. It is never on an Ask's path, and a
    missing model service just means no summaries yet."""

    def __init__(self, memory: EpisodicMemory, store: SummaryStore, counter: TokenCounter,
                 kernel_socket: Path, span: int = 4, interval_s: float = 10.0):
        self._memory = memory
        self._store = store
        self._counter = counter
        self._kernel_socket = kernel_socket
        self.span = span
        self.interval_s = interval_s
        self._pid = 0
        self._warned = False

    async def run(self, run_in_thread) -> None:
        async with AsyncClient(self._kernel_socket, timeout=300) as kernel:
            while True:
                await asyncio.sleep(self.interval_s)
                for tenant, pid in list(self._memory.dirty):
                    try:
                        await self._summarise(kernel, run_in_thread, tenant, pid)
                        self._memory.dirty.discard((tenant, pid))
                        self._warned = False
                    except VfmError as err:
                        if not self._warned:
                            log.info("no summaries for now: %s", err.message)
                            self._warned = True
                        self._pid = 0  # the kernel may have restarted: look it up again
                        break

    async def _process(self, kernel: AsyncClient) -> int:
        if not self._pid:
            me = (await kernel.whoami()).tenant  # an admin's ps lists every tenant
            mine = [p for p in await kernel.ps() if p.name == PROCESS and p.tenant == me]
            self._pid = mine[0].pid if mine else (await kernel.spawn(PROCESS, priority=0)).pid
        return self._pid

    async def _summarise(self, kernel: AsyncClient, run_in_thread, tenant: str,
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
            answer = await kernel.ask(await self._process(kernel),
                                      PROMPT.format(text=text[:MAX_SOURCE_CHARS]),
                                      max_new_tokens=64, stateless=True)
            line = f"[summary of pages {first}-{last}] {' '.join(answer.text.split())}"
            tokens = (await run_in_thread(tenant, self._counter.count, [line]))[0]
            await run_in_thread(tenant, self._store.put, tenant, pid,
                                Summary(first, last, line, tokens))
            log.info("summarised pages %d-%d of process %d (%s) in %.1f s", first, last, pid,
                     tenant, time.monotonic() - started)


def _dated(entry: Stored) -> str:
    return f"[{entry.group}] {entry.line}" if entry.group else entry.line
