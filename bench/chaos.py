"""Chaos bench: a mixed load from several tenants while a random daemon is SIGKILLed every
few seconds; the supervisor `vfmctl up` leaves must bring each back. Nothing acknowledged
may be lost and no call may hang.

Setup: `vfmctl up --detach --listen 127.0.0.1:PORT` on a temp state dir (the real stack and
its supervisor), one bearer token per tenant. Each tenant's worker loops over spawn, Ask
(8 tokens), Remember, Ingest (a one-chunk document) and Search, over TCP with its token.
A calm phase with the same load and no kills comes first: the baseline, in the same run.
Then every `--kill-every` seconds (±50%) one daemon that is serving is SIGKILLed, and a
probe times how long until it serves again (the kernel: it answers Ping; a service: the
kernel lists it SERVING with a new pid).

Every call has a deadline; a call that ran out of it (DEADLINE_EXCEEDED) or did not return
within its deadline plus a grace (an Ask, which streams and has no deadline: 2 minutes) is
`hung`; one that answered after more than its deadline is `slow`. Any other error is a
clear status (by code).
After the chaos the stack is left to settle, then every acknowledged write is looked for:
spawned processes (ps), remembered entries and the question of every answered Ask (its
exchange is remembered in the background: recall), ingested documents (search).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import uvloop

from bench.common import REPO, cleanup, free_port, percentile, report, temp_state_dir
from libvfm import AsyncClient, VfmError
from libvfm.errors import AlreadyExists, DeadlineExceeded, Unavailable
from libvfm.types import MemoryEntry

DAEMONS = ("vfmd", "vfm-datad", "vfm-modeld", "vfm-trustd")
DEADLINE_S = 20.0     # every call's own deadline (an Ask streams and has none)
GRACE_S = 15.0        # beyond it, a call that has not returned is hung
ASK_HUNG_S = 120.0    # an 8-token answer not there in 2 minutes is hung, not slow
PROCESS_OPS = 10      # a fresh FM process every this many operations: small memories to check


@dataclass
class Phase:
    tried: Counter = field(default_factory=Counter)
    ok: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)   # "OP CODE" -> count
    hung: Counter = field(default_factory=Counter)
    slow: Counter = field(default_factory=Counter)      # answered, after more than DEADLINE_S
    examples: dict = field(default_factory=dict)       # "OP CODE" -> the first message


@dataclass
class Acked:
    """Writes the stack acknowledged, to be found again at the end."""
    spawns: list = field(default_factory=list)       # (tenant, pid)
    memories: list = field(default_factory=list)     # (tenant, pid, text)
    exchanges: list = field(default_factory=list)    # (tenant, pid, question)
    documents: list = field(default_factory=list)    # (tenant, collection, source, word)


class Load:
    def __init__(self, port: int, tokens: dict[str, str], seed: int):
        self.port, self.tokens = port, tokens
        self.rng = random.Random(seed)
        self.phases = {"calm": Phase(), "chaos": Phase()}
        self.phase = "calm"
        self.acked = Acked()
        self.stopping = False

    async def call(self, op: str, coro):
        phase = self.phases[self.phase]
        phase.tried[op] += 1
        began = time.monotonic()
        try:
            result = await asyncio.wait_for(coro, ASK_HUNG_S if op == "ask"
                                            else DEADLINE_S + GRACE_S)
        except (asyncio.TimeoutError, DeadlineExceeded) as err:
            phase.hung[op] += 1
            phase.examples.setdefault(f"{op} hung", f"{type(err).__name__} after "
                                      f"{time.monotonic() - began:.1f}s: {err}")
        except VfmError as err:
            phase.failed[f"{op} {err.code.name}"] += 1
            phase.examples.setdefault(f"{op} {err.code.name}", err.message[:200])
            await asyncio.sleep(0.2)  # the daemon is likely down: do not spin
        else:
            phase.ok[op] += 1
            if time.monotonic() - began > DEADLINE_S:
                phase.slow[op] += 1
            return result
        return None

    async def worker(self, tenant: str) -> None:
        client = AsyncClient(target=f"127.0.0.1:{self.port}", token=self.tokens[tenant],
                             timeout=DEADLINE_S)
        collection, pid, n = f"kb-{tenant}", 0, 0
        while await self.call("create", _create(client, collection)) is None:
            if self.stopping:
                return
        while not self.stopping:
            n += 1
            tag = f"{tenant}x{n}"
            if not pid or n % PROCESS_OPS == 0:
                proc = await self.call("spawn", client.spawn(f"chaos-{tag}"))
                if proc is not None:
                    pid = proc.pid
                    self.acked.spawns.append((tenant, pid))
                continue
            op = self.rng.choices(("ask", "remember", "search", "ingest"), (3, 3, 2, 1))[0]
            if op == "ask":
                question = f"chaos question {tag}: what comes after {n}?"
                if await self.call(op, client.ask(pid, question, max_new_tokens=8)) is not None:
                    self.acked.exchanges.append((tenant, pid, question))
            elif op == "remember":
                text = f"chaos memory {tag}: the parcel number is {n * 7919}"
                if await self.call(op, client.remember(pid, [MemoryEntry(text)])) is not None:
                    self.acked.memories.append((tenant, pid, text))
            elif op == "search":
                await self.call(op, client.search(collection, "chaos word", k=3))
            else:
                word, source = f"zq{tag}", f"note-{tag}.txt"
                body = f"A note for the chaos bench. The chaos word is {word}.\n".encode()
                if await self.call(op, client.ingest(collection, source, body)) is not None:
                    self.acked.documents.append((tenant, collection, source, word))
        await client.close()


async def _create(client: AsyncClient, collection: str) -> bool:
    """Create the tenant's collection; one made by an attempt whose answer was lost counts."""
    try:
        await client.collection_create(collection)
    except AlreadyExists:
        pass
    return True


