"""Fairness bench: tenant A floods with 8 processes, tenant B has 1; shares of decode tokens,
weighted shares, and an interactive process's time to first token; fair policy vs fifo.

Both tenants are backlogged: A keeps 16 asks in flight, B's one process keeps 8, and the
model has 8 slots, so each tenant always has asks queued beyond its share of the slots (with
only 4 in flight, B held at most its equal share, 4 slots, and every gap between two of its
asks was share lost for good: that, not the scheduler, is why B measured 0.44 and, in the
short --quick phases, 0.36). An interactive priority-39 process of B asks a short question
every half second. Its questions vary (a fixed list, asked in the same order unloaded and
loaded): the same question every time would ride on a whole-prompt prefix-cache hit and
flatter both figures. A second table shows where its time to first token went (p50/p95):
the kernel's slot wait, waiting for the running decode step, other arrivals' prefills,
its own prefill (from vfm-modeld --ttft-trace), and the rest (kernel, RPCs)."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from bench.common import (cleanup, free_port, percentile, report, spawn_daemon, stop, temp_state_dir,
                          wait_until)
from bench.stackutil import model_service_serving
from libvfm import AskResult, AsyncClient, Client, VfmError

PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."
# An interactive user asks something new each time: the same short question every time
# would ride on a whole-prompt prefix-cache hit, unloaded and loaded alike.
QUESTIONS = ["Say hello.", "What is two plus two?", "Name a colour.", "Spell 'cat'.",
             "Is water wet?", "Give me a number.", "Name a fruit.", "What day follows Monday?",
             "Say yes or no.", "Name an animal.", "What is the capital of France?",
             "Count to three."]
_asked = itertools.count()
B_IN_FLIGHT = 8  # the model's slots: twice B's equal share, as A's 16 are twice its


def question(n: int) -> str:
    """The n-th question, tagged with a number no other ask of this run has: the loaded
    phase asks what the unloaded one did, so untagged it would hit the prefix cache."""
    return f"(#{next(_asked):04d}) {QUESTIONS[n % len(QUESTIONS)]}"


@dataclass
class Record:
    """Tokens each tenant received, stamped with the time each piece arrived, so the share
    in a window counts what was streamed inside it (spreading an ask's tokens over its whole
    life, queueing included, leaked tokens across the window's edges: a flood tenant's asks
    live four times as long as they decode)."""

    pieces: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    ttft_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)  # of the interactive asks, in the kernel
    window: tuple[float, float] = (0.0, 0.0)

    def add(self, tenant: str, stamps: list[float], tokens: int) -> None:
        """One answer: its pieces' arrival times and its token count (from its usage)."""
        if stamps:
            each = tokens / len(stamps)  # a piece is one token, unless the stream merged some
            self.pieces.setdefault(tenant, []).extend((t, each) for t in stamps)

    def tokens_in(self, tenant: str, start: float, end: float) -> float:
        return sum(n for t, n in self.pieces.get(tenant, []) if start <= t < end)


async def _loop(client: AsyncClient, pid: int, tenant: str, until: float, tokens: int,
                rec: Record) -> None:
    while time.monotonic() < until:
        stamps = []
        try:
            async for item in client.ask_stream(pid, PROMPT, max_new_tokens=tokens):
                if isinstance(item, AskResult):
                    rec.add(tenant, stamps, item.usage.tokens_out)
                else:
                    stamps.append(time.monotonic())
        except VfmError:
            await asyncio.sleep(0.05)


async def _interactive(client: AsyncClient, pid: int, until: float, rec: Record,
                       every_s: float = 0.5) -> None:
    await asyncio.sleep(every_s)
    n = 0
    while time.monotonic() < until - every_s:
        result = await client.ask(pid, question(n), max_new_tokens=4)
        rec.ttft_ms.append(result.usage.ttft_ms)
        rec.queue_ms.append(result.usage.queue_ms)
        n += 1
        await asyncio.sleep(every_s)


