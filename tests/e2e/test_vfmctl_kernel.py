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


def test_token_create_with_limits_and_list_shows_them_with_usage(kernel, state_dir):
    made = json.loads(vfmctl(state_dir, "token", "create", "alice", "--max-tokens", "500",
                             "--cost-budget", "1.5", "--requests-per-minute", "60",
                             "--max-concurrent", "2", "--label", "ci", "-o", "json").stdout)
    listed = json.loads(vfmctl(state_dir, "token", "list", "-o", "json").stdout)
    mine = next(t for t in listed if t["token_id"] == made["token_id"])
    assert mine["limits"] == {"max_tokens": 500, "cost_budget": 1.5,
                              "requests_per_minute": 60, "max_concurrent": 2}
    assert (mine["tokens_used"], mine["cost_spent"]) == (0, 0.0)
    table = vfmctl(state_dir, "token", "list").stdout
    row = next(line for line in table.splitlines() if made["token_id"] in line)
    assert row.split()[1:6] == ["alice", "0/500", "0/1.5", "60", "2"]


@pytest.mark.parametrize("flag,value,field", [
    ("--max-tokens", "-1", "max_tokens"),
    ("--cost-budget", "nan", "cost_budget"),
    ("--cost-budget", "1e12", "cost_budget"),
    ("--requests-per-minute", "99999999999", "requests_per_minute"),
    ("--max-concurrent", "-2", "max_concurrent"),
])
def test_token_create_with_a_bad_limit_is_bad_input_in_one_line(kernel, state_dir, flag, value,
                                                                 field):
    done = vfmctl(state_dir, "token", "create", "alice", flag, value, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in done.stderr
    assert json.loads(vfmctl(state_dir, "token", "list", "-o", "json").stdout) == []
