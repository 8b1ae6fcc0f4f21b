"""A real vfmd against hostile or careless input: undecodable requests, clear-text TCP, and
the figures `vfmctl status` shows."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from libvfm import Client
from tests.conftest import REPO, start_kernel

KERNEL = "/vfmos.kernel.v1.KernelService"
GARBAGE = b"\xff\xff\xff\xff not a protobuf"


def _raw(channel: grpc.Channel, kind: str, method: str):
    """A call that sends bytes as they are, so the daemon is the one who decodes them."""
    identity = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return getattr(channel, kind)(method, **identity)


@pytest.mark.parametrize("kind,method,send", [
    ("unary_unary", f"{KERNEL}/SpawnProcess", lambda call: call(GARBAGE, timeout=10)),
    ("unary_stream", f"{KERNEL}/Ask", lambda call: list(call(GARBAGE, timeout=10))),
    ("unary_unary", "/grpc.health.v1.Health/Check", lambda call: call(GARBAGE, timeout=10)),
    ("stream_stream", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
     lambda call: list(call(iter([GARBAGE]), timeout=10))),
])
def test_undecodable_request_is_invalid_argument_without_internals(kernel, state_dir, kind,
                                                                   method, send):
    log_before = kernel.log_path.stat().st_size
    with grpc.insecure_channel(f"unix:{state_dir / 'vfmd.sock'}") as channel:
        call = _raw(channel, kind, method)
        for _ in range(20):
            with pytest.raises(grpc.RpcError) as err:
                send(call)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            details = err.value.details()
            assert "request" in details and "DecodeError" not in details
            assert "class" not in details and "Traceback" not in details
    grown = kernel.log_path.read_text(errors="replace")[log_before:]
    # Twenty bad requests, no credentials: at most one rate-limited line, never a traceback.
    assert "Traceback" not in grown and grown.count("\n") <= 2, grown
    with Client(state_dir / "vfmd.sock") as client:
        assert client.spawn("still-fine").state == "READY"


def _vfmd(state_dir, *args, timeout=30):
    return subprocess.run([sys.executable, "-m", "kernel.main", "--state-dir", str(state_dir),
                           *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", ":0", "example.org:7070"])
def test_tcp_without_tls_off_loopback_is_refused(state_dir, address):
    done = _vfmd(state_dir, "--listen", address)
    assert done.returncode == 2, done.stderr
    assert "--insecure" in done.stderr and "--tls-cert" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_tcp_without_tls_serves_when_asked_to_be_insecure(state_dir):
    daemon = start_kernel(state_dir, "--listen", "0.0.0.0:0", "--insecure")
    try:
        assert "without TLS" in daemon.log()
    finally:
        daemon.stop()


def test_tcp_without_tls_on_loopback_serves_with_a_warning(state_dir):
    daemon = start_kernel(state_dir, "--listen", "127.0.0.1:0")
    try:
        log = daemon.log()
        assert "WARNING" in log and "without TLS" in log
    finally:
        daemon.stop()


def test_status_shows_the_cpu_a_daemon_used(kernel, state_dir):
    with Client(state_dir / "vfmd.sock") as client:
        for i in range(200):
            client.spawn(f"busy{i}")
        first = {d.name: d for d in client.services()}["vfmd"]
        for i in range(200):
            client.spawn(f"busier{i}")
        second = {d.name: d for d in client.services()}["vfmd"]
    assert first.cpu_percent > 0 and second.cpu_percent > 0
