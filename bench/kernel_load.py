"""Kernel load bench: many FM processes streaming through vfmd at once from a fake-fast model
service, against the same clients reading that service directly, while other clients time
`Get`/`List`.

Setup: a real vfmd on a temp state dir and `bench.fake_modeld` in its own process, registered
with it as `vfm-modeld`. The fake has no model: each generation is one chunk per token
(tokens=1, a short word, its token id, prompt_tokens on every chunk, as the real vfm-modeld
does), then a done chunk, never joined. Read directly (`Generate`) that is one message per
token; the kernel reads `GenerateMany`, where like a batched engine the fake sends one
message per decode step holding one token of every running generation. `ListModels` says
max_batch 64, so all asks run at once. With no model cost, what is measured is the relay:
vfmd's work per streamed token (its `--stream-interval` is left at the default).

Windows, each with its own fresh client processes, all warm before the window opens:
  * unloaded (`--duration`/2 at the start and again at the end): the `--readers` clients
    alone call Get on a random FM process (List every 4th call), pausing
    `--reader-pause-ms` between calls;
  * direct (`--duration`): `--clients` clients, in `--procs` processes apart from the fake
    and the readers, stream `Generate` from the fake directly with grpc.aio: the ceiling.
    The readers run as above (vfmd idle, the machine as busy);
  * kernel (`--duration`): the same clients, each with its own FM process (priority 20, no
    quotas), Ask through libvfm (`AsyncClient.ask_stream`, stateless: no working set, so no
    vfm-datad is needed); the readers run as above.
Direct and kernel windows alternate ABBA over `--rounds` pairs, so other users' load on a
shared machine falls on both alike. Every client asks for `--tokens` tokens again and again
until its window closes; an answer cut at the close counts the tokens it had streamed (with
2048-token answers most are cut). Tokens of completed answers come from their usage (kernel:
`usage.tokens_out`, direct: `completion_tokens`), checked against the pieces received.
By default every process shares every CPU, as the issue's goals were set. `--pin` gives
vfmd and the readers CPU 0 and the load generators (the fake and the streaming clients) the
others, so a Get's latency is the kernel's event loop and not the OS scheduler on saturated
cores (in a deployment the engine runs on its accelerator and the clients elsewhere). Pinned,
the ratio stops being a ceiling: one CPU's worth of clients reading one message per token
(direct) is slower than the same clients reading the kernel's joined pieces.
Daemon CPU is psutil user+system of the process over the window; `kernel_ms_per_token` is
vfmd's (reader calls included; `..._asks_only` takes off their cost measured unloaded).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import queue
import random
import time
from pathlib import Path

import grpc
import psutil
import uvloop

from bench.fake_modeld import tokens_in_text
from bench.common import (cleanup, percentile, report, spawn_daemon, stop, temp_state_dir,
                          wait_until)
from bench.stackutil import model_service_serving, story_prompts
from bench.syscall import _kernel_pings
from libvfm import AsyncClient, Client, VfmError
from vfmos_runtime.protocol import MAX_MESSAGE_BYTES
from libvfm.types import AskResult
from vfmos.model.v1 import model_pb2, model_pb2_grpc

GOALS = {"ratio_vs_direct": (">=", 0.5), "kernel_ms_per_token": ("<=", 0.07),
         "get_p99_ratio": ("<=", 3.0)}
LIST_EVERY = 4       # a reader's every 4th call is List, the others Get
READY_TIMEOUT_S = 120
STEADY_AFTER_S = 1.0  # Gets from this far into a window on miss the asks' start (diagnostic)
# The same channel options libvfm uses, so both paths read alike.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


async def _wait_start(ctrl) -> tuple[float, float]:
    """Block (off the loop) until the coordinator sends the window (monotonic start, end)."""
    start, end = await asyncio.get_running_loop().run_in_executor(
        None, lambda: ctrl.get(timeout=READY_TIMEOUT_S))
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    return start, end


class _Tally:
    def __init__(self):
        self.completed_tokens = 0   # from usage of answers that finished in the window
        self.cut_tokens = 0         # tokens of answers cut at the window's end (from their text)
        self.asks = 0
        self.mismatches = 0         # completed answers whose usage differs from their text
        self.errors = 0
        self.first_error = ""

    def as_dict(self) -> dict:
        return dict(vars(self))


async def _ask_kernel(client: AsyncClient, pid: int, prompt: str, tokens: int, end: float,
                      tally: _Tally) -> None:
    while time.monotonic() < end:
        chars = 0  # a piece may be several tokens joined (the kernel coalesces for slow readers)
        try:
            async for item in client.ask_stream(pid, prompt, max_new_tokens=tokens,
                                                stateless=True):
                if isinstance(item, AskResult):
                    tally.completed_tokens += item.usage.tokens_out
                    tally.asks += 1
                    tally.mismatches += item.usage.tokens_out != tokens_in_text(chars)
                    chars = 0
                else:
                    chars += len(item)
        except asyncio.CancelledError:
            tally.cut_tokens += tokens_in_text(chars)
            raise
        except VfmError as err:
            tally.errors += 1
            tally.first_error = tally.first_error or f"{type(err).__name__}: {err.message}"
            await asyncio.sleep(0.05)


async def _ask_direct(stub: model_pb2_grpc.ModelServiceStub, prompt: str, tokens: int, end: float,
                      tally: _Tally) -> None:
    request = model_pb2.GenerateRequest(
        messages=[model_pb2.ChatMessage(role=model_pb2.ROLE_USER, content=prompt)],
        max_new_tokens=tokens)
    while time.monotonic() < end:
        pieces = 0
        call = stub.Generate(request)
        try:
            async for chunk in call:
                if chunk.done:
                    tally.completed_tokens += chunk.completion_tokens
                    tally.asks += 1
                    tally.mismatches += chunk.completion_tokens != pieces
                    pieces = 0
                    break
                pieces += chunk.tokens
        except asyncio.CancelledError:
            tally.cut_tokens += pieces
            raise
        except grpc.RpcError as err:
            tally.errors += 1
            tally.first_error = tally.first_error or f"{err.code()}: {err.details()}"
            await asyncio.sleep(0.05)
        finally:
            call.cancel()


async def _askers(mode: str, target: str, pids: list[int], tokens: int, ctrl, out) -> None:
    prompts = story_prompts(len(pids))
    tally = _Tally()
    if mode == "kernel":
        clients = [AsyncClient(target, timeout=60) for _ in pids]
        await asyncio.gather(*(c.ask(pid, "Warm up.", max_new_tokens=4, stateless=True)
                               for c, pid in zip(clients, pids)))
        closers = [c.close for c in clients]
    else:
        channels = [grpc.aio.insecure_channel(f"unix:{target}", options=CHANNEL_OPTIONS)
                    for _ in pids]
        stubs = [model_pb2_grpc.ModelServiceStub(ch) for ch in channels]
        for stub in stubs:  # one short warm-up stream each
            async for _ in stub.Generate(model_pb2.GenerateRequest(max_new_tokens=4)):
                pass
        closers = [ch.close for ch in channels]
    out.put(("ready", os.getpid()))
    start, end = await _wait_start(ctrl)
    me = psutil.Process()
    cpu0 = _cpu_s(me)
    if mode == "kernel":
        tasks = [asyncio.create_task(_ask_kernel(c, pid, p, tokens, end, tally))
                 for c, pid, p in zip(clients, pids, prompts)]
    else:
        tasks = [asyncio.create_task(_ask_direct(s, p, tokens, end, tally))
                 for s, p in zip(stubs, prompts)]
    await asyncio.sleep(max(0.0, end - time.monotonic()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    cpu = _cpu_s(me) - cpu0
    out.put(("done", {"kind": "askers", "cpu_s": cpu, **tally.as_dict()}))
    for close in closers:
        await close()


async def _readers(target: str, pids: list[int], readers: int, pause_s: float, ctrl, out) -> None:
    clients = [AsyncClient(target, timeout=60) for _ in range(readers)]
    for client in clients:
        await client.get(pids[0])
        await client.ps()
    out.put(("ready", os.getpid()))
    begin, end = await _wait_start(ctrl)
    gets: list[tuple[float, float]] = []  # (seconds into the window, latency ms)
    lists: list[float] = []
    errors = [0]

    async def reader(client: AsyncClient, seed: int) -> None:
        rng, n = random.Random(seed), 0
        while time.monotonic() < end:
            n += 1
            start = time.perf_counter()
            try:
                if n % LIST_EVERY == 0:
                    await client.ps()
                    lists.append((time.perf_counter() - start) * 1000)
                else:
                    at = time.monotonic() - begin
                    await client.get(rng.choice(pids))
                    gets.append((at, (time.perf_counter() - start) * 1000))
            except VfmError:
                errors[0] += 1
            await asyncio.sleep(pause_s)

    await asyncio.gather(*(reader(c, i) for i, c in enumerate(clients)))
    out.put(("done", {"kind": "readers", "gets": gets, "lists": lists, "errors": errors[0]}))
    for client in clients:
        await client.close()


def _asker_process(mode, target, pids, tokens, cpus, ctrl, out) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    uvloop.run(_askers(mode, target, pids, tokens, ctrl, out))


def _reader_process(target, pids, readers, pause_s, cpus, ctrl, out) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    uvloop.run(_readers(target, pids, readers, pause_s, ctrl, out))


def _phase(name: str, kernel: psutil.Process, fake: psutil.Process, socket: Path,
           fake_socket: Path, pids: list[int], args, askers: str | None,
           seconds: float) -> dict:
    """One load window: start the client processes, wait until all are warm, open the window
    for all of them at once, sample daemon CPU over it, collect what the clients counted."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    workers: list[tuple[mp.Process, object]] = []

    def start(target, *wargs) -> None:
        ctrl = ctx.Queue()
        proc = ctx.Process(target=target, args=(*wargs, ctrl, out), daemon=True)
        proc.start()
        workers.append((proc, ctrl))

    try:
        start(_reader_process, str(socket), pids, args.readers, args.reader_pause_ms / 1000,
              args.kernel_cpus)
        if askers:
            target = str(socket) if askers == "kernel" else str(fake_socket)
            for i in range(args.procs):
                share = pids[i::args.procs]
                if share:
                    start(_asker_process, askers, target, share, args.tokens, args.load_cpus)
        ready, deadline = 0, time.monotonic() + READY_TIMEOUT_S
        while ready < len(workers):
            try:
                ready += out.get(timeout=1.0)[0] == "ready"
            except queue.Empty:
                dead = [p.exitcode for p, _ in workers if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} phase: a client process did not get ready "
                                       f"(exit codes {dead})") from None
        begin = time.monotonic() + 0.3
        end = begin + seconds
        for _, ctrl in workers:
            ctrl.put((begin, end))
        time.sleep(max(0.0, begin - time.monotonic()))
        k0, f0 = _cpu_s(kernel), _cpu_s(fake)
        time.sleep(max(0.0, end - time.monotonic()))
        k1, f1 = _cpu_s(kernel), _cpu_s(fake)
        results = [out.get(timeout=60)[1] for _ in workers]
        for proc, _ in workers:
            proc.join(30)
    finally:
        for proc, _ in workers:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    readers = next(r for r in results if r["kind"] == "readers")
    asks = [r for r in results if r["kind"] == "askers"]
    tokens = sum(r["completed_tokens"] + r["cut_tokens"] for r in asks)
    return {"name": name, "seconds": end - begin, "kernel_cpu_s": k1 - k0, "fake_cpu_s": f1 - f0,
            "client_cpu_s": sum(r["cpu_s"] for r in asks), "tokens": tokens,
            "asks": sum(r["asks"] for r in asks), "mismatches": sum(r["mismatches"] for r in asks),
            "errors": sum(r["errors"] for r in asks) + readers["errors"],
            "first_error": next((r["first_error"] for r in asks if r["first_error"]), ""),
            "gets": [ms for _, ms in readers["gets"]],
            "gets_steady": [ms for at, ms in readers["gets"] if at >= STEADY_AFTER_S],
            "lists": readers["lists"]}


