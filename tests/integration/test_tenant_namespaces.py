"""Token tenants and local users are two namespaces: a token made for "root" or "nobody" is not
the Unix user of that name, in either direction (real vfmd and vfm-datad, a second real uid)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from libvfm import Client
from libvfm.errors import InvalidArgument, NotFound
from libvfm.types import MemoryEntry
from tests.conftest import REPO, free_port, serving, start_kernel, wait_for
from tests.integration.test_data_service import start_datad


@pytest.fixture(scope="module")
def stack():
    state = Path(tempfile.mkdtemp(prefix="vfmn", dir="/tmp"))
    os.chmod(state, 0o755)
    port = free_port()
    kernel = start_kernel(state, "--listen", f"127.0.0.1:{port}")
    datad = start_datad(state)
    admin = Client(state / "vfmd.sock")
    wait_for(lambda: serving(admin, "vfm-datad"), 120, "vfm-datad to serve", log=datad.log)
    tokens = {name: admin.token_create(name)[0] for name in ("root", "nobody")}
    clients = {name: Client(target=f"127.0.0.1:{port}", token=token)
               for name, token in tokens.items()}
    yield {"state": state, "admin": admin, "port": port, **{f"token_{n}": c for n, c in clients.items()}}
    for client in (*clients.values(), admin):
        client.close()
    datad.stop()
    kernel.stop()
    shutil.rmtree(state, ignore_errors=True)


def test_a_token_tenant_named_root_does_not_read_uid_0s_processes_or_memory(stack):
    admin, fake = stack["admin"], stack["token_root"]
    assert admin.whoami().tenant == "unix:root"
    assert (fake.whoami().tenant, fake.whoami().admin) == ("root", False)
    pid = admin.spawn("root-secrets").pid
    admin.remember(pid, [MemoryEntry(text="the root password is hunter2")])
    admin.collection_create("root-kb")
    admin.ingest("root-kb", "secret.md", b"# Secret\n\nThe vault code is 7431.\n")

    assert fake.ps(all=True) == []
    with pytest.raises(NotFound):
        fake.get(pid)
    with pytest.raises(NotFound):
        fake.recall(pid, "password")
    assert "root-kb" not in {c.name for c in fake.collections()}
    with pytest.raises(NotFound):
        fake.search("root-kb", "vault code")
    # ...while uid 0 still has all of it.
    assert "hunter2" in admin.recall(pid, "password")[0].entry.text


AS_NOBODY = """
import json, os, sys
from libvfm import Client
from libvfm.errors import VfmError
client = Client(sys.argv[1])  # imports happen as root; the connection is made as nobody
os.setgid(65534); os.setuid(65534)
out = {"whoami": client.whoami().tenant, "ps": [p.pid for p in client.ps(all=True)]}
try:
    client.get(int(sys.argv[2])); out["get"] = "ok"
except VfmError as err:
    out["get"] = type(err).__name__
out["own"] = client.spawn("unix-nobody-bot").pid
print(json.dumps(out))
"""


def test_a_token_tenant_named_nobody_and_the_unix_user_nobody_do_not_see_each_other(stack):
    token_nobody = stack["token_nobody"]
    token_pid = token_nobody.spawn("token-nobody-bot").pid
    done = subprocess.run([sys.executable, "-c", AS_NOBODY, str(stack["state"] / "vfmd.sock"),
                           str(token_pid)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    # the Unix user nobody does not see the token tenant's process...
    assert out["whoami"] == "unix:nobody"
    assert out["ps"] == [] and out["get"] == "NotFound"
    # ...and the token tenant does not see the Unix user's.
    assert [p.pid for p in token_nobody.ps(all=True)] == [token_pid]
    with pytest.raises(NotFound):
        token_nobody.get(out["own"])
    tenants = {p.pid: p.tenant for p in stack["admin"].ps()}
    assert (tenants[token_pid], tenants[out["own"]]) == ("nobody", "unix:nobody")


@pytest.mark.parametrize("name", ["root:x", "unix:", "unix:a b", "a b", "", "x" * 65])
def test_a_token_tenant_name_is_a_plain_name_or_an_explicit_local_user(stack, name):
    with pytest.raises(InvalidArgument, match="tenant"):
        stack["admin"].token_create(name)


def test_a_token_reaches_a_local_users_tenant_only_when_an_admin_names_it_so(stack):
    """The one mapping between the namespaces is explicit and made by an admin: a token for
    "unix:root" (vfm-datad's summaries of a local user's memory work so), never one for "root"."""
    admin = stack["admin"]
    pid = admin.spawn("mapped").pid
    token, _ = admin.token_create("unix:root", label="explicit mapping")
    port = stack["port"]
    with Client(target=f"127.0.0.1:{port}", token=token) as mapped:
        assert (mapped.whoami().tenant, mapped.whoami().admin) == ("unix:root", False)
        assert pid in {p.pid for p in mapped.ps()}
    assert pid not in {p.pid for p in stack["token_root"].ps(all=True)}


def test_tenant_weights_name_either_namespace(stack):
    admin = stack["admin"]
    stack["token_nobody"].spawn("weighed")
    admin.set_tenant_weight("unix:nobody", 2.0)
    admin.set_tenant_weight("nobody", 3.0)
    weights = {t.tenant: t.weight for t in admin.usage().tenants}
    assert weights["nobody"] == 3.0 and weights.get("unix:nobody", 2.0) == 2.0
    with pytest.raises(InvalidArgument, match="tenant"):
        admin.set_tenant_weight("bad tenant!", 1.0)
