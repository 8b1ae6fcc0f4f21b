"""Abstraction in the background: summaries of full page ranges, made by vfm-modeld, stored as
pages that stand in for the range when the kernel leaves it out of a working set."""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from dataclasses import dataclass

import grpc
import lmdb
import msgpack

from services.data.memory import EpisodicMemory, Stored
from services.data.tokens import TokenCounter
from vfmos.model.v1 import model_pb2, model_pb2_grpc

log = logging.getLogger("vfm-datad.summaries")
PROMPT = ("Summarise this part of a conversation in at most three sentences. Keep names, "
          "dates, places and facts; no preamble.\n\n{text}")
MAX_SOURCE_CHARS = 6000


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
                    msgpack.packb([s.first_page, s.last_page, s.text, s.tokens]), db=self._db)

    def list(self, tenant: str, pid: int) -> list[Summary]:
        lo, hi = self._key(tenant, pid), self._key(tenant, pid + 1)
        out = []
        with self._env.begin() as txn:
            cursor = txn.cursor(db=self._db)
            if cursor.set_range(lo):
                for key, raw in cursor:
                    if bytes(key) >= hi:
                        break
                    out.append(Summary(*msgpack.unpackb(raw)))
        return out


class Summarizer:
    """Every `interval_s`, summarise each complete range of `span` pages that has none yet.

    Runs at the lowest priority on the model service and only between Asks' own work:
    it is never on the Ask path, and a missing model service just means no summaries yet."""

    def __init__(self, memory: EpisodicMemory, store: SummaryStore, counter: TokenCounter,
                 model_target: str, span: int = 4, interval_s: float = 10.0):
        self._memory = memory
        self._store = store
        self._counter = counter
        self._target = model_target
        self.span = span
        self.interval_s = interval_s
        self._warned = False

    async def run(self, run_in_thread) -> None:
        async with grpc.aio.insecure_channel(self._target) as channel:
            stub = model_pb2_grpc.ModelStub(channel)
            while True:
                await asyncio.sleep(self.interval_s)
                for tenant, pid in list(self._memory.dirty):
                    try:
                        await self._summarise(stub, run_in_thread, tenant, pid)
                        self._memory.dirty.discard((tenant, pid))
                        self._warned = False
                    except grpc.RpcError as exc:
                        if not self._warned:
                            log.info("no summaries for now: the model service said %s",
                                     exc.code().name)
                            self._warned = True
                        break

    async def _summarise(self, stub, run_in_thread, tenant: str, pid: int) -> None:
        entries: list[Stored] = await run_in_thread(self._memory.entries, tenant, pid)
        if not entries:
            return
        done = {s.first_page for s in await run_in_thread(self._store.list, tenant, pid)}
        complete = entries[-1].page  # the last page may still grow
        for first in range(0, complete - self.span + 1, self.span):
            if first in done:
                continue
            last = first + self.span - 1
            text = "\n".join(e.line for e in entries if first <= e.page <= last)
            summary = await self._generate(stub, text[:MAX_SOURCE_CHARS])
            line = f"[summary of pages {first}-{last}] {summary}"
            tokens = (await run_in_thread(self._counter.count, [line]))[0]
            await run_in_thread(self._store.put, tenant, pid,
                                Summary(first, last, line, tokens))
            log.info("summarised pages %d-%d of process %d (%s)", first, last, pid, tenant)

    @staticmethod
    async def _generate(stub, text: str) -> str:
        request = model_pb2.GenerateRequest(
            messages=[model_pb2.ChatMessage(role="user", content=PROMPT.format(text=text))],
            max_new_tokens=96, priority=0)
        started, pieces = time.monotonic(), []
        async for chunk in stub.Generate(request, timeout=300):
            pieces.append(chunk.text)
            if chunk.done:
                break
        log.debug("summary took %.1f s", time.monotonic() - started)
        return " ".join("".join(pieces).split())
