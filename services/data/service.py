"""The Data Agent's domain facade: knowledge collections and episodic memory over one LMDB."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

import lmdb

from libvfm.errors import InvalidArgument
from services.data.embed import Embedder
from services.data.knowledge import KnowledgeBase
from services.data.memory import EpisodicMemory
from services.data.tokens import TokenCounter

log = logging.getLogger("vfm-datad")
T = TypeVar("T")
MAX_TENANT = 128


def check_tenant(tenant: str) -> str:
    # The kernel always sets it; an empty or odd one means a caller bypassed the kernel.
    if not tenant or len(tenant) > MAX_TENANT or "\x00" in tenant:
        raise InvalidArgument("a tenant is required (the kernel sets it)")
    return tenant


class DataService:
    """Owns the store and the models; every call runs on a worker thread, off the event loop."""

    def __init__(self, data_dir: Path, embedder: Embedder, counter: TokenCounter,
                 map_size: int = 8 << 30, workers: int = 2):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(data_dir / "data.lmdb"), map_size=map_size, max_dbs=32,
                             subdir=True, sync=True, metasync=True, lock=True)
        self.embedder = embedder
        self.counter = counter
        self.memory = EpisodicMemory(self.env, embedder, counter)
        self.knowledge = KnowledgeBase(self.env, embedder)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="datad")

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.env.close()