async def _phase(target: str, tokens: dict[str, str], seconds: float, new_tokens: int,
                 with_interactive: bool) -> Record:
    """A floods: 8 processes with 2 asks each in flight; B: 1 process with B_IN_FLIGHT.
    Both stay backlogged: each has more asks in flight than its share of the slots."""
    rec = Record()
    a = [AsyncClient(target=target, token=tokens["tenant-a"]) for _ in range(16)]
    b = [AsyncClient(target=target, token=tokens["tenant-b"]) for _ in range(B_IN_FLIGHT)]
    a_pids = [(await c.spawn(f"a{i}")).pid for i, c in enumerate(a[:8])] * 2
    b_pid = (await b[0].spawn("b0")).pid
    until = time.monotonic() + seconds
    jobs = [_loop(c, pid, "tenant-a", until, new_tokens, rec) for c, pid in zip(a, a_pids)]
    jobs += [_loop(c, b_pid, "tenant-b", until, new_tokens, rec) for c in b]
    clients = [*a, *b]
    if with_interactive:
        inter = AsyncClient(target=target, token=tokens["tenant-b"])
        clients.append(inter)
        ipid = (await inter.spawn("interactive", priority=39)).pid
        jobs.append(_interactive(inter, ipid, until, rec))
    await asyncio.gather(*jobs)
    for c in clients:
        await c.close()
    rec.window = (until - seconds + seconds * 0.25, until - new_tokens / 20)  # skip ramp-up/down
    return rec


async def _unloaded(target: str, token: str, n: int, rec: Record) -> None:
    client = AsyncClient(target=target, token=token)
    pid = (await client.spawn("solo", priority=39)).pid
    await client.ask(pid, "Hi.", max_new_tokens=2)  # warm-up
    for i in range(n):
        usage = (await client.ask(pid, question(i), max_new_tokens=4)).usage
        rec.ttft_ms.append(usage.ttft_ms)
        rec.queue_ms.append(usage.queue_ms)
    await client.close()


class Trace:
    """vfm-modeld's --ttft-trace file, read phase by phase: the interactive asks' lines."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0

    def skip(self) -> None:
        self._offset = self.path.stat().st_size if self.path.exists() else 0

    def interactive(self) -> list[dict]:
        """First segments of priority-39 asks written since the last call, in order."""
        with open(self.path) as f:
            f.seek(self._offset)
            text = f.read()
            self._offset = f.tell()
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [t for t in lines if t["priority"] == 39 and not t["resumed"]]


def breakdown(rec: Record, traced: list[dict]) -> dict[str, list[float]]:
    """Components of each interactive ask's time to first token, in ms."""
    parts = {"ttft": rec.ttft_ms, "kernel_slot": rec.queue_ms,
             "step_wait": [t["step_ms"] for t in traced],
             "others_prefill": [t["others_prefill_ms"] for t in traced],
             "own_prefill": [t["prefill_ms"] for t in traced],
             "interleaved": [100.0 * t["interleaved"] for t in traced]}
    if len(traced) == len(rec.ttft_ms):  # matched one to one: the rest is kernel and RPCs
        parts["kernel_rpc"] = [ttft - slot - t["engine_ms"]
                               for ttft, slot, t in zip(rec.ttft_ms, rec.queue_ms, traced)]
    return parts


def _shares(rec: Record) -> dict[str, float]:
    start, end = rec.window
    got = {t: rec.tokens_in(t, start, end) for t in ("tenant-a", "tenant-b")}
    total = sum(got.values()) or 1.0
    return {t: v / total for t, v in got.items()}


def _jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else 0.0


async def _measure(target: str, tokens: dict[str, str], state: Path, seconds: float,
                   new_tokens: int, trace: Trace) -> tuple[Record, Record, Record, dict]:
    """Unloaded asks, the equal-weight phase, then the 3:1 phase; one event loop for all."""
    unloaded = Record()
    trace.skip()
    await _unloaded(target, tokens["tenant-b"], len(QUESTIONS), unloaded)
    traced = {"unloaded": trace.interactive()[1:]}  # less the warm-up
    equal = await _phase(target, tokens, seconds, new_tokens, with_interactive=True)
    traced["loaded"] = trace.interactive()
    admin = AsyncClient(state / "vfmd.sock")
    await admin.set_tenant_weight("tenant-a", 3.0)
    await admin.close()
    weighted = await _phase(target, tokens, seconds, new_tokens, with_interactive=False)
    return unloaded, equal, weighted, traced


