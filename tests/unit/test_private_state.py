"""State and data dirs are private: created so, tightened when an older version left them
open, refused when another user owns them."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest

from vfmos_runtime.paths import secure_state


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_new_dirs_are_created_private(tmp_path):
    state, data = tmp_path / "run" / "vfmos", tmp_path / "lib" / "vfmos"
    assert secure_state(state, [data]) == []
    assert mode(state) == 0o711 and mode(data) == 0o700


def test_a_too_open_state_dir_and_what_is_in_it_are_tightened(tmp_path):
    state = tmp_path / "state"
    (state / "data.lmdb").mkdir(parents=True)
    (state / "data.lmdb" / "data.mdb").write_bytes(b"a tenant's memory")
    os.chmod(state, 0o755)
    os.chmod(state / "data.lmdb", 0o755)
    os.chmod(state / "data.lmdb" / "data.mdb", 0o644)
    (state / "notes.txt").write_text("not VFMOS's: left alone")
    os.chmod(state / "notes.txt", 0o644)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(state / "vfmd.sock"))
        os.chmod(state / "vfmd.sock", 0o666)
        changes = secure_state(state, [state])
        assert mode(state / "vfmd.sock") == 0o666  # sockets keep the mode their daemon sets
    assert mode(state) == 0o711 and mode(state / "data.lmdb") == 0o700
    assert mode(state / "data.lmdb" / "data.mdb") == 0o600
    assert mode(state / "notes.txt") == 0o644
    assert any("was 0755, now 0711" in c for c in changes) and len(changes) == 3
    assert secure_state(state, [state]) == []  # nothing left to do


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a dir to another user")
def test_a_dir_of_another_user_is_refused_with_one_line(tmp_path):
    state = tmp_path / "theirs"
    state.mkdir()
    os.chown(state, 65534, 65534)
    with pytest.raises(PermissionError, match="belongs to uid 65534"):
        secure_state(state)
    done = subprocess.run([sys.executable, "-m", "kernel.main", "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "belongs to uid 65534" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
