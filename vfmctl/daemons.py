"""Start, stop and watch the VFMOS daemons on a laptop (`vfmctl up/down/status`).

`up` leaves a supervisor (`vfmctl/supervisor.py`) running in the background: it starts the
daemons and restarts a crashed one, as systemd does for the units. Everything lives in the
state dir: pid files, logs/ (rotating), supervisor.json (restarts), all private."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from libvfm import Client
from libvfm.errors import VfmError
from libvfm.paths import KERNEL_SOCKET
from libvfm.types import DaemonStatus
from vfmos_runtime.paths import PRIVATE_UMASK, secure_state


@dataclass(frozen=True)
class Daemon:
    name: str
    module: str
    ready_hint: str = ""


KERNEL = Daemon("vfmd", "kernel.main")
# Every service daemon registered so far; `up` starts them after the kernel.
SERVICES = (Daemon("vfm-datad", "services.data.main", "loading the embedding model"),
            Daemon("vfm-modeld", "services.model.main",
                   "loading the default model (the first start converts it, ~30 s)"),
            Daemon("vfm-trustd", "services.trust.main",
                   "loading the embedding model and the checks"))
# The OpenAI-compatible gateway: a client of the kernel, started last, stopped first.
GATEWAY = Daemon("vfm-gatewayd", "services.gateway.main", "opening the OpenAI-compatible API")
GATEWAY_ADDRESS_FILE = "gateway.addr"   # what it serves on, written once it listens
ALL = (KERNEL, *SERVICES, GATEWAY)
SUPERVISOR_MODULE = "vfmctl.supervisor"
STOP_TIMEOUT_S = 15.0


class UpError(Exception):
    """A daemon did not come up; the message says which and where its log is."""


def pid_file(state_dir: Path, daemon: Daemon) -> Path:
    return state_dir / f"{daemon.name}.pid"


def log_file(state_dir: Path, daemon: Daemon) -> Path:
    return state_dir / "logs" / f"{daemon.name}.log"


def err_file(state_dir: Path, daemon: Daemon) -> Path:
    """What a daemon writes outside its log: a bad flag, a crash before logging starts."""
    return state_dir / "logs" / f"{daemon.name}.err"


def status_file(state_dir: Path) -> Path:
    return state_dir / "supervisor.json"


def supervisor_log(state_dir: Path) -> Path:
    return state_dir / "logs" / "supervisor.log"


def running_pid(state_dir: Path, daemon: Daemon) -> int | None:
    """The daemon's pid if its pid file names a live process running that daemon."""
    try:
        pid = int(pid_file(state_dir, daemon).read_text().strip())
        proc = psutil.Process(pid)
        cmdline = " ".join(proc.cmdline())
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except (OSError, ValueError, psutil.Error):
        return None
    return pid if daemon.module in cmdline else None


def supervision(state_dir: Path) -> dict:
    """What the supervisor last wrote: {"supervisor_pid", "daemons": {name: {...}}}."""
    try:
        return json.loads(status_file(state_dir).read_text())
    except (OSError, ValueError):
        return {}


def supervisor_pid(state_dir: Path) -> int | None:
    pid = supervision(state_dir).get("supervisor_pid") or 0
    try:
        proc = psutil.Process(pid) if pid else None
        alive = proc is not None and proc.status() != psutil.STATUS_ZOMBIE \
            and SUPERVISOR_MODULE in " ".join(proc.cmdline())
    except psutil.Error:
        return None
    return pid if alive else None


def restarts(state_dir: Path) -> dict[str, int]:
    """Restarts per daemon since `vfmctl up`, as the supervisor counted them."""
    return {name: int(d.get("restarts", 0))
            for name, d in supervision(state_dir).get("daemons", {}).items()}