class Chaos:
    """Every few seconds, SIGKILLs one daemon that is serving, and times each one's way back."""

    def __init__(self, state: Path, kill_every_s: float, seed: int):
        self.state, self.kill_every_s = state, kill_every_s
        self.rng = random.Random(seed + 1)
        self.recover_s: dict[str, list[float]] = {d: [] for d in DAEMONS}
        self.kills: Counter = Counter()
        self.not_back: list[str] = []
        self._coming_back: dict[str, asyncio.Task] = {}

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * self.kill_every_s)
            serving = [d for d in DAEMONS if d not in self._coming_back]
            pid = None
            if serving and time.monotonic() < until:
                name = self.rng.choice(serving)
                pid = _pid(self.state, name)
            if pid is None:
                continue
            os.kill(pid, signal.SIGKILL)
            self.kills[name] += 1
            self._coming_back[name] = asyncio.create_task(self._time_back(name, pid))
        await asyncio.gather(*self._coming_back.values())

    async def _time_back(self, name: str, pid: int) -> None:
        killed_at = time.monotonic()
        back = await _serving_again(self.state, name, pid, timeout_s=180)
        if back is None:
            self.not_back.append(name)
        else:
            self.recover_s[name].append(back - killed_at)
            del self._coming_back[name]


def _pid(state: Path, name: str) -> int | None:
    try:
        return int((state / f"{name}.pid").read_text())
    except (OSError, ValueError):
        return None


