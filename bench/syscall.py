"""Syscall bench: a no-op syscall through libvfm to vfmd vs a bare grpc.aio echo server."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time
from pathlib import Path

import grpc
import uvloop

from bench.common import (cleanup, percentile, report, spawn_daemon, stop, temp_state_dir,
                          wait_until)
from bench.echo_server import METHOD
from libvfm import AsyncClient, Client, VfmError
from vfmos.kernel.v1 import kernel_pb2 as pb

PAYLOAD = b"x" * 16


class EchoCaller:
    """The baseline's client: a raw grpc.aio stub, no identity, no conversions."""

    def __init__(self, path: Path):
        self._channel = grpc.aio.insecure_channel(f"unix:{path}")
        self._ping = self._channel.unary_unary(
            METHOD, request_serializer=pb.PingRequest.SerializeToString,
            response_deserializer=pb.PingResponse.FromString)

    async def ping(self, payload: bytes) -> bytes:
        return (await self._ping(pb.PingRequest(payload=payload))).payload

    async def close(self) -> None:
        await self._channel.close()


def _caller(kind: str, path: Path):
    return AsyncClient(path) if kind == "vfmd" else EchoCaller(path)


async def _latencies(kind: str, path: Path, count: int) -> list[float]:
    caller = _caller(kind, path)
    for _ in range(100):  # warm-up: connection, ticket, code paths
        await caller.ping(PAYLOAD)
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await caller.ping(PAYLOAD)
        samples.append((time.perf_counter() - start) * 1e6)
    await caller.close()
    return samples


async def _flood(kind: str, path: Path, clients: int, seconds: float) -> int:
    callers = [_caller(kind, path) for _ in range(clients)]
    for caller in callers:
        await caller.ping(PAYLOAD)
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(caller) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await caller.ping(PAYLOAD)
            done += 1

    await asyncio.gather(*(worker(c) for c in callers))
    for caller in callers:
        await caller.close()
    return done


def _flood_process(kind: str, path: str, clients: int, seconds: float, out) -> None:
    out.put(uvloop.run(_flood(kind, Path(path), clients, seconds)))


def throughput(kind: str, path: Path, clients: int, seconds: float, procs: int) -> float:
    """Calls per second from `clients` concurrent clients spread over `procs` processes."""
    queue = mp.get_context("spawn").Queue()
    workers = [mp.get_context("spawn").Process(
        target=_flood_process, args=(kind, str(path), clients // procs + (i < clients % procs),
                                     seconds, queue)) for i in range(procs)]
    for w in workers:
        w.start()
    total = sum(queue.get(timeout=seconds + 60) for _ in workers)
    for w in workers:
        w.join()
    return total / seconds


def _kernel_pings(path: Path) -> bool:
    try:
        with Client(path, timeout=2) as client:
            client.ping()
        return True
    except VfmError:
        return False


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench syscall", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer calls, shorter floods")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--procs", type=int, default=2, help="client processes for the flood")
    args = parser.parse_args(argv)
    count, seconds = (1000, 2.0) if args.quick else (5000, 5.0)

    state = temp_state_dir()
    kernel = spawn_daemon(["-m", "kernel.main", "--state-dir", str(state), "--log-level",
                           "WARNING"], state / "vfmd.log")
    echo = spawn_daemon(["-m", "bench.echo_server", str(state / "echo.sock")], state / "echo.log")
    try:
        wait_until(lambda: _kernel_pings(state / "vfmd.sock"), 30, "vfmd")
        wait_until(lambda: (state / "echo.sock").exists(), 30, "echo server")
        # Alternate blocks so drift on a shared machine hits both sides alike.
        lat = {"vfmd": [], "echo": []}
        for _ in range(5):
            for kind, path in (("vfmd", state / "vfmd.sock"), ("echo", state / "echo.sock")):
                lat[kind] += uvloop.run(_latencies(kind, path, count // 5))
        rps = {kind: throughput(kind, path, args.clients, seconds, args.procs)
               for kind, path in (("vfmd", state / "vfmd.sock"), ("echo", state / "echo.sock"))}
    finally:
        stop(kernel)
        stop(echo)
        cleanup(state)
    p50 = {k: percentile(v, 50) for k, v in lat.items()}
    p99 = {k: percentile(v, 99) for k, v in lat.items()}
    rows = [(k, f"{p50[k]:.0f}", f"{p99[k]:.0f}", f"{rps[k]:.0f}") for k in ("vfmd", "echo")]
    figures = {"p50_ratio": round(p50["vfmd"] / p50["echo"], 3),
               "throughput_rps": round(rps["vfmd"]), "baseline_rps": round(rps["echo"]),
               "p50_us": round(p50["vfmd"], 1), "baseline_p50_us": round(p50["echo"], 1),
               "clients": args.clients, "calls": count}
    report(f"syscall: no-op Ping, {count} sequential calls; {args.clients} concurrent clients "
           f"for {seconds:.0f}s", rows, ("server", "p50 us", "p99 us", "calls/s"), figures)
    return 0
