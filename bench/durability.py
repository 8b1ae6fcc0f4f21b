"""Durability bench: a spawn storm while vfmd is SIGKILLed at random moments; nothing acked may be lost."""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import time

import uvloop

from bench.common import cleanup, report, spawn_daemon, stop, temp_state_dir, wait_until
from bench.syscall import _kernel_pings
from libvfm import AsyncClient, Client, Quota, VfmError


async def _storm(sock, acked: dict[int, tuple], failed: list[int], stop_at: float, worker: int):
    client = AsyncClient(sock, timeout=2.0)
    n = 0
    while time.monotonic() < stop_at:
        n += 1
        name, budget = f"w{worker}-{n}", 1000 + n
        try:
            proc = await client.spawn(name, priority=n % 40, quota=Quota(max_tokens=budget))
            acked[proc.pid] = (name, proc.spec.priority, budget)
        except VfmError:
            failed[0] += 1
            await asyncio.sleep(0.01)
    await client.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench durability", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer kill rounds")
    parser.add_argument("--rounds", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4, help="concurrent spawning clients")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 20)
    rng = random.Random(args.seed)
    state = temp_state_dir()
    sock = state / "vfmd.sock"
    acked: dict[int, tuple] = {}
    failed = [0]
    started = time.monotonic()
    try:
        for _ in range(rounds):
            kernel = spawn_daemon(["-m", "kernel.main", "--state-dir", str(state),
                                   "--log-level", "WARNING"], state / "vfmd.log")
            wait_until(lambda: _kernel_pings(sock), 30, "vfmd")
            stop_at = time.monotonic() + rng.uniform(0.3, 1.5)

            async def storm_round():
                tasks = [asyncio.create_task(_storm(sock, acked, failed, stop_at + 0.5, w))
                         for w in range(args.workers)]
                await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
                kernel.send_signal(signal.SIGKILL)  # mid-storm: some calls are in flight
                await asyncio.gather(*tasks)

            uvloop.run(storm_round())
            kernel.wait()
        kernel = spawn_daemon(["-m", "kernel.main", "--state-dir", str(state)], state / "vfmd.log")
        wait_until(lambda: _kernel_pings(sock), 30, "vfmd")
        with Client(sock) as client:
            stored = {p.pid: (p.name, p.spec.priority, p.spec.quota.max_tokens)
                      for p in client.ps(all=True)}
        stop(kernel)
    finally:
        cleanup(state)
    lost = [pid for pid, spec in acked.items() if stored.get(pid) != spec]
    figures = {"acknowledged": len(acked), "lost": len(lost), "rounds": rounds,
               "refused_during_restarts": failed[0], "stored": len(stored),
               "seconds": round(time.monotonic() - started, 1)}
    report(f"durability: {rounds} SIGKILLs during a spawn storm of {args.workers} clients",
           [("acknowledged spawns", len(acked)), ("stored after restarts", len(stored)),
            ("acknowledged but lost", len(lost)), ("refused while down", failed[0])],
           ("figure", "count"), figures)
    return 0 if not lost else 1
