"""Noisy neighbour bench: tenant A ingests a large file and remembers in bulk while tenant B
recalls and asks; B's recall p95 and Ask time-to-first-token p95 against B alone, same run.

One stack (vfmd + vfm-modeld + vfm-datad, the real MiniLM and SmolLM2), two tenants with
bearer tokens. Phase 1: B alone, a recall then a short Ask (8 tokens), one after the other,
each on a question it has not asked before (a repeated prompt would ride on the prefix
cache). Phase 2: the same while A streams a large document into a collection and keeps a
bulk Remember of 200 entries in flight. A's ingest is then abandoned (its call cancelled),
which vfm-datad must notice. Goal: both ratios <= 2."""

from __future__ import annotations

import argparse
import asyncio
import time

import uvloop

from bench.common import percentile, report, wait_until
from bench.stackutil import DaemonStack
from libvfm import AskResult, AsyncClient, Client, VfmError
from libvfm.types import MemoryEntry

TOPICS = ["the garden", "the boat", "the library", "the bakery", "the mountain", "the river",
          "the market", "the school", "the station", "the museum"]


def _document(paragraphs: int) -> bytes:
    return "\n\n".join(f"Section {i}. " + " ".join(
        f"item{(i * 37 + j) % 1009} was stored in warehouse {j % 17} on shelf {j}"
        for j in range(20)) for i in range(paragraphs)).encode()


def _turns(first: int, n: int) -> list[MemoryEntry]:
    return [MemoryEntry(f"Turn {first + i}: we talked about {TOPICS[(first + i) % 10]} and "
                        f"the plan for day {first + i}.", speaker="user") for i in range(n)]


async def _b_round(b: AsyncClient, pid: int, n: int, tag: str) -> tuple[float, float]:
    """One recall and one 8-token Ask of B; their latencies in ms (Ask: first text)."""
    topic = TOPICS[n % len(TOPICS)]
    start = time.perf_counter()
    await b.recall(pid, f"what did we say about {topic}? ({tag}{n})", k=8)
    recall_ms = (time.perf_counter() - start) * 1e3
    start, first = time.perf_counter(), None
    async for item in b.ask_stream(pid, f"({tag}{n}) In one word, what is {topic} for?",
                                   max_new_tokens=8):
        if first is None and not isinstance(item, AskResult) and item:
            first = time.perf_counter()
    return recall_ms, ((first or time.perf_counter()) - start) * 1e3


async def _b_phase(b: AsyncClient, pid: int, rounds: int, tag: str) -> tuple[list, list]:
    recalls, ttfts = [], []
    for n in range(rounds):
        r, t = await _b_round(b, pid, n, tag)
        recalls.append(r)
        ttfts.append(t)
    return recalls, ttfts


async def _a_load(a: AsyncClient, pid: int, data: bytes, stop_event: asyncio.Event,
                  counts: dict) -> None:
    async def remember_loop():
        n = 0
        while not stop_event.is_set():
            await a.remember(pid, _turns(n, 200))
            n += 200
            counts["remembered"] = n

    async def ingest():
        await a.ingest("bulk", "big.txt", data)
        counts["ingest_finished"] = True

    tasks = [asyncio.create_task(remember_loop()), asyncio.create_task(ingest())]
    await stop_event.wait()
    for task in tasks:
        task.cancel()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, VfmError):  # A's load failing would flatter B's figures
            counts.setdefault("errors", []).append(outcome.message)


async def _measure(target: str, tokens: dict[str, str], rounds: int, data: bytes) -> dict:
    a = AsyncClient(target=target, token=tokens["tenant-a"], timeout=600)
    b = AsyncClient(target=target, token=tokens["tenant-b"], timeout=600)
    try:
        a_pid = (await a.spawn("bulk-writer")).pid
        b_pid = (await b.spawn("assistant", priority=30)).pid
        await a.collection_create("bulk")
        await b.remember(b_pid, _turns(0, 40))
        await _b_round(b, b_pid, 0, "warm")  # loads the index, the model, the caches
        alone = await _b_phase(b, b_pid, rounds, "alone")
        stop_event, counts = asyncio.Event(), {"remembered": 0, "ingest_finished": False}
        load = asyncio.create_task(_a_load(a, a_pid, data, stop_event, counts))
        await asyncio.sleep(5)  # the upload is over and A's work under way
        started = time.perf_counter()
        loaded = await _b_phase(b, b_pid, rounds, "loaded")
        seconds = time.perf_counter() - started
        stop_event.set()
        await load
        return {"alone": alone, "loaded": loaded, "a": counts, "loaded_s": seconds}
    finally:
        await a.close()
        await b.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench noisy_neighbour", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, a smaller file")
    parser.add_argument("--rounds", type=int, default=0, help="B's rounds per phase "
                        "(default 20, quick 8)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (8 if args.quick else 20)
    data = _document(3000 if args.quick else 20000)  # ~1 MB / ~7 MB: longer than the phase
    stack = DaemonStack({"vfm-modeld": ["services.model.main"],
                         "vfm-datad": ["services.data.main", "--summary-pages", "0"]},
                        kernel_args=("--log-level", "WARNING"), ready_timeout_s=600)
    try:
        with Client(stack.sock) as admin:
            tokens = {t: admin.token_create(t)[0] for t in ("tenant-a", "tenant-b")}
        got = uvloop.run(_measure(stack.tcp, tokens, rounds, data))
        try:
            wait_until(lambda: "ingest of tenant tenant-a stopped" in
                       (stack.state / "vfm-datad.log").read_text(), 60,
                       "the abandoned ingest to stop")
            abandoned = True
        except RuntimeError:
            abandoned = False
    finally:
        stack.close()
    (r_alone, t_alone), (r_loaded, t_loaded) = got["alone"], got["loaded"]
    p = {name: (percentile(v, 50), percentile(v, 95)) for name, v in
         (("recall alone", r_alone), ("recall loaded", r_loaded), ("ttft alone", t_alone),
          ("ttft loaded", t_loaded))}
    figures = {"recall_p95_ratio": round(p["recall loaded"][1] / p["recall alone"][1], 2),
               "ttft_p95_ratio": round(p["ttft loaded"][1] / p["ttft alone"][1], 2),
               "recall_p95_alone_ms": round(p["recall alone"][1], 1),
               "recall_p95_loaded_ms": round(p["recall loaded"][1], 1),
               "ttft_p95_alone_ms": round(p["ttft alone"][1], 1),
               "ttft_p95_loaded_ms": round(p["ttft loaded"][1], 1),
               "a_remembered_during_load": got["a"]["remembered"],
               "a_ingest_finished": got["a"]["ingest_finished"],
               "a_errors": got["a"].get("errors", []),
               "a_abandoned_ingest_stopped": abandoned, "rounds": rounds,
               "document_mb": round(len(data) / 1e6, 2)}
    figures["goals_met"] = figures["recall_p95_ratio"] <= 2 and figures["ttft_p95_ratio"] <= 2
    rows = [(name, f"{p50:.1f}", f"{p95:.1f}") for name, (p50, p95) in p.items()]
    report(f"noisy neighbour: B's recall and 8-token Ask, alone vs while A ingests "
           f"{figures['document_mb']} MB and remembers 200 entries at a time; {rounds} rounds "
           "per phase; goal: p95 ratios <= 2", rows, ("B's call", "p50 ms", "p95 ms"), figures)
    return 0
