"""`python -m bench gateway`: what the OpenAI gateway adds over libvfm for the same Ask.

A real vfmd with the fake-fast model service behind it (`bench/fake_modeld.py`: a real
`Generate` server with no model), so the kernel and the gateway are all there is to measure,
and a real vfm-gatewayd on a free port. The same tenant (one bearer token) asks the same
processes the same question either way:

* latency: one request at a time, libvfm's `ask` and the gateway's non-streaming
  `POST /v1/chat/completions` alternating; the gateway's added p50 is its p50 minus libvfm's.
* throughput: `--clients` concurrent callers for `--duration` seconds, non-streaming, through
  libvfm and then through the gateway (ABBA rounds), requests answered per second.

The HTTP side uses a minimal keep-alive HTTP/1.1 client (one connection per caller), so
the load generator costs about what libvfm's own client costs.

Goals: gateway_p50_overhead_ms <= 2, gateway_ratio_vs_libvfm >= 0.5.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import uvloop

from bench.common import (cleanup, free_port, percentile, report, spawn_daemon, stop,
                          temp_state_dir, wait_until)
from bench.stackutil import model_service_serving
from bench.syscall import _kernel_pings
from libvfm import AsyncClient, Client

QUESTION = "Tell me about the lighthouse."
GOALS = {"gateway_p50_overhead_ms": ("<=", 2.0), "gateway_ratio_vs_libvfm": (">=", 0.5)}


class HttpCaller:
    """One keep-alive HTTP/1.1 connection that posts JSON and reads a Content-Length body."""

    def __init__(self, host: str, port: int, key: str):
        self.host, self.port, self.key = host, port, key
        self.reader = self.writer = None

    async def post(self, path: str, body: dict) -> tuple[int, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                          f"Authorization: Bearer {self.key}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                          "\r\n".encode() + data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(line.split(":", 1)[1]) for line in lines[1:]
                      if line.lower().startswith("content-length:"))
        return status, json.loads(await self.reader.readexactly(length))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _chat(pid_name: str, tokens: int) -> dict:
    return {"model": pid_name, "max_tokens": tokens,
            "messages": [{"role": "user", "content": QUESTION}]}


async def _latency(client: AsyncClient, http: HttpCaller, procs: list[tuple[int, str]],
                   tokens: int, n: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"libvfm": [], "gateway": []}
    for i in range(n + 10):  # the first 10 of each warm up and are not counted
        pid, name = procs[i % len(procs)]
        for mode in (("libvfm", "gateway") if i % 2 else ("gateway", "libvfm")):
            start = time.perf_counter()
            if mode == "libvfm":
                result = await client.ask(pid, QUESTION, max_new_tokens=tokens)
                ok = result.usage.tokens_out == tokens
            else:
                status, body = await http.post("/v1/chat/completions", _chat(name, tokens))
                ok = status == 200 and body["usage"]["completion_tokens"] == tokens
            if not ok:
                raise RuntimeError(f"{mode} answered wrong: {body if mode == 'gateway' else result}")
            if i >= 10:
                times[mode].append((time.perf_counter() - start) * 1000)
    return times


async def _load(mode: str, socket: Path, key: str, host: str, port: int,
                procs: list[tuple[int, str]], tokens: int, clients: int, seconds: float) -> int:
    """Requests answered by `clients` concurrent callers in `seconds` (after a warm-up)."""
    done = [0]
    client = AsyncClient(socket, token=key, timeout=60)
    callers = [HttpCaller(host, port, key) for _ in range(clients)]
    counting = [False]
    stop_at = [float("inf")]

    async def caller(i: int) -> None:
        pid, name = procs[i % len(procs)]
        while time.monotonic() < stop_at[0]:
            if mode == "libvfm":
                await client.ask(pid, QUESTION, max_new_tokens=tokens)
            else:
                status, body = await callers[i].post("/v1/chat/completions", _chat(name, tokens))
                if status != 200:
                    raise RuntimeError(f"gateway answered {status}: {body}")
            if counting[0]:
                done[0] += 1
    tasks = [asyncio.ensure_future(caller(i)) for i in range(clients)]
    await asyncio.sleep(min(1.0, seconds / 3))
    counting[0], start = True, time.monotonic()
    await asyncio.sleep(seconds)
    counting[0], elapsed = False, time.monotonic() - start
    stop_at[0] = 0
    await asyncio.gather(*tasks)
    for c in callers:
        await c.close()
    await client.close()
    return round(done[0] / elapsed)


async def _run(args, socket: Path, key: str, port: int, procs: list[tuple[int, str]]) -> dict:
    client = AsyncClient(socket, token=key, timeout=60)
    http = HttpCaller("127.0.0.1", port, key)
    try:
        times = await _latency(client, http, procs, args.tokens, args.requests)
    finally:
        await http.close()
        await client.close()
    rates: dict[str, list[int]] = {"libvfm": [], "gateway": []}
    for r in range(args.rounds):
        for mode in (("libvfm", "gateway") if r % 2 == 0 else ("gateway", "libvfm")):
            rates[mode].append(await _load(mode, socket, key, "127.0.0.1", port, procs,
                                           args.tokens, args.clients, args.duration))
    return {"times": times, "rates": rates}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests, one short round")
    parser.add_argument("--requests", type=int, default=0,
                        help="sequential requests per path for latency (default 300, quick 80)")
    parser.add_argument("--clients", type=int, default=32,
                        help="concurrent callers for throughput (default 32)")
    parser.add_argument("--duration", type=float, default=0.0,
                        help="seconds of each throughput window (default 8, quick 3)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="libvfm+gateway window pairs, ABBA order (default 2, quick 1)")
    parser.add_argument("--tokens", type=int, default=8,
                        help="answer tokens of each request (default 8)")
    parser.add_argument("--procs", type=int, default=8, help="FM processes asked (default 8)")
    args = parser.parse_args(argv)
    args.requests = args.requests or (80 if args.quick else 300)
    args.duration = args.duration or (3.0 if args.quick else 8.0)
    args.rounds = args.rounds or (1 if args.quick else 2)
    if not 1 <= args.tokens <= 4096 or args.clients < 1 or args.procs < 1 or args.requests < 1:
        parser.error("--tokens must be 1..4096; --clients, --procs and --requests >= 1")

    state = temp_state_dir()
    socket, port = state / "vfmd.sock", free_port()
    daemons = [spawn_daemon(["-m", "kernel.main", "--state-dir", str(state), "--log-level",
                             "WARNING"], state / "vfmd.log")]
    try:
        wait_until(lambda: _kernel_pings(socket), 30, "vfmd")
        daemons.append(spawn_daemon(["-m", "bench.fake_modeld", "--socket",
                                     str(state / "fake.sock"), "--kernel-socket", str(socket),
                                     "--max-batch", str(max(64, args.clients))],
                                    state / "fake.log"))
        daemons.append(spawn_daemon(["-m", "services.gateway.main", "--state-dir", str(state),
                                     "--listen", f"127.0.0.1:{port}", "--log-level", "WARNING"],
                                    state / "gateway.log"))
        wait_until(lambda: model_service_serving(socket), 30, "the fake vfm-modeld to serve")
        wait_until(lambda: (state / "gateway.addr").exists(), 30, "vfm-gatewayd to listen")
        with Client(socket) as admin:
            key, _ = admin.token_create("bench")
        with Client(socket, token=key) as client:
            procs = [(client.spawn(f"gw-{i}").pid, f"gw-{i}") for i in range(args.procs)]
        out = uvloop.run(_run(args, socket, key, port, procs))
    finally:
        for daemon in reversed(daemons):
            stop(daemon)
        cleanup(state)

    lib, gw = out["times"]["libvfm"], out["times"]["gateway"]
    lib_rps, gw_rps = (sum(out["rates"][m]) / len(out["rates"][m]) for m in ("libvfm", "gateway"))
    figures = {
        "libvfm_p50_ms": round(percentile(lib, 50), 3),
        "gateway_p50_ms": round(percentile(gw, 50), 3),
        "gateway_p50_overhead_ms": round(percentile(gw, 50) - percentile(lib, 50), 3),
        "gateway_p99_overhead_ms": round(percentile(gw, 99) - percentile(lib, 99), 3),
        "libvfm_rps": round(lib_rps), "gateway_rps": round(gw_rps),
        "gateway_ratio_vs_libvfm": round(gw_rps / lib_rps, 3) if lib_rps else None,
        "rounds_rps": out["rates"], "tokens": args.tokens, "clients": args.clients,
    }
    rows = [("added p50 latency (ms)", figures["gateway_p50_overhead_ms"],
             f"libvfm {figures['libvfm_p50_ms']} / gateway {figures['gateway_p50_ms']}",
             _verdict("gateway_p50_overhead_ms", figures)),
            ("requests/s, non-streaming", figures["gateway_rps"],
             f"libvfm {figures['libvfm_rps']}", ""),
            ("ratio vs libvfm", figures["gateway_ratio_vs_libvfm"], "same run",
             _verdict("gateway_ratio_vs_libvfm", figures))]
    report(f"bench gateway: {args.requests} sequential asks per path, {args.clients} callers x "
           f"{args.rounds} ABBA rounds of {args.duration:g}s, {args.tokens} tokens each",
           rows, ("figure", "gateway", "baseline", "goal"), figures)
    return 0


def _verdict(key: str, figures: dict) -> str:
    op, goal = GOALS[key]
    value = figures[key]
    met = value is not None and (value <= goal if op == "<=" else value >= goal)
    return f"{op} {goal:g} {'met' if met else 'NOT met'}"


if __name__ == "__main__":
    import sys
    raise SystemExit(main(sys.argv[1:]))
