"""Tenant isolation across every syscall, with two real identities (TCP tokens and a second uid)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from libvfm import Client, Quota
from libvfm.errors import NotFound, PermissionDenied, Unauthenticated, Unavailable
from tests.conftest import REPO, free_port, start_kernel


@pytest.fixture
def tcp_kernel(state_dir):
    port = free_port()
    daemon = start_kernel(state_dir, "--listen", f"127.0.0.1:{port}")
    yield f"127.0.0.1:{port}"
    daemon.stop()


@pytest.fixture
def tenants(tcp_kernel, state_dir):
    with Client(state_dir / "vfmd.sock") as admin:
        alice_token, _ = admin.token_create("alice", label="test")
        bob_token, bob_id = admin.token_create("bob")
    alice = Client(target=tcp_kernel, token=alice_token)
    bob = Client(target=tcp_kernel, token=bob_token)
    yield alice, bob, bob_id
    alice.close()
    bob.close()


# Every syscall that names a pid, called by the tenant who does not own it.
FOREIGN_CALLS = {
    "get": lambda c, pid: c.get(pid),
    "kill": lambda c, pid: c.kill(pid),
    "suspend": lambda c, pid: c.suspend(pid),
    "resume": lambda c, pid: c.resume(pid),
    "set_quota": lambda c, pid: c.set_quota(pid, Quota(max_tokens=1)),
    "set_priority": lambda c, pid: c.set_priority(pid, 1),
    "ask": lambda c, pid: c.ask(pid, "what did alice ask?"),
}


@pytest.mark.parametrize("name", sorted(FOREIGN_CALLS))
def test_foreign_pid_looks_missing(tenants, name):
    alice, bob, _ = tenants
    pid = alice.spawn("alice-bot", priority=11).pid
    with pytest.raises(NotFound, match=f"no process with pid {pid}"):
        FOREIGN_CALLS[name](bob, pid)
    # ...and it is untouched for its owner.
    proc = alice.get(pid)
    assert (proc.state, proc.spec.priority, proc.spec.quota.max_tokens) == ("READY", 11, 0)


def test_listing_shows_only_own_processes(tenants, state_dir):
    alice, bob, _ = tenants
    a = alice.spawn("a1").pid
    b = bob.spawn("b1").pid
    assert [p.pid for p in alice.ps(all=True)] == [a]
    assert [p.pid for p in bob.ps(all=True)] == [b]
    assert {p.tenant for p in bob.ps()} == {"bob"}
    with Client(state_dir / "vfmd.sock") as admin:  # root sees all
        assert {p.pid for p in admin.ps()} == {a, b}


def test_admin_only_syscalls_are_refused_to_tenants(tenants):
    alice, _, bob_id = tenants
    with pytest.raises(PermissionDenied):
        alice.token_create("mallory", admin=True)
    with pytest.raises(PermissionDenied):
        alice.token_revoke(bob_id)
    with pytest.raises(PermissionDenied):
        alice.token_list()
    with pytest.raises(PermissionDenied):
        alice.register_service("vfm-modeld", "unix:/tmp/evil.sock", 1)


def test_identity_over_tcp(tenants):
    alice, _, _ = tenants
    me = alice.whoami()
    assert (me.tenant, me.admin, me.transport) == ("alice", False, "tcp")


def test_revoked_token_stops_working(tenants, state_dir, tcp_kernel):
    _, bob, bob_id = tenants
    bob.ps()
    with Client(state_dir / "vfmd.sock") as admin:
        admin.token_revoke(bob_id)
        assert bob_id not in {t.token_id for t in admin.token_list()}
    with pytest.raises(Unauthenticated):
        bob.ps()


def test_tokens_are_stored_hashed(tenants, state_dir):
    alice_token = None
    with Client(state_dir / "vfmd.sock") as admin:
        alice_token, _ = admin.token_create("carol")
    raw = (state_dir / "kernel.lmdb" / "data.mdb").read_bytes()
    assert alice_token.encode() not in raw


SECOND_UID = """
import json, os, sys
from libvfm import Client
from libvfm.errors import VfmError
client = Client(sys.argv[1])  # imports happen as root; the connection is made as nobody
os.setgid(65534); os.setuid(65534)
out = {"whoami": client.whoami().tenant, "ps": [p.pid for p in client.ps(all=True)]}
for op in ("get", "kill", "suspend"):
    try:
        getattr(client, op)(int(sys.argv[2])); out[op] = "ok"
    except VfmError as err:
        out[op] = type(err).__name__
out["own"] = client.spawn("mine").tenant
print(json.dumps(out))
"""


def test_second_local_uid_is_its_own_tenant(kernel, state_dir):
    with Client(state_dir / "vfmd.sock") as root:
        root_pid = root.spawn("root-bot").pid
        done = subprocess.run([sys.executable, "-c", SECOND_UID, str(state_dir / "vfmd.sock"),
                               str(root_pid)], capture_output=True, text=True, cwd=REPO,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["whoami"] == "unix:nobody"
        assert out["ps"] == []
        assert out["get"] == out["kill"] == out["suspend"] == "NotFound"
        assert out["own"] == "unix:nobody"
        assert root.get(root_pid).state == "READY"
        assert {p.tenant for p in root.ps()} == {"unix:root", "unix:nobody"}


def test_tls_listener_with_bearer_token(state_dir):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = state_dir / "cert.pem", state_dir / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    port = free_port()
    daemon = start_kernel(state_dir, "--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert),
                          "--tls-key", str(key))
    try:
        with Client(state_dir / "vfmd.sock") as admin:
            token, _ = admin.token_create("dora")
        with Client(target=f"localhost:{port}", token=token, tls_ca=cert.read_bytes()) as dora:
            assert dora.whoami().tenant == "dora"
            assert dora.spawn("secure").tenant == "dora"
        # Plain-text clients cannot talk to the TLS port.
        with Client(target=f"localhost:{port}", token=token, timeout=3) as plain:
            with pytest.raises(Unavailable):
                plain.ps()
    finally:
        daemon.stop()
