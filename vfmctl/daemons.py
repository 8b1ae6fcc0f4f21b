"""Start, stop and watch the VFMOS daemons on a laptop (`vfmctl up/down/status`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from libvfm import Client
from libvfm.errors import VfmError
from libvfm.paths import KERNEL_SOCKET


@dataclass(frozen=True)
class Daemon:
    name: str
    module: str
    ready_hint: str = ""


KERNEL = Daemon("vfmd", "kernel.main")
# Every service daemon registered so far; `up` starts them after the kernel.
SERVICES = (Daemon("vfm-datad", "services.data.main", "loading the embedding model"),
            Daemon("vfm-modeld", "services.model.main",
                   "loading the default model (the first start converts it, ~30 s)"))


class UpError(Exception):
    """A daemon did not come up; the message says which and where its log is."""


def pid_file(state_dir: Path, daemon: Daemon) -> Path:
    return state_dir / f"{daemon.name}.pid"


def log_file(state_dir: Path, daemon: Daemon) -> Path:
    return state_dir / "logs" / f"{daemon.name}.log"


def running_pid(state_dir: Path, daemon: Daemon) -> int | None:
    """The daemon's pid if its pid file names a live process running that daemon."""
    try:
        pid = int(pid_file(state_dir, daemon).read_text().strip())
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (OSError, ValueError, psutil.Error):
        return None
    return pid if daemon.module in cmdline else None


def start(state_dir: Path, daemon: Daemon, extra: list[str]) -> int:
    log = log_file(state_dir, daemon)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", daemon.module, "--state-dir", str(state_dir), *extra],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)  # survives the terminal that ran `vfmctl up`
    pid_file(state_dir, daemon).write_text(f"{proc.pid}\n")
    return proc.pid


def _starting(state_dir: Path, daemon: Daemon) -> bool:
    """Just forked, not yet exec'd: the pid lives but does not show the daemon's command."""
    try:
        proc = psutil.Process(int(pid_file(state_dir, daemon).read_text().strip()))
        return proc.status() != psutil.STATUS_ZOMBIE and "vfmctl" in " ".join(proc.cmdline())
    except (OSError, ValueError, psutil.Error):
        return False


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][-120:] if lines else ""


def _wait(what: str, check, timeout_s: float, daemon: Daemon, state_dir: Path, say) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if check():
            return
        if running_pid(state_dir, daemon) is None and not _starting(state_dir, daemon):
            raise UpError(f"{daemon.name} exited while {what}; see {log_file(state_dir, daemon)}:"
                          f" {_last_line(log_file(state_dir, daemon))}")
        line = _last_line(log_file(state_dir, daemon))
        if line and line != last:
            say(f"  {daemon.name}: {line}")
            last = line
        time.sleep(0.2)
    raise UpError(f"{daemon.name} not ready after {timeout_s:.0f}s; "
                  f"see {log_file(state_dir, daemon)}")


def up(state_dir: Path, say, timeout_s: float = 600.0, kernel_args: list[str] | None = None,
       service_args: dict[str, list[str]] | None = None) -> list[str]:
    """Start whatever is not running yet and wait until each daemon serves."""
    state_dir.mkdir(parents=True, exist_ok=True)
    sock = state_dir / KERNEL_SOCKET
    started = []
    if running_pid(state_dir, KERNEL) is None:
        say(f"starting vfmd (state in {state_dir})")
        start(state_dir, KERNEL, kernel_args or [])
        started.append(KERNEL.name)
    client = Client(sock, timeout=5.0)
    try:
        _wait("starting", lambda: _pings(client), 30.0, KERNEL, state_dir, say)
        for daemon in SERVICES:
            if running_pid(state_dir, daemon) is None:
                say(f"starting {daemon.name}: {daemon.ready_hint}")
                start(state_dir, daemon, ["--kernel-socket", str(sock),
                                          *(service_args or {}).get(daemon.name, [])])
                started.append(daemon.name)
            _wait("starting", lambda d=daemon: _serving(client, d.name), timeout_s,
                  daemon, state_dir, say)
    finally:
        client.close()
    return started


def _pings(client: Client) -> bool:
    try:
        client.ping()
        return True
    except VfmError:
        return False


def _serving(client: Client, name: str) -> bool:
    try:
        return any(d.name == name and d.health == "SERVING" for d in client.services())
    except VfmError:
        return False


def down(state_dir: Path, say, timeout_s: float = 15.0) -> int:
    """Stop services first, then the kernel; returns how many daemons were stopped."""
    stopped = 0
    for daemon in (*reversed(SERVICES), KERNEL):
        pid = running_pid(state_dir, daemon)
        if pid is None:
            pid_file(state_dir, daemon).unlink(missing_ok=True)
            continue
        say(f"stopping {daemon.name} (pid {pid})")
        os.kill(pid, signal.SIGTERM)
        try:
            psutil.Process(pid).wait(timeout_s)
        except psutil.TimeoutExpired:
            say(f"{daemon.name} did not stop in {timeout_s:.0f}s; killing it")
            os.kill(pid, signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
        pid_file(state_dir, daemon).unlink(missing_ok=True)
        stopped += 1
    return stopped


def supervise(state_dir: Path, say) -> None:
    """Foreground `vfmctl up`: wait for Ctrl-C or SIGTERM (or the kernel dying), then stop all."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            if running_pid(state_dir, KERNEL) is None:
                say("vfmd exited; stopping the services")
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    down(state_dir, say)


__all__ = ["UpError", "down", "running_pid", "supervise", "up"]
