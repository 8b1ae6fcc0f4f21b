"""Kernel syscalls against a real vfmd over its Unix socket: lifecycle, errors, restarts."""

from __future__ import annotations

import socket
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from libvfm import Client, Quota
from libvfm.errors import (FailedPrecondition, InvalidArgument, NotFound, QuotaExceeded,
                           Unauthenticated, Unavailable)
from tests.conftest import start_kernel, wait_for
from vfmos.kernel.v1 import kernel_pb2, kernel_pb2_grpc


@pytest.fixture
def client(kernel, state_dir):
    with Client(state_dir / "vfmd.sock") as c:
        yield c


def test_spawn_list_get_and_signals(client):
    proc = client.spawn("bot", priority=7, quota=Quota(max_tokens=500, max_concurrent=2))
    assert proc.pid >= 1 and proc.state == "READY" and proc.spec.priority == 7
    assert client.get(proc.pid).spec.quota.max_tokens == 500
    assert [p.pid for p in client.ps()] == [proc.pid]
    assert client.suspend(proc.pid).state == "SUSPENDED"
    assert client.resume(proc.pid).state == "READY"
    assert client.set_priority(proc.pid, 30).spec.priority == 30
    assert client.set_quota(proc.pid, Quota(max_tokens=9)).spec.quota.max_tokens == 9
    assert client.kill(proc.pid).state == "KILLED"
    assert client.ps() == []
    assert [p.state for p in client.ps(all=True)] == ["KILLED"]


def test_pids_are_unique_and_increasing(client):
    pids = [client.spawn(f"p{i}").pid for i in range(5)]
    assert pids == sorted(set(pids))


def test_default_priority_is_20(client):
    assert client.spawn("x").spec.priority == 20


@pytest.mark.parametrize("call,error", [
    (lambda c, pid: c.get(999), NotFound),
    (lambda c, pid: c.kill(999), NotFound),
    (lambda c, pid: c.resume(pid), FailedPrecondition),          # READY, not SUSPENDED
    (lambda c, pid: c.spawn("bad name!"), InvalidArgument),
    (lambda c, pid: c.spawn("ok", priority=99), InvalidArgument),
    (lambda c, pid: c.spawn("ok", quota=Quota(max_tokens=-1)), InvalidArgument),
    (lambda c, pid: c.set_quota(pid, Quota(tokens_per_minute=-5)), InvalidArgument),
    (lambda c, pid: c.ask(pid, "   "), InvalidArgument),
    (lambda c, pid: c.ask(pid, "hi", max_new_tokens=10**6), InvalidArgument),
])
def test_bad_requests_get_the_right_status(client, call, error):
    pid = client.spawn("victim").pid
    with pytest.raises(error):
        call(client, pid)
    assert client.get(pid).state == "READY"  # nothing stored was harmed


def test_killed_process_cannot_be_signalled_again(client):
    pid = client.spawn("gone").pid
    client.kill(pid)
    for op in (client.kill, client.suspend, client.resume):
        with pytest.raises(FailedPrecondition):
            op(pid)


def test_ask_without_model_service_is_unavailable_with_a_clear_message(client):
    pid = client.spawn("lonely").pid
    with pytest.raises(Unavailable, match="vfm-modeld"):
        client.ask(pid, "hello?")
    assert client.get(pid).state == "READY"


def test_oversized_message_is_refused_and_daemon_lives(client):
    pid = client.spawn("big").pid
    with pytest.raises(QuotaExceeded, match="larger than max"):
        client.spawn("big2", system_prompt="x" * (5 * 1024 * 1024))
    assert client.get(pid).name == "big"


def test_garbage_bytes_on_the_sockets_do_not_hurt(kernel, state_dir, client):
    pid = client.spawn("survivor").pid
    for name in ("vfmd.sock", "vfmd.sock.cred"):
        for junk in (b"\x00\xff" * 5000, b"GET / HTTP/1.1\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(str(state_dir / name))
                try:
                    s.sendall(junk)
                    s.recv(100)
                except OSError:
                    pass
    assert kernel.alive()
    assert client.get(pid).name == "survivor"


def test_calls_without_or_with_forged_identity_are_refused(kernel, state_dir):
    with grpc.insecure_channel(f"unix:{state_dir / 'vfmd.sock'}") as channel:
        stub = kernel_pb2_grpc.KernelServiceStub(channel)
        for metadata in ((), (("x-vfm-ticket", "forged"),), (("authorization", "Bearer vfm_nope"),)):
            with pytest.raises(grpc.RpcError) as info:
                stub.ListProcesses(kernel_pb2.ListProcessesRequest(), metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_work_for_standard_tools(kernel, state_dir):
    with grpc.insecure_channel(f"unix:{state_dir / 'vfmd.sock'}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"vfmos.kernel.v1.KernelService", "grpc.health.v1.Health"} <= names


def test_restart_after_kill9_keeps_every_process(kernel, state_dir):
    with Client(state_dir / "vfmd.sock") as client:
        specs = {}
        for i in range(20):
            p = client.spawn(f"p{i}", priority=i, quota=Quota(max_tokens=100 + i))
            specs[p.pid] = p.spec
        client.suspend(3)
        client.kill(4)
        kernel.kill9()
        again = start_kernel(state_dir)
        try:
            # The same client renews its ticket by itself after the restart.
            procs = {p.pid: p for p in client.ps(all=True)}
            assert {pid: p.spec for pid, p in procs.items()} == specs
            assert procs[3].state == "SUSPENDED" and procs[4].state == "KILLED"
            assert procs[5].state == "READY"
            assert client.spawn("after").pid == max(specs) + 1  # pids are never reused
        finally:
            again.stop()


def test_ticket_renewal_after_restart_is_transparent(kernel, state_dir):
    with Client(state_dir / "vfmd.sock") as client:
        client.whoami()
        kernel.stop()
        again = start_kernel(state_dir)
        try:
            assert client.whoami().admin is True
        finally:
            again.stop()


def test_unauthenticated_error_type_is_typed(kernel, state_dir):
    with Client(target=f"unix:{state_dir / 'vfmd.sock'}", token="vfm_bad") as client:
        with pytest.raises(Unauthenticated):
            client.ps()


def test_sigterm_stops_cleanly_and_removes_the_socket(kernel, state_dir):
    assert kernel.stop() == 0
    wait_for(lambda: not (state_dir / "vfmd.sock").exists(), 5, "socket removal")
    assert time.time() > 0