async def _serving_again(state: Path, name: str, old_pid: int, timeout_s: float) -> float | None:
    """When `name` serves again under a new pid (monotonic time), or None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        client = AsyncClient(state / "vfmd.sock", timeout=2.0)
        try:
            if name == "vfmd":
                await client.ping()
                if _pid(state, name) not in (None, old_pid):
                    return time.monotonic()
            elif any(d.name == name and d.health == "SERVING" and d.pid != old_pid
                     for d in await client.services()):
                return time.monotonic()
        except VfmError:
            pass
        finally:
            await client.close()
        await asyncio.sleep(0.2)
    return None


async def _all_serving(state: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        client = AsyncClient(state / "vfmd.sock", timeout=3.0)
        try:
            found = {d.name: d.health for d in await client.services()}
            if all(found.get(d) == "SERVING" for d in DAEMONS):
                return True
        except VfmError:
            pass
        finally:
            await client.close()
        await asyncio.sleep(0.5)
    return False


async def _patient(factory, timeout_s: float = 120.0):
    """`await factory()`, again while the stack answers UNAVAILABLE (a daemon restarting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await factory()
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _lost(state: Path, load: Load) -> dict[str, list]:
    """Every acknowledged write that cannot be found after the chaos."""
    acked, port = load.acked, load.port
    admin = AsyncClient(state / "vfmd.sock", timeout=60)
    stored = {p.pid for p in await _patient(lambda: admin.ps(all=True))}
    await admin.close()
    lost = {"spawns": [p for _, p in acked.spawns if p not in stored],
            "memories": [], "exchanges": [], "documents": []}
    clients = {t: AsyncClient(target=f"127.0.0.1:{port}", token=tok, timeout=60)
               for t, tok in load.tokens.items()}
    remembered: dict[tuple, set[str]] = {}
    for kind, items in (("memories", acked.memories), ("exchanges", acked.exchanges)):
        for tenant, pid, text in items:
            key = (tenant, pid)
            if key not in remembered:
                hits = await _patient(lambda: clients[tenant].recall(pid, "chaos", k=500))
                remembered[key] = {h.entry.text for h in hits}
            if text not in remembered[key]:  # a ranking miss is not a loss: ask for it
                hits = await _patient(lambda: clients[tenant].recall(pid, text, k=50))
                if text not in {h.entry.text for h in hits}:
                    lost[kind].append((tenant, pid, text))
    for tenant, collection, source, word in acked.documents:
        hits = await _patient(lambda: clients[tenant].search(collection, word, k=20))
        if source not in {h.source for h in hits}:
            lost["documents"].append((tenant, source))
    for client in clients.values():
        await client.close()
    return lost


def _rss_mb(state: Path) -> dict[str, float]:
    found = {}
    for name in DAEMONS:
        try:
            found[name] = round(psutil.Process(_pid(state, name)).memory_info().rss / 2**20, 1)
        except (psutil.Error, TypeError, ValueError):
            found[name] = 0.0
    return found


def _vfmctl(state: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vfmctl.main", *args, "--state-dir", str(state)],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


async def _run(state: Path, port: int, tokens: dict[str, str], args) -> tuple[Load, Chaos, dict]:
    load = Load(port, tokens, args.seed)
    chaos = Chaos(state, args.kill_every, args.seed)
    workers = [asyncio.create_task(load.worker(t)) for t in tokens]
    await asyncio.sleep(args.calm_s)
    load.phase = "chaos"
    await chaos.run(time.monotonic() + args.chaos_s)
    load.stopping = True
    await asyncio.gather(*workers)
    settled = await _all_serving(state, 180)
    lost = await _lost(state, load) if settled else {}
    return load, chaos, {"settled": settled, "lost": lost}


def _summary(load: Load, chaos: Chaos, end: dict, rss: tuple[dict, dict], restarts: dict,
             seconds: float) -> dict:
    calm, hot = load.phases["calm"], load.phases["chaos"]
    recover = [s for times in chaos.recover_s.values() for s in times]
    lost = end["lost"]
    lost_counts = {k: len(v) for k, v in lost.items()}
    return {
        "tried": sum(hot.tried.values()), "ok": sum(hot.ok.values()),
        "failed_clear": sum(hot.failed.values()), "hung": sum(hot.hung.values()),
        "failed_by": dict(hot.failed), "hung_by": dict(hot.hung), "slow_by": dict(hot.slow),
        "calm_slow_by": dict(calm.slow),
        "calm_tried": sum(calm.tried.values()), "calm_failed": sum(calm.failed.values()),
        "calm_hung": sum(calm.hung.values()), "calm_failed_by": dict(calm.failed),
        "calm_examples": calm.examples, "examples": hot.examples,
        "kills": dict(chaos.kills), "restarts": restarts,
        "not_back": chaos.not_back, "settled": end["settled"],
        "recover_p50_s": round(percentile(recover, 50), 2) if recover else None,
        "recover_p95_s": round(percentile(recover, 95), 2) if recover else None,
        "recover_max_s": {d: round(max(t), 2) for d, t in chaos.recover_s.items() if t},
        "acked": {"spawns": len(load.acked.spawns), "memories": len(load.acked.memories),
                  "exchanges": len(load.acked.exchanges),
                  "documents": len(load.acked.documents)},
        "lost": sum(lost_counts.values()) if end["settled"] else None,
        "lost_by": lost_counts, "lost_examples": {k: v[:3] for k, v in lost.items() if v},
        "rss_start_mb": rss[0], "rss_end_mb": rss[1], "seconds": round(seconds, 1),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="half a minute of chaos")
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="minutes of chaos (default 2; --quick 0.5)")
    parser.add_argument("--calm-s", type=float, default=0.0,
                        help="seconds of the same load without kills first (default 20; "
                             "--quick 10)")
    parser.add_argument("--kill-every", type=float, default=4.0,
                        help="mean seconds between two kills (default 4)")
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--keep", action="store_true", help="keep the state dir and its logs")
    args = parser.parse_args(argv)
    args.chaos_s = 60 * (args.minutes or (0.5 if args.quick else 2.0))
    args.calm_s = args.calm_s or (10.0 if args.quick else 20.0)
    state, port, started = temp_state_dir(), free_port(), time.monotonic()
    try:
        up = _vfmctl(state, "up", "--detach", "--listen", f"127.0.0.1:{port}")
        if up.returncode != 0:
            print(up.stderr, file=sys.stderr)
            return 1
        tokens = {}
        for i in range(args.tenants):
            made = _vfmctl(state, "token", "create", f"tenant{i}", "--label", "chaos",
                           "-o", "json", timeout=60)
            tokens[f"tenant{i}"] = json.loads(made.stdout)["token"]
        rss_start = _rss_mb(state)
        try:
            load, chaos, end = uvloop.run(_run(state, port, tokens, args))
        except Exception:
            for name in ("supervisor", *DAEMONS):
                log = state / "logs" / f"{name}.log"
                tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
                print(f"--- {log} ---", *tail, sep="\n", file=sys.stderr)
            raise
        rss_end = _rss_mb(state)
        restarts = {name: d.get("restarts", 0) for name, d in json.loads(
            (state / "supervisor.json").read_text()).get("daemons", {}).items()}
        if sum(restarts.values()) != sum(chaos.kills.values()):
            print("restarts the bench did not cause; the supervisor's log:\n"
                  + (state / "logs" / "supervisor.log").read_text(), file=sys.stderr)
    finally:
        _vfmctl(state, "down", timeout=120)
        if args.keep:
            print(f"state and logs kept in {state}", file=sys.stderr)
        else:
            cleanup(state)
    figures = _summary(load, chaos, end, (rss_start, rss_end), restarts,
                       time.monotonic() - started)
    rows = [("requests tried", figures["calm_tried"], figures["tried"]),
            ("failed with a clear status", figures["calm_failed"], figures["failed_clear"]),
            ("hung", figures["calm_hung"], figures["hung"]),
            ("daemons killed", 0, sum(chaos.kills.values())),
            ("restarts (supervisor)", "-", sum(restarts.values())),
            ("recovery p50 / p95 s", "-",
             f"{figures['recover_p50_s']} / {figures['recover_p95_s']}"),
            *[(f"acked {k} lost", "-", f"{figures['lost_by'].get(k, '?')} of {n}")
              for k, n in figures["acked"].items()]]
    rows += [(f"RSS {d} MB start/end", "-", f"{rss_start[d]} / {rss_end[d]}") for d in DAEMONS]
    report(f"chaos: {args.tenants} tenants, {args.calm_s:.0f}s calm then {args.chaos_s:.0f}s "
           f"with a SIGKILL every ~{args.kill_every:g}s", rows, ("figure", "calm", "chaos"),
           figures)
    ok = figures["settled"] and figures["lost"] == 0 and figures["hung"] == 0
    return 0 if ok else 1