def run_policy(policy: str, seconds: float, new_tokens: int, state, port: int, modeld_ready,
               trace: Trace) -> dict:
    kernel = spawn_daemon(["-m", "kernel.main", "--state-dir", str(state), "--listen",
                           f"127.0.0.1:{port}", "--policy", policy, "--log-level", "WARNING"],
                          state / f"vfmd-{policy}.log")
    try:
        wait_until(modeld_ready, 120, "vfm-modeld to register")
        with Client(state / "vfmd.sock") as admin:
            tokens = {t: admin.token_create(t)[0] for t in ("tenant-a", "tenant-b")}
            for t in tokens:
                admin.set_tenant_weight(t, 1.0)
        unloaded, equal, weighted, traced = uvloop.run(
            _measure(f"127.0.0.1:{port}", tokens, state, seconds, new_tokens, trace))
    finally:
        stop(kernel)
    eq, wt = _shares(equal), _shares(weighted)
    return {
        "share_b": eq["tenant-b"], "jain": _jain([eq["tenant-a"], eq["tenant-b"]]),
        "weighted_share_a": wt["tenant-a"],
        "weighted_error": max(abs(wt["tenant-a"] - 0.75), abs(wt["tenant-b"] - 0.25)) * 100,
        "ttft_p95_loaded_ms": percentile(equal.ttft_ms, 95),
        "ttft_p50_loaded_ms": percentile(equal.ttft_ms, 50),
        "queue_p95_loaded_ms": percentile(equal.queue_ms, 95),
        "ttft_p95_unloaded_ms": percentile(unloaded.ttft_ms, 95),
        "ttft_p95_ratio": (percentile(equal.ttft_ms, 95)
                           / max(percentile(unloaded.ttft_ms, 95), 1e-9)),
        "interactive_asks": len(equal.ttft_ms),
        "breakdown": {"unloaded": breakdown(unloaded, traced["unloaded"]),
                      "loaded": breakdown(equal, traced["loaded"])},
    }


def print_breakdown(results: dict[str, dict]) -> None:
    """Where the interactive ask's time to first token went, p50/p95 per phase, in ms."""
    columns = [(policy, phase) for policy in results for phase in ("unloaded", "loaded")]
    names = list(results["fair"]["breakdown"]["loaded"])
    header = ("ms (p50/p95)", *(f"{policy} {phase}" for policy, phase in columns))
    rows = []
    for name in names:
        cells = []
        for policy, phase in columns:
            values = results[policy]["breakdown"][phase].get(name, [])
            cells.append(f"{percentile(values, 50):.1f}/{percentile(values, 95):.1f}"
                         if values else "-")
        rows.append((name if name != "interleaved" else "interleaved (%)", *cells))
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    print("interactive time to first token, where it went")
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench fairness", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter phases")
    parser.add_argument("--seconds", type=float, default=0.0, help="length of each phase")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per ask")
    args = parser.parse_args(argv)
    seconds = args.seconds or (12.0 if args.quick else 30.0)
    state = temp_state_dir()
    port = free_port()
    trace = Trace(state / "ttft.jsonl")
    modeld = spawn_daemon(["-m", "services.model.main", "--state-dir", str(state),
                           "--kernel-socket", str(state / "vfmd.sock"),
                           "--ttft-trace", str(trace.path)], state / "modeld.log")

    def modeld_ready() -> bool:
        return model_service_serving(state / "vfmd.sock")

    try:
        results = {p: run_policy(p, seconds, args.tokens, state, port, modeld_ready, trace)
                   for p in ("fair", "fifo")}
    finally:
        stop(modeld)
        cleanup(state)
    print_breakdown(results)
    ours, base = results["fair"], results["fifo"]
    rows = [(k, f"{ours[k]:.3f}", f"{base[k]:.3f}") for k in
            ("share_b", "jain", "weighted_share_a", "weighted_error", "ttft_p95_unloaded_ms",
             "ttft_p50_loaded_ms", "ttft_p95_loaded_ms", "queue_p95_loaded_ms",
             "ttft_p95_ratio", "interactive_asks")]
    figures = {k: round(ours[k], 3) for k in ("jain", "share_b", "weighted_error",
                                              "ttft_p95_ratio")}
    figures.update({f"fifo_{k}": round(base[k], 3) for k in ("jain", "share_b", "weighted_error",
                                                              "ttft_p95_ratio")})
    report(f"fairness: A has 8 processes (16 asks in flight), B has 1 ({B_IN_FLIGHT} in flight); "
           f"{seconds:.0f}s phases, "
           f"{args.tokens} tokens per ask", rows, ("figure", "fair", "fifo"), figures)
    return 0
