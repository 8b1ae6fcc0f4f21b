"""The supervisor `vfmctl up` leaves running: it starts the daemons, starts a crashed one
again after a backoff (what Restart=on-failure does under systemd) and counts restarts in
STATE/supervisor.json, where `vfmctl status` reads them. SIGTERM (`vfmctl down`) stops
the services, then the kernel, and nothing is restarted after it."""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import psutil

from vfmctl.daemons import (ALL, Daemon, err_file, log_file, pid_file, running_pid,
                            status_file, stop_pid, supervisor_log)
from vfmos_runtime.logs import LogSettings, setup_logging
from vfmos_runtime.paths import PRIVATE_UMASK

log = logging.getLogger("vfmctl.supervisor")
FIRST_DELAY_S = 0.5       # the first restart of a daemon that had been up a while
MAX_DELAY_S = 30.0        # a daemon that keeps crashing at start is tried twice a minute
STABLE_S = 10.0           # up this long: its next crash starts the backoff afresh
ERR_MAX_BYTES = 1 << 20   # a daemon's stderr file is rotated at a start beyond this
TICK_S = 0.1


@dataclass
class Watched:
    """What the supervisor knows of one daemon; the public part goes to supervisor.json."""
    pid: int = 0
    restarts: int = 0          # starts after an exit the supervisor did not ask for
    exits: int = 0             # exits seen (a waiting `vfmctl up` fails on a new one)
    last_exit: str = ""        # "killed by SIGKILL", "exit 1"
    last_exit_at: float = 0.0
    started_at: float = 0.0
    next_start_at: float = 0.0
    delay_s: float = 0.0       # the backoff now in force
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def public(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "proc"}


class Supervisor:
    def __init__(self, state_dir: Path, args: dict[str, list[str]]):
        self.state_dir, self.args = state_dir, args
        # The daemons `up` asked for (the gateway may be left out), in start order.
        self.daemons = [d for d in ALL if d.name in args] if args else list(ALL)
        self.watched = {d.name: Watched() for d in self.daemons}
        self.stopping = False

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: self._stop_requested())
        for daemon in self.daemons:  # a daemon that already runs (an older `up`) is adopted
            pid = running_pid(self.state_dir, daemon)
            if pid is not None:
                self.watched[daemon.name].pid = pid
                self.watched[daemon.name].started_at = _started(pid)
        self._write()
        while not self.stopping:
            now = time.time()
            changed = False
            for daemon in self.daemons:
                changed |= self._look(daemon, now)
            if changed:
                self._write()
            time.sleep(TICK_S)
        self._stop_all()

    def _stop_requested(self) -> None:
        self.stopping = True

    def _look(self, daemon: Daemon, now: float) -> bool:
        """Reap, schedule or start `daemon`; True when its public state changed."""
        w = self.watched[daemon.name]
        if w.pid and not self._alive(daemon, w):
            self._exited(daemon, w, now)
            return True
        if not w.pid and now >= w.next_start_at and not self.stopping:
            self._start(daemon, w, now)
            return True
        return False

    def _alive(self, daemon: Daemon, w: Watched) -> bool:
        if w.proc is not None:
            return w.proc.poll() is None
        return running_pid(self.state_dir, daemon) == w.pid  # adopted: not our child

    def _exited(self, daemon: Daemon, w: Watched, now: float) -> None:
        code = w.proc.returncode if w.proc is not None else None
        w.last_exit = ("gone" if code is None else f"killed by {signal.Signals(-code).name}"
                       if code < 0 else f"exit {code}")
        w.exits += 1
        w.last_exit_at = now
        ran_s = now - w.started_at if w.started_at else 0.0
        w.delay_s = next_delay(w.delay_s, ran_s)
        w.next_start_at = now + w.delay_s
        w.pid, w.proc = 0, None
        log.warning("%s ended: %s after %.1fs; starting it again in %.1fs",
                    daemon.name, w.last_exit, ran_s, w.delay_s)

    def _start(self, daemon: Daemon, w: Watched, now: float) -> None:
        if w.exits:
            w.restarts += 1
        w.proc = start(self.state_dir, daemon, self.args.get(daemon.name, []))
        w.pid, w.started_at = w.proc.pid, now
        log.info("started %s (pid %d)%s", daemon.name, w.pid,
                 f", restart {w.restarts}" if w.restarts else "")

    def _stop_all(self) -> None:
        for daemon in reversed(self.daemons):
            w = self.watched[daemon.name]
            if w.pid and self._alive(daemon, w):
                log.info("stopping %s (pid %d)", daemon.name, w.pid)
                if not stop_pid(w.pid):
                    log.warning("%s did not stop in time; killed it", daemon.name)
                if w.proc is not None:
                    w.proc.wait()
            pid_file(self.state_dir, daemon).unlink(missing_ok=True)
            w.pid, w.proc = 0, None
        self._write(stopped=True)

    def _write(self, stopped: bool = False) -> None:
        state = {"supervisor_pid": 0 if stopped else os.getpid(),
                 "daemons": {name: w.public() for name, w in self.watched.items()}}
        path = status_file(self.state_dir)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, path)


def next_delay(delay_s: float, ran_s: float) -> float:
    """The wait before starting a daemon that ended after `ran_s` seconds, the last wait
    having been `delay_s`: short after a run that lasted, doubling while it keeps dying
    young, so a daemon that cannot start does not spin."""
    if ran_s >= STABLE_S or not delay_s:
        return FIRST_DELAY_S
    return min(MAX_DELAY_S, delay_s * 2)


def start(state_dir: Path, daemon: Daemon, extra: list[str]) -> subprocess.Popen:
    """Start one daemon: logging to its rotating log file, stderr (a crash, a bad flag) to
    its .err file, kept below ERR_MAX_BYTES across starts."""
    log_path, err = log_file(state_dir, daemon), err_file(state_dir, daemon)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if err.exists() and err.stat().st_size > ERR_MAX_BYTES:
        os.replace(err, err.with_name(err.name + ".1"))
    env = {**os.environ, "VFM_LOG_FILE": str(log_path)}
    with open(err, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", daemon.module, "--state-dir", str(state_dir), *extra],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    pid_file(state_dir, daemon).write_text(f"{proc.pid}\n")
    return proc


def _started(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return time.time()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vfmctl-supervisor", description=__doc__)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--daemon-args", default="{}",
                        help="JSON object: daemon name -> its extra flags")
    args = parser.parse_args(argv)
    os.umask(PRIVATE_UMASK)
    setup_logging("INFO", LogSettings(file=supervisor_log(args.state_dir), max_mb=4, backups=1))
    lock = open(args.state_dir / "supervisor.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("another supervisor runs for %s; leaving it to that one", args.state_dir)
        return 0
    log.info("supervising the daemons in %s (pid %d)", args.state_dir, os.getpid())
    Supervisor(args.state_dir, json.loads(args.daemon_args)).run()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
