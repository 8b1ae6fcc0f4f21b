"""Shared pytest fixtures: a real vfmd on a temp state dir over a real Unix socket."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Stacks that tests bring up (`vfmctl up`) serve the OpenAI gateway on a free port, never on
# the 8080 a developer's own `make run` holds.
os.environ.setdefault("VFM_GATEWAY_LISTEN", "127.0.0.1:0")


class Daemon:
    """A daemon process started for a test, with its log for when things go wrong."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.args, self.log_path, self.env = args, log, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, *self.args], stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode if self.proc else 0


def free_port() -> int:
    """A loopback TCP port free at the time of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(client, name: str, pid: int | None = None) -> bool:
    """Whether the kernel that `client` talks to lists service `name` as SERVING (and, with
    `pid`, registered by that process: a restarted service's old record may still be listed)."""
    return any(d.name == name and d.health == "SERVING" and pid in (None, d.pid)
               for d in client.services())


def wait_for(predicate, timeout: float = 20.0, what: str = "condition", log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n--- log ---\n{log()}" if log else ""))


def node_example(directory: Path, installed: str) -> str:
    """node's path, once `npm ci` has installed the example in `directory` (skipped without
    node and npm, or when the registry cannot be reached); `installed` names a package dir
    under node_modules that shows an earlier install."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed for the Node.js examples")
    if not (directory / "node_modules" / installed).exists():
        try:
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=directory,
                                  capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip("npm ci timed out (registry unreachable?)")
        if done.returncode != 0:
            pytest.skip(f"npm ci failed (registry unreachable?): {done.stderr[-400:]}")
    return node


def start_kernel(state_dir: Path, *extra: str, env: dict | None = None) -> Daemon:
    """vfmd on `state_dir`; without vfm-trustd unless `extra` says `--trust on` (vfmd refuses
    every Ask while trust is on and no vfm-trustd ever answered)."""
    daemon = Daemon(["-m", "kernel.main", "--state-dir", str(state_dir),
                     "--health-interval", "0.3", "--trust", "off", *extra],
                    state_dir / "logs" / "vfmd.log", env=env).start()
    wait_for(lambda: _pings(state_dir) or not daemon.alive(), what="vfmd to serve", log=daemon.log)
    assert daemon.alive(), daemon.log()
    return daemon


def _pings(state_dir: Path) -> bool:
    from libvfm import Client, VfmError
    try:
        with Client(state_dir / "vfmd.sock", timeout=2) as client:
            client.ping()
        return True
    except VfmError:
        return False


@pytest.fixture
def state_dir():
    # Short (Unix socket paths must stay under ~100 bytes) and world-traversable, so a
    # test can connect as another uid.
    path = Path(tempfile.mkdtemp(prefix="vfm", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def kernel(state_dir):
    daemon = start_kernel(state_dir)
    yield daemon
    daemon.stop()
