"""Helpers shared by the benchmarks: temp daemons, percentiles, the table and JSON report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def temp_state_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="vfmb", dir="/tmp"))
    return path


def spawn_daemon(args: list[str], log: Path) -> subprocess.Popen:
    if args[:2] == ["-m", "kernel.main"] and "--trust" not in args:
        # vfmd refuses every Ask while trust is on and no vfm-trustd answers: a bench that
        # starts no vfm-trustd measures the stack without it, unless it asks (--trust on).
        args = [*args, "--trust", "off"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # Its own process group (a Ctrl-C at the bench's terminal is not the daemon's), but the
        # bench's session, as under `vfmctl up` where all daemons share the supervisor's: with
        # a session each, Linux's autogroups would split the CPU between daemons evenly and
        # ignore the niceness vfm-datad gives its bulk work.
        return subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, process_group=0)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def report(title: str, rows: list[tuple], header: tuple, figures: dict | None) -> None:
    """Print an aligned table, then the figures as the last stdout line (JSON; None: a table
    that is not the last)."""
    if title:
        print(title)
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))
    if figures is not None:
        print(json.dumps(figures, sort_keys=True))


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