def stop_pid(pid: int, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM, then SIGKILL after `timeout_s`; False when it had to be killed."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout_s)
    except psutil.TimeoutExpired:
        proc.kill()
        return False
    except psutil.NoSuchProcess:
        pass
    return True


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _last_line(*paths: Path, since: dict[Path, int] | None = None) -> str:
    """The last line of the first file that has one, read from byte `since[path]` on (what
    this start wrote, not the previous run's "stopping"), at most the last 64 KB of it."""
    for path in paths:
        try:
            with open(path, "rb") as f:
                start = (since or {}).get(path, 0)
                f.seek(max(start, f.seek(0, os.SEEK_END) - 65536))
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            continue
        if lines:
            return lines[-1][-160:]
    return ""


def _exits(state_dir: Path, daemon: Daemon) -> int:
    return int(supervision(state_dir).get("daemons", {}).get(daemon.name, {}).get("exits", 0))


def _wait(what: str, check, timeout_s: float, daemon: Daemon, state_dir: Path, say,
          since: dict[Path, int] | None = None) -> None:
    """Until `check()`; fails as soon as the daemon exits (the supervisor counts exits).
    Log lines are shown from `since` (each file's size before this start) on."""
    deadline = time.monotonic() + timeout_s
    exits, last = _exits(state_dir, daemon), ""
    while time.monotonic() < deadline:
        if check():
            return
        if _exits(state_dir, daemon) > exits or supervisor_pid(state_dir) is None:
            err, log = err_file(state_dir, daemon), log_file(state_dir, daemon)
            raise UpError(f"{daemon.name} exited while {what}; see {log} and {err.name}: "
                          f"{_last_line(err, log, since=since)}")
        line = _last_line(log_file(state_dir, daemon), since=since)
        if line and line != last:
            say(f"  {daemon.name}: {line}")
            last = line
        time.sleep(0.2)
    raise UpError(f"{daemon.name} not ready after {timeout_s:.0f}s; "
                  f"see {log_file(state_dir, daemon)}")


def _start_supervisor(state_dir: Path, args: dict[str, list[str]]) -> None:
    (state_dir / "logs").mkdir(exist_ok=True)
    with open(state_dir / "logs" / "supervisor.err", "ab") as out:
        subprocess.Popen([sys.executable, "-m", SUPERVISOR_MODULE, "--state-dir", str(state_dir),
                          "--daemon-args", json.dumps(args)],
                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)  # survives the terminal that ran `vfmctl up`
    deadline = time.monotonic() + 30
    while supervisor_pid(state_dir) is None:
        if time.monotonic() > deadline:
            raise UpError(f"the supervisor did not start; see {supervisor_log(state_dir)}: "
                          f"{_last_line(state_dir / 'logs' / 'supervisor.err')}")
        time.sleep(0.1)


def up(state_dir: Path, say, timeout_s: float = 600.0, kernel_args: list[str] | None = None,
       service_args: dict[str, list[str]] | None = None,
       gateway_args: list[str] | None = None) -> list[str]:
    """Start the supervisor (which starts whatever is not running yet) and wait until each
    daemon serves. If one cannot start, everything this call started is stopped again.
    `gateway_args` None leaves the OpenAI gateway out."""
    os.umask(PRIVATE_UMASK)  # pid files, logs, and the daemons the supervisor starts
    for change in secure_state(state_dir):
        say(change)
    sock = state_dir / KERNEL_SOCKET
    args = {KERNEL.name: kernel_args or []}
    for daemon in SERVICES:
        args[daemon.name] = ["--kernel-socket", str(sock),
                             *(service_args or {}).get(daemon.name, [])]
    if gateway_args is not None:
        args[GATEWAY.name] = ["--kernel-socket", str(sock), *gateway_args]
    wanted = [d for d in ALL if d.name in args]
    started = [d.name for d in wanted if running_pid(state_dir, d) is None]
    since = {path: _size(path) for d in wanted
             for path in (log_file(state_dir, d), err_file(state_dir, d))}
    ours = supervisor_pid(state_dir) is None
    if ours:
        _start_supervisor(state_dir, args)
    client = Client(sock, timeout=5.0)
    try:
        if KERNEL.name in started:
            say(f"starting vfmd (state in {state_dir})")
        _wait("starting", lambda: _pings(client), 30.0, KERNEL, state_dir, say, since)
        for daemon in SERVICES:
            if daemon.name in started:
                say(f"starting {daemon.name}: {daemon.ready_hint}")
            _wait("starting", lambda d=daemon: _serving(client, d.name), timeout_s,
                  daemon, state_dir, say, since)
        if gateway_args is not None:
            if GATEWAY.name in started:
                say(f"starting {GATEWAY.name}: {GATEWAY.ready_hint}")
            _wait("starting", lambda: gateway_address(state_dir) is not None, 60.0, GATEWAY,
                  state_dir, say, since)
    except (UpError, KeyboardInterrupt):
        if ours:
            down(state_dir, lambda _line: None)
        raise
    finally:
        client.close()
    return started


def gateway_address(state_dir: Path) -> str | None:
    """The running gateway's base address ("http://127.0.0.1:8080"), or None."""
    if running_pid(state_dir, GATEWAY) is None:
        return None
    try:
        return (state_dir / GATEWAY_ADDRESS_FILE).read_text().strip() or None
    except OSError:
        return None


def gateway_status(state_dir: Path) -> DaemonStatus | None:
    """vfm-gatewayd as `vfmctl status` shows a daemon (it is a client of the kernel, so the
    kernel does not list it): SERVING while its /healthz answers 200; None when not started."""
    pid = running_pid(state_dir, GATEWAY)
    if pid is None:
        return None
    address = gateway_address(state_dir) or ""
    health = "NOT_SERVING"
    if address:
        try:
            with urllib.request.urlopen(f"{address}/healthz", timeout=2) as reply:
                health = "SERVING" if reply.status == 200 else "NOT_SERVING"
        except (OSError, ValueError):
            pass
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            rss, cpu = proc.memory_info().rss / 1e6, proc.cpu_percent(interval=0.05)
            started = proc.create_time()
    except psutil.Error:
        return None
    return DaemonStatus(name=GATEWAY.name, address=address, pid=pid, health=health,
                        rss_mb=round(rss, 1), cpu_percent=cpu,
                        uptime_s=max(0.0, time.time() - started), last_seen=time.time())


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


def down(state_dir: Path, say, timeout_s: float = STOP_TIMEOUT_S) -> int:
    """Stop the supervisor (it stops services first, then the kernel, and restarts
    nothing), then whatever still runs without it; returns how many daemons were stopped."""
    running = [d for d in ALL if running_pid(state_dir, d) is not None]
    supervisor = supervisor_pid(state_dir)
    if supervisor is not None:
        say(f"stopping {', '.join(d.name for d in reversed(running)) or 'the supervisor'}"
            f" (supervisor pid {supervisor})")
        stop_pid(supervisor, timeout_s * (len(ALL) + 1))
    for daemon in reversed(ALL):
        pid = running_pid(state_dir, daemon)
        if pid is not None:
            say(f"stopping {daemon.name} (pid {pid})")
            if not stop_pid(pid, timeout_s):
                say(f"{daemon.name} did not stop in {timeout_s:.0f}s; killed it")
        pid_file(state_dir, daemon).unlink(missing_ok=True)
    return len(running)


def wait_foreground(state_dir: Path, say) -> None:
    """Foreground `vfmctl up`: wait for Ctrl-C or SIGTERM (or the supervisor ending), then
    stop all."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            if supervisor_pid(state_dir) is None:
                say("the supervisor exited; stopping the daemons")
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    down(state_dir, say)


__all__ = ["UpError", "down", "gateway_address", "gateway_status", "restarts", "running_pid",
           "up", "wait_foreground"]
