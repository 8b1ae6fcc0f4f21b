"""`vfmctl up` as a user types it, on a real state dir: everything it creates is private, a
daemon killed with SIGKILL serves again (the supervisor restarts it, status counts it), and
`vfmctl down` leaves nothing running."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, wait_for

VFMCTL = [sys.executable, "-m", "vfmctl.main"]
SECRET = "SECRET-7f3a-the-launch-code-is-tangerine"
# Reached by any local user (the kernel authenticates by peer credentials); services by
# the kernel's user and group only.
SOCKET_MODES = {"vfmd.sock": 0o666, "vfmd.sock.cred": 0o666, "datad.sock": 0o660,
                "modeld.sock": 0o660, "trustd.sock": 0o660}
AS_ROOT = os.geteuid() == 0 and shutil.which("runuser") is not None


def vfmctl(state_dir, *args, check=True, timeout=300):
    done = subprocess.run([*VFMCTL, *args, "--state-dir", str(state_dir)], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"vfmctl {' '.join(args)} -> {done.returncode}\n{done.stderr}")
    return done


def status(state_dir) -> dict[str, dict]:
    return {d["name"]: d for d in json.loads(vfmctl(state_dir, "status", "-o", "json").stdout)}


def processes_of(state_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if str(state_dir) in " ".join(proc.info["cmdline"] or ()):
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def stack():
    state = Path(tempfile.mkdtemp(prefix="vfms", dir="/tmp"))
    # What an older vfmctl left: a world-readable state dir and log.
    os.chmod(state, 0o755)
    (state / "logs").mkdir(mode=0o755)
    (state / "logs" / "old.log").write_text("from before\n")
    os.chmod(state / "logs" / "old.log", 0o644)
    up = vfmctl(state, "up", "--detach", timeout=900)
    pid = json.loads(vfmctl(state, "spawn", "keeper", "-o", "json").stdout)["pid"]
    vfmctl(state, "remember", str(pid), SECRET)  # a tenant's memory, in data.lmdb
    yield state, up
    vfmctl(state, "down", check=False)
    shutil.rmtree(state, ignore_errors=True)


def test_up_makes_every_file_and_dir_private(stack):
    state, up = stack
    assert "now 0711" in up.stderr  # the too-open dir was fixed, and said so
    assert stat.S_IMODE(state.stat().st_mode) == 0o711
    seen = 0
    for root, dirs, files in os.walk(state):
        for name in (*dirs, *files):
            path = Path(root) / name
            info = path.lstat()
            mode, rel = stat.S_IMODE(info.st_mode), str(path.relative_to(state))
            if stat.S_ISSOCK(info.st_mode):
                assert mode == SOCKET_MODES[rel], rel
            elif stat.S_ISDIR(info.st_mode):
                assert mode == 0o700, f"{rel} is {mode:04o}"
            else:
                assert mode == 0o600, f"{rel} is {mode:04o}"
            seen += 1
    assert {"data.lmdb", "kernel.lmdb", "logs"} <= set(os.listdir(state)) and seen > 15


@pytest.mark.skipif(not AS_ROOT, reason="needs root and runuser to act as another user")
def test_another_user_reads_no_tenant_data_but_can_call_the_kernel(stack):
    state, _ = stack
    for target in ("data.lmdb/data.mdb", "kernel.lmdb/data.mdb", "logs/vfmd.log", "."):
        done = subprocess.run(["runuser", "-u", "nobody", "--", "grep", "-a", "-r", "-o",
                               "SECRET", str(state / target)], capture_output=True, text=True)
        assert "SECRET" not in done.stdout and "Permission denied" in done.stderr, target
    # Imports as root, then the call as nobody: the kernel socket stays open to everyone.
    script = ("import os, sys; from libvfm import Client; c = Client(sys.argv[1]); "
              "os.setgid(65534); os.setuid(65534); print(c.whoami().tenant)")
    done = subprocess.run([sys.executable, "-c", script, str(state / "vfmd.sock")],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.stdout.strip() == "unix:nobody", done.stderr


def test_daemons_log_to_their_rotating_file(stack):
    state, _ = stack
    assert "vfmd serving on" in (state / "logs" / "vfmd.log").read_text()
    assert "vfm-datad serving on" in (state / "logs" / "vfm-datad.log").read_text()
    assert "Traceback" not in (state / "logs" / "vfmd.err").read_text()


@pytest.mark.parametrize("name", ["vfm-datad", "vfmd"])
def test_a_killed_daemon_serves_again_and_status_counts_the_restart(stack, name):
    state, _ = stack
    before = status(state)
    os.kill(before[name]["pid"], signal.SIGKILL)

    def serving_again():
        try:
            now = status(state)
        except AssertionError:  # the kernel itself is coming back
            return None
        d = now.get(name)
        return d if d and d["health"] == "SERVING" and d["pid"] != before[name]["pid"] else None

    again = wait_for(serving_again, timeout=180, what=f"{name} to serve again",
                     log=lambda: (state / "logs" / "supervisor.log").read_text())
    assert again["restarts"] == before[name]["restarts"] + 1
    table = vfmctl(state, "status").stdout
    assert "RESTARTS" in table
    if name == "vfmd":  # the services registered again with the new kernel
        wait_for(lambda: all(d["health"] == "SERVING" for d in status(state).values()),
                 timeout=60, what="services to register again")


def test_down_stops_everything_and_nothing_comes_back(stack):
    state, _ = stack
    assert len(processes_of(state)) >= 6  # the supervisor, four daemons and the gateway
    done = vfmctl(state, "down")
    assert "stopped 5 daemon(s)" in done.stderr
    assert processes_of(state) == []  # the supervisor too: nothing can start them again
    assert not any(state.glob("*.pid"))
    assert vfmctl(state, "status", check=False).returncode == 6


def test_a_daemon_that_cannot_start_fails_up_and_leaves_nothing_running():
    state = Path(tempfile.mkdtemp(prefix="vfmf", dir="/tmp"))
    try:
        done = vfmctl(state, "up", "--detach", "--listen", "0.0.0.0:7999", check=False)
        assert done.returncode == 6 and "Traceback" not in done.stderr
        assert "vfmd exited while starting" in done.stderr and "--insecure" in done.stderr
        assert processes_of(state) == []
    finally:
        vfmctl(state, "down", check=False)
        shutil.rmtree(state, ignore_errors=True)
