"""vfmd on a slow disk: other syscalls are answered while commits are in flight, and the
writes that queue up meanwhile share a commit."""

from __future__ import annotations

import asyncio
import os
import time

import uvloop

from libvfm import AsyncClient, Client
from tests.conftest import start_kernel

COMMIT_S = 0.8  # every commit of the kernel store takes this long (VFM_SLOW_COMMIT_MS)


async def _while_spawning(sock, first_pid: int, spawns: int) -> dict:
    async with AsyncClient(sock) as client:
        await client.ping()  # connected, ticket in hand
        started = time.perf_counter()
        storm = [asyncio.create_task(client.spawn(f"storm-{i}")) for i in range(spawns)]
        await asyncio.sleep(0.2)  # the storm's first commit is in flight now
        asked = time.perf_counter()
        await client.ping()
        process = await client.get(first_pid)
        listed = await client.ps()
        answered = time.perf_counter() - asked
        pending = sum(not t.done() for t in storm)
        pids = [p.pid for p in await asyncio.gather(*storm)]
        return {"answered_s": answered, "pending": pending, "pids": pids,
                "storm_s": time.perf_counter() - started, "name": process.name,
                "listed": len(listed)}


def test_syscalls_are_served_while_a_commit_is_slow(state_dir):
    kernel = start_kernel(state_dir, env={**os.environ,
                                          "VFM_SLOW_COMMIT_MS": str(int(COMMIT_S * 1000))})
    try:
        with Client(state_dir / "vfmd.sock") as client:
            took = time.perf_counter()
            first = client.spawn("first")  # acknowledged only once durable
            assert time.perf_counter() - took >= COMMIT_S * 0.9
        seen = uvloop.run(_while_spawning(state_dir / "vfmd.sock", first.pid, spawns=16))
    finally:
        kernel.stop()
    # Ping, Get and List came back at once though 16 spawns were waiting on the disk...
    assert seen["answered_s"] < COMMIT_S / 2, seen
    assert seen["pending"] == 16, seen
    assert seen["name"] == "first" and seen["listed"] >= 1
    # ...and those 16 shared their commits: two at most (one may have started with a few).
    assert len(set(seen["pids"])) == 16 and min(seen["pids"]) > first.pid
    assert seen["storm_s"] < 3.5 * COMMIT_S, seen


def test_acknowledged_changes_survive_kill9_on_a_slow_disk(state_dir):
    env = {**os.environ, "VFM_SLOW_COMMIT_MS": "200"}
    kernel = start_kernel(state_dir, env=env)
    with Client(state_dir / "vfmd.sock") as client:
        pid = client.spawn("durable", priority=7).pid
        client.suspend(pid)
        client.set_priority(pid, 9)
    kernel.kill9()
    kernel = start_kernel(state_dir)
    try:
        with Client(state_dir / "vfmd.sock") as client:
            process = client.get(pid)
    finally:
        kernel.stop()
    assert (process.state, process.spec.priority) == ("SUSPENDED", 9)
