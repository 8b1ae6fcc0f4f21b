"""vfmctl as a user types it against vfmd alone: bad arguments end in a clear error and exit 2."""

from __future__ import annotations

import json

import pytest

from tests.e2e.test_vfmctl import vfmctl


@pytest.fixture
def with_token(kernel, state_dir):
    vfmctl(state_dir, "token", "create", "alice")  # so revoke has a stored id to compare with
    return state_dir


@pytest.mark.parametrize("token_id", ["ü", "0123456789ab\u00e9", "x" * 500, ""])
def test_token_revoke_of_a_malformed_id_is_bad_input(with_token, token_id):
    done = vfmctl(with_token, "token", "revoke", token_id, check=False)
    assert done.returncode == 2, done.stderr
    assert "token_id" in done.stderr and "Traceback" not in done.stderr
    assert "internal" not in done.stderr.lower()
    assert len(vfmctl(with_token, "token", "list", "-o", "json").stdout.strip()) > 2


def test_spawn_with_a_context_budget_no_ask_could_use_is_bad_input(kernel, state_dir):
    done = vfmctl(state_dir, "spawn", "b", "--context-budget", "1000000000", check=False)
    assert done.returncode == 2, done.stderr
    assert "context_budget" in done.stderr and "Traceback" not in done.stderr
    assert vfmctl(state_dir, "ps", "-o", "json").stdout.strip() == "[]"


def test_ps_all_lists_every_process_past_one_page(kernel, state_dir):
    from libvfm import Client

    with Client(state_dir / "vfmd.sock") as client:
        pids = [client.spawn(f"p{i}").pid for i in range(105)]
        for pid in pids[:100]:
            client.kill(pid)
    listed = json.loads(vfmctl(state_dir, "ps", "-a", "-o", "json").stdout)
    assert [p["pid"] for p in listed] == pids
