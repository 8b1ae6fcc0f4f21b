"""vfm-datad under real concurrency: readers during writes, malformed and abandoned ingests."""

from __future__ import annotations

import asyncio

from libvfm import AsyncClient
from libvfm.types import MemoryEntry
from tests.integration.test_data_service import data_stack  # noqa: F401 (the fixture)

SEED = 3000
WRITES = 150


async def _remember_while_reading(socket, pid: int) -> tuple[int, list[str]]:
    """Remember one entry at a time while four readers loop on Context and Recall, as an app
    logging turns while its user asks does; returns (reads, failures)."""
    failures: list[str] = []
    async with AsyncClient(socket, timeout=60) as writer, \
            AsyncClient(socket, timeout=60) as reader:
        # About a thousand entries, as in the report: ranking takes long enough to overlap.
        await writer.remember(pid, [MemoryEntry(f"seed turn {i} about gardens", speaker="ana")
                                    for i in range(SEED)])
        done = asyncio.Event()

        async def write() -> None:
            for n in range(WRITES):
                await writer.remember(pid, [MemoryEntry(f"turn {n}: tomatoes need sun",
                                                        speaker="ben")])
            done.set()

        async def read(which: int) -> int:
            calls = 0
            while not done.is_set():
                try:
                    if which % 2:
                        await reader.context(pid, "what do tomatoes need?")
                    else:
                        await reader.recall(pid, "tomatoes", k=5)
                except Exception as exc:  # any failure is the defect: count it, go on
                    failures.append(repr(exc))
                calls += 1
            return calls

        results = await asyncio.gather(write(), *(read(i) for i in range(4)))
        return sum(results[1:]), failures


def test_readers_see_a_consistent_memory_while_it_grows(data_stack):  # noqa: F811
    client = data_stack["client"]
    pid = client.spawn("busy-memory").pid
    reads, failures = asyncio.run(_remember_while_reading(data_stack["state"] / "vfmd.sock",
                                                          pid))
    assert reads >= WRITES
    assert failures == []
    hits = client.recall(pid, "tomatoes need sun", k=SEED)
    assert len(hits) == SEED and max(h.entry.seq for h in hits) == SEED + WRITES - 1
