"""The Node.js example (examples/node) talks to a real vfmd: handshake, Spawn, GetProcess."""

from __future__ import annotations

import json
import subprocess

import pytest

from libvfm import Client
from tests.conftest import REPO
from tests.conftest import node_example as run_node_example

EXAMPLE = REPO / "examples" / "node"


@pytest.fixture(scope="module")
def node_example():
    return run_node_example(EXAMPLE, "@grpc/grpc-js")


def test_node_client_spawns_and_reads_back_a_process(node_example, kernel, state_dir):
    sock = state_dir / "vfmd.sock"
    result = subprocess.run([node_example, "client.js", str(sock), "from-node"], cwd=EXAMPLE,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["name"] == "from-node" and shown["state"] == "PROC_STATE_READY"
    with Client(sock) as client:
        assert client.get(shown["pid"]).tenant == shown["tenant"]


def test_node_client_reports_a_missing_kernel(node_example, state_dir):
    result = subprocess.run([node_example, "client.js", str(state_dir / "vfmd.sock")],
                            cwd=EXAMPLE, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "ENOENT" in result.stderr
