"""systemd's Type=notify path without systemd: vfmd gets a NOTIFY_SOCKET and must report READY, then STOPPING."""

from __future__ import annotations

import os
import socket

from tests.conftest import start_kernel


def _receive_all(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except (BlockingIOError, socket.timeout):
            return messages


def test_vfmd_notifies_ready_with_its_pid_then_stopping(state_dir):
    path = state_dir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(0.5)
        daemon = start_kernel(state_dir, env={**os.environ, "NOTIFY_SOCKET": str(path)})
        ready = _receive_all(listener)
        assert any("READY=1" in m and f"MAINPID={daemon.proc.pid}" in m for m in ready), ready
        assert any("STATUS=serving on" in m for m in ready)
        assert daemon.stop() == 0
        assert any("STOPPING=1" in m for m in _receive_all(listener))


def test_vfmd_without_notify_socket_runs_normally(kernel):
    assert kernel.alive()
