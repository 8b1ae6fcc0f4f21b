"""vfm-datad under real concurrency: readers during writes, malformed and abandoned ingests."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from libvfm import AsyncClient
from libvfm.types import MemoryEntry
from tests.conftest import wait_for
from tests.integration.test_data_service import data_stack  # noqa: F401 (the fixture)
from vfmos.kernel.v1 import kernel_pb2 as kpb
from vfmos_runtime.credentials import fetch_ticket
from vfmos_runtime.protocol import TICKET_HEADER

SEED = 1200  # about a thousand entries, as in the report (and room for recall k=1000)
WRITES = 80   # each write swaps the index while four readers rank it (~0.25 s a write here)


async def _remember_while_reading(socket, pid: int) -> tuple[int, list[str]]:
    """Remember one entry at a time while four readers loop on Context and Recall, as an app
    logging turns while its user asks does; returns (reads, failures)."""
    failures: list[str] = []
    # Seeding is bulk (niced) embedding: a minute on a busy machine.
    async with AsyncClient(socket, timeout=600) as writer, \
            AsyncClient(socket, timeout=60) as reader:
        # Ranking a thousand entries takes long enough to overlap the writes.
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
    # every write landed, in order: the next entry's sequence number comes right after them
    first, count = client.remember(pid, [MemoryEntry(text="the last word")])
    assert (first, count) == (SEED + WRITES, 1)
    assert len(client.recall(pid, "tomatoes need sun", k=1000)) == 1000


def _raw_ingest(socket, frames: list[bytes], timeout: float = 20.0) -> grpc.RpcError:
    """An Ingest stream of raw frames, as a client in any language might send them."""
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        call = channel.stream_unary("/vfmos.kernel.v1.KernelService/Ingest",
                                    request_serializer=lambda frame: frame,
                                    response_deserializer=lambda raw: raw)
        with pytest.raises(grpc.RpcError) as failed:
            call(iter(frames), timeout=timeout,
                 metadata=((TICKET_HEADER, fetch_ticket(Path(socket))),))
        return failed.value


@pytest.mark.parametrize("frames", [
    [b"\xff\xff\xff\xff garbage"],                         # not a message at all
    [b"\xff\xff\xff\xff garbage", b"\x32\x03abc"],         # ... and a data part after it
    [kpb.IngestRequest(data=b"no header").SerializeToString()],  # no collection or source
    [kpb.IngestRequest(collection="c", data=b"x").SerializeToString()],  # no source
    [],                                                    # nothing at all
], ids=["garbage", "garbage-then-data", "no-header", "no-source", "empty"])
def test_a_malformed_ingest_stream_is_refused_at_once(data_stack, frames):  # noqa: F811
    started = time.monotonic()
    error = _raw_ingest(data_stack["state"] / "vfmd.sock", frames)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "Traceback" not in error.details()
    assert time.monotonic() - started < 15  # an answer, not the client's deadline


def _essay(paragraphs: int) -> bytes:
    return "\n\n".join(f"Paragraph {i} on orchards. " + " ".join(
        f"word{(i * 31 + j) % 997} grows near the river bend" for j in range(30))
        for i in range(paragraphs)).encode()


async def _abandon_ingest(socket, data: bytes) -> None:
    """Start an ingest, wait until the upload is over and the work under way, give up."""
    async with AsyncClient(socket, timeout=600) as client:
        sent = asyncio.Event()
        total = [0]

        def progress(n: int) -> None:
            total[0] += n
            if total[0] >= len(data):
                sent.set()

        task = asyncio.create_task(client.ingest("orchard", "big.txt", data, progress=progress))
        await asyncio.wait_for(sent.wait(), 60)
        await asyncio.sleep(2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_an_abandoned_ingest_stops_its_work(data_stack):  # noqa: F811
    client, datad = data_stack["client"], data_stack["datad"]
    client.collection_create("orchard")
    data = _essay(400)  # ~400 chunks: a minute or more of embedding here
    asyncio.run(_abandon_ingest(data_stack["state"] / "vfmd.sock", data))
    wait_for(lambda: "ingest of tenant" in datad.log() and "stopped: its caller went away"
             in datad.log(), 60, "vfm-datad to stop the abandoned ingest", log=datad.log)
    # Stopped, not finished: nothing of the document was stored.
    assert not [c for c in client.collections() if c.name == "orchard" and c.chunks]


def test_ingest_progress_covers_the_embedding(data_stack):  # noqa: F811
    client = data_stack["client"]
    client.collection_create("progress")
    heard: list[tuple[int, int]] = []
    result = client.ingest("progress", "essay.txt", _essay(40),
                           embedded=lambda done, total: heard.append((done, total)))
    assert result.chunks > 8
    totals = {total for _, total in heard}
    assert totals == {result.chunks}  # known once parsed, then the same on every message
    done = [d for d, _ in heard]
    assert done == sorted(done) and len(done) >= result.chunks // 8  # one per batch of 8
    assert client.search("progress", "orchards river bend")