def _schedule(duration: float, rounds: int) -> list[tuple[str, float]]:
    """Unloaded at both ends, direct and kernel in ABBA order between, so drift on a shared
    machine (other users' load comes and goes) falls on both paths alike."""
    middle: list[str] = []
    for r in range(rounds):
        middle += ["direct", "kernel"] if r % 2 == 0 else ["kernel", "direct"]
    return ([("unloaded", duration / 2)] + [(name, duration) for name in middle]
            + [("unloaded", duration / 2)])


def _merge(a: dict, b: dict) -> dict:
    """Two windows of the same phase as one: sums, and the latencies pooled."""
    merged = dict(a)
    for key, value in b.items():
        if key in ("name", "first_error"):
            merged[key] = a[key] or value
        else:
            merged[key] = a[key] + value
    return merged


def _table(title: str, header: tuple, rows: list[tuple]) -> None:
    print(title)
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))


def _met(key: str, value: float) -> bool:
    op, goal = GOALS[key]
    return value >= goal if op == ">=" else value <= goal


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench kernel_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round of 3 s windows")
    parser.add_argument("--duration", type=float, default=0.0,
                        help="seconds of each direct or kernel window (default 10, quick 3); "
                             "the unloaded windows take half")
    parser.add_argument("--rounds", type=int, default=0,
                        help="direct+kernel window pairs, ABBA order (default 2, quick 1)")
    parser.add_argument("--clients", type=int, default=64,
                        help="streaming clients, one FM process each (default 64)")
    parser.add_argument("--readers", type=int, default=16,
                        help="clients timing Get/List (default 16)")
    parser.add_argument("--procs", type=int, default=2,
                        help="processes the streaming clients share (default 2)")
    parser.add_argument("--tokens", type=int, default=2048,
                        help="max_new_tokens of each ask (default 2048; at most 4096)")
    parser.add_argument("--pin", action="store_true",
                        help="vfmd and the readers on CPU 0, the fake and the streaming "
                        "clients on the others (needs 2+ CPUs; default: all share all)")
    parser.add_argument("--reader-pause-ms", type=float, default=20.0,
                        help="pause between one reader's calls (default 20)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.rounds = args.rounds or (1 if args.quick else 2)
    cpus = sorted(os.sched_getaffinity(0))
    args.kernel_cpus = {cpus[0]} if args.pin and len(cpus) >= 2 else set()
    args.load_cpus = set(cpus[1:]) if args.kernel_cpus else set()
    if not 1 <= args.tokens <= 4096:
        parser.error("--tokens must be 1..4096")
    if args.clients < 1 or args.readers < 1 or args.procs < 1:
        parser.error("--clients, --readers and --procs must be at least 1")

    state = temp_state_dir()
    socket, fake_socket = state / "vfmd.sock", state / "fake-modeld.sock"
    kernel = spawn_daemon(["-m", "kernel.main", "--state-dir", str(state), "--log-level",
                           "WARNING"], state / "vfmd.log")
    fake = None
    phases: dict[str, dict] = {}
    windows: list[dict] = []
    try:
        wait_until(lambda: _kernel_pings(socket), 30, "vfmd")
        fake = spawn_daemon(["-m", "bench.fake_modeld", "--socket", str(fake_socket),
                             "--kernel-socket", str(socket), "--max-batch", str(args.clients)],
                            state / "fake-modeld.log")
        wait_until(lambda: model_service_serving(socket), 30, "the fake vfm-modeld to serve")
        with Client(socket, timeout=30) as client:
            pids = [client.spawn(f"load-{i}").pid for i in range(args.clients)]
        kproc, fproc = psutil.Process(kernel.pid), psutil.Process(fake.pid)
        kproc.cpu_affinity(sorted(args.kernel_cpus) or kproc.cpu_affinity())
        fproc.cpu_affinity(sorted(args.load_cpus) or fproc.cpu_affinity())
        for name, seconds in _schedule(args.duration, args.rounds):
            ph = _phase(name, kproc, fproc, socket, fake_socket, pids, args,
                        None if name == "unloaded" else name, seconds)
            windows.append(ph)
            phases[name] = _merge(phases[name], ph) if name in phases else ph
    finally:
        if fake is not None:
            stop(fake)
        stop(kernel)
        cleanup(state)

    un, di, ke = phases["unloaded"], phases["direct"], phases["kernel"]
    tps = ke["tokens"] / ke["seconds"]
    direct_tps = di["tokens"] / di["seconds"]
    p = {name: {"get50": percentile(ph["gets"], 50), "get99": percentile(ph["gets"], 99),
                "list50": percentile(ph["lists"], 50), "list99": percentile(ph["lists"], 99)}
         for name, ph in phases.items()}
    # vfmd's CPU per reader call when idle, to show the Ask relay's own share under load.
    per_call_s = un["kernel_cpu_s"] / max(1, len(un["gets"]) + len(un["lists"]))
    reader_cpu_s = per_call_s * (len(ke["gets"]) + len(ke["lists"]))
    def per_token(cpu_s: float, ph: dict) -> float | None:
        return round(cpu_s * 1000 / ph["tokens"], 4) if ph["tokens"] else None

    asks_cpu_s = max(0.0, ke["kernel_cpu_s"] - reader_cpu_s)
    figures = {
        "tokens_per_s": round(tps), "direct_tokens_per_s": round(direct_tps),
        "ratio_vs_direct": round(tps / direct_tps, 3) if direct_tps else None,
        "kernel_ms_per_token": per_token(ke["kernel_cpu_s"], ke),
        "kernel_ms_per_token_asks_only": per_token(asks_cpu_s, ke),
        "kernel_cpu_pct": round(ke["kernel_cpu_s"] / ke["seconds"] * 100, 1),
        "fake_ms_per_token": per_token(ke["fake_cpu_s"], ke),
        "fake_ms_per_token_direct": per_token(di["fake_cpu_s"], di),
        "client_ms_per_token": per_token(ke["client_cpu_s"], ke),
        "client_ms_per_token_direct": per_token(di["client_cpu_s"], di),
        "get_p50_ms": round(p["kernel"]["get50"], 2), "get_p99_ms": round(p["kernel"]["get99"], 2),
        "get_p50_unloaded_ms": round(p["unloaded"]["get50"], 2),
        "get_p99_unloaded_ms": round(p["unloaded"]["get99"], 2),
        "get_p99_ratio": round(p["kernel"]["get99"] / p["unloaded"]["get99"], 2),
        "get_p99_steady_ms": round(percentile(ke["gets_steady"], 99), 2),
        "get_p99_direct_phase_ms": round(p["direct"]["get99"], 2),
        "list_p99_ms": round(p["kernel"]["list99"], 2),
        "list_p99_unloaded_ms": round(p["unloaded"]["list99"], 2),
        "asks_completed": ke["asks"], "direct_streams_completed": di["asks"],
        "usage_mismatches": ke["mismatches"] + di["mismatches"],
        "errors": sum(ph["errors"] for ph in phases.values()),
        "clients": args.clients, "readers": args.readers, "tokens_per_ask": args.tokens,
        "duration_s": args.duration, "rounds": args.rounds, "cpus": len(os.sched_getaffinity(0)),
    }
    pairs = [w for w in windows if w["name"] != "unloaded"]
    rates = {name: [w["tokens"] / w["seconds"] for w in pairs if w["name"] == name]
             for name in ("direct", "kernel")}
    figures["ratio_per_round"] = [round(k / d, 3) if d else None
                                  for k, d in zip(rates["kernel"], rates["direct"])]
    figures["goals_met"] = all(figures[k] is not None and _met(k, figures[k]) for k in GOALS)
    def row(label: str, ph: dict) -> tuple:
        gets, lists = ph["gets"], ph["lists"]
        return (label, f"{ph['tokens'] / ph['seconds']:.0f}",
                f"{ph['kernel_cpu_s'] / ph['seconds'] * 100:.0f}",
                f"{ph['fake_cpu_s'] / ph['seconds'] * 100:.0f}",
                f"{ph['client_cpu_s'] / ph['seconds'] * 100:.0f}",
                f"{percentile(gets, 50):.2f}", f"{percentile(gets, 99):.2f}",
                f"{percentile(lists, 99):.2f}", len(gets) + len(lists))

    _table(f"kernel_load: {args.clients} clients streaming {args.tokens}-token answers, "
           f"{args.readers} readers (Get, List every {LIST_EVERY}th); "
           f"{args.rounds} x {args.duration:.0f} s per path",
           ("window", "tokens/s", "vfmd cpu %", "fake cpu %", "clients cpu %", "Get p50 ms",
            "Get p99 ms", "List p99 ms", "reader calls"),
           [row(ph["name"], ph) for ph in windows]
           + [row(f"all {name}", ph) for name, ph in phases.items()])
    for ph in phases.values():
        if ph["first_error"]:
            print(f"  {ph['name']}: {ph['errors']} errors, first: {ph['first_error']}")
    print()
    report("goals", [(k, figures[k], f"{op} {goal}",
                      "yes" if figures[k] is not None and _met(k, figures[k]) else "no")
                     for k, (op, goal) in GOALS.items()],
           ("figure", "value", "goal", "met"), figures)
    return 0
