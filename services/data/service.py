"""The Data Agent's domain facade: knowledge collections and episodic memory over one LMDB."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from vfmos_runtime.errors import Cancelled, InvalidArgument, NotFound
from vfmos_runtime.protocol import MAX_TENANT
from vfmos_runtime.storage import open_env
from vfmos_runtime.embed import Embedder
from services.data.fairshare import CpuShares, Work
from services.data.knowledge import KnowledgeBase
from services.data.memory import EpisodicMemory
from services.data.summarize import SummaryStore
from services.data.tokens import TokenCounter

log = logging.getLogger("vfm-datad")
T = TypeVar("T")


def check_tenant(tenant: str) -> str:
    # The kernel always sets it; an empty or odd one means a caller bypassed the kernel.
    if not tenant or len(tenant) > MAX_TENANT or "\x00" in tenant:
        raise InvalidArgument("a tenant is required (the kernel sets it)")
    return tenant


class DataService:
    """Owns the store and the models; every call runs on a worker thread, off the event loop."""

    def __init__(self, data_dir: Path, embedder: Embedder, counter: TokenCounter,
                 map_size: int = 8 << 30, workers: int = 2):
        self.env = open_env(data_dir / "data.lmdb", map_size=map_size, max_dbs=32)
        self.embedder = embedder
        self.counter = counter
        self.memory = EpisodicMemory(self.env, embedder, counter)
        self.knowledge = KnowledgeBase(self.env, embedder)
        self.summaries = SummaryStore(self.env)
        self.shares = CpuShares(workers)
        # Threads beyond the slots: long work waiting at a checkpoint keeps its thread.
        self._pool = ThreadPoolExecutor(4 * workers + 4, thread_name_prefix="datad")
        # Bulk work (ingest, remember) on threads of lower OS priority: its embedding then
        # yields the cores to the model service's prefill and to interactive calls, which
        # the slots alone cannot do (bench noisy_neighbour: B's Ask TTFT 3.6x without).
        self._bulk = ThreadPoolExecutor(2 * workers + 2, thread_name_prefix="datad-bulk",
                                        initializer=_lower_priority)

    async def run(self, tenant: str, fn: Callable[..., T], *args, **kwargs) -> T:
        """`fn(*args, **kwargs)` on a worker thread once `tenant` is granted a CPU slot."""
        return await self._run(tenant, fn, lambda work: fn(*args, **kwargs), self._pool)

    async def run_batches(self, tenant: str, fn: Callable[..., T], *args, **kwargs) -> T:
        """The same for long work, which gets `checkpoint=` to call between its batches:
        it gives the slot to a waiting tenant there, and stops if its caller went away."""
        return await self._run(tenant, fn, lambda work: fn(*args, checkpoint=work.checkpoint,
                                                           **kwargs), self._bulk)

    async def _run(self, tenant: str, fn: Callable, call: Callable[[Work], T],
                   pool: ThreadPoolExecutor) -> T:
        await self.shares.acquire_async(tenant)
        work = Work(self.shares, tenant)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(pool, work.run, lambda: call(work))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            work.cancel()  # the thread stops at its next checkpoint
            future.add_done_callback(lambda f: _abandoned(f, fn, tenant))
            raise

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Vectors of `texts` from the embedder retrieval uses, and the tokens it read."""
        count = getattr(self.embedder, "count_tokens", None)
        tokens = count(texts) if count is not None else sum(self.counter.count(texts))
        return self.embedder.embed(texts), tokens

    def knowledge_for(self, tenant: str, collections: list[str], question: str,
                      k: int) -> list[tuple[object, int]]:
        """The best chunks over several collections, each with its token count. A collection
        the tenant does not have contributes nothing (it may be another tenant's name)."""
        hits = []
        for name in dict.fromkeys(collections):
            try:
                hits += [(h, name) for h in self.knowledge.search(tenant, name, question, k=k)]
            except NotFound:
                log.info("process of %s names unknown collection %r", tenant, name)
        hits.sort(key=lambda pair: -pair[0].score)
        hits = hits[:k]
        lines = [f"[{h.title or h.source}] {h.text}" for h, _ in hits]
        return [(h, name, n) for (h, name), n in zip(hits, self.counter.count(lines))]

    def close(self) -> None:
        self._bulk.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.env.close()


def _abandoned(future: asyncio.Future, fn: Callable, tenant: str) -> None:
    """How work whose caller went away ended (and its exception retrieved, not warned of)."""
    err = future.exception()
    name = getattr(fn, "__name__", "work")
    if isinstance(err, Cancelled):
        log.info("%s of tenant %s stopped: its caller went away", name, tenant)
    elif err is not None:
        log.info("%s of tenant %s failed after its caller went away: %s", name, tenant, err)


BULK_NICE = 10


def _lower_priority() -> None:
    """Run this worker thread at a lower OS priority (Linux: niceness is per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BULK_NICE)
    except (OSError, AttributeError):
        log.info("bulk work runs at normal priority: cannot lower a thread's priority here")
