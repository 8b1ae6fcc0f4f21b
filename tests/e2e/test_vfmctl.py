"""vfmctl as a user types it: up, spawn, ps, ask, inspect, suspend/resume, kill, status, down."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

VFMCTL = [sys.executable, "-m", "vfmctl.main"]


def vfmctl(state_dir, *args, check=True, timeout=300):
    done = subprocess.run([*VFMCTL, *args, "--state-dir", str(state_dir)], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"vfmctl {' '.join(args)} -> {done.returncode}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import tempfile
    state = tempfile.mkdtemp(prefix="vfme", dir="/tmp")
    vfmctl(state, "up", "--detach", timeout=900)
    yield state
    vfmctl(state, "down", check=False)


def test_status_lists_every_daemon_serving(stack):
    out = json.loads(vfmctl(stack, "status", "-o", "json").stdout)
    by_name = {d["name"]: d for d in out}
    assert set(by_name) >= {"vfmd", "vfm-modeld", "vfm-datad", "vfm-gatewayd"}
    assert by_name["vfm-gatewayd"]["address"].startswith("http://127.0.0.1:")
    for d in by_name.values():
        assert d["health"] == "SERVING" and d["pid"] > 0 and d["rss_mb"] > 0 and d["uptime_s"] > 0


def test_the_openai_gateway_serves_a_token_made_by_vfmctl(stack):
    import getpass

    import openai
    from pathlib import Path
    proc = json.loads(vfmctl(stack, "spawn", "openai-bot", "-o", "json").stdout)
    key = vfmctl(stack, "token", "create", f"unix:{getpass.getuser()}").stdout.strip()
    base = (Path(stack) / "gateway.addr").read_text().strip() + "/v1"
    sdk = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
    assert "openai-bot" in [m.id for m in sdk.models.list()]
    reply = sdk.chat.completions.create(model="openai-bot", max_tokens=6,
                                        messages=[{"role": "user", "content": "Hi."}])
    assert reply.choices[0].message.content.strip()
    assert reply.model_extra["vfm"]["pid"] == proc["pid"]


def test_second_up_is_a_no_op(stack):
    done = vfmctl(stack, "up", "--detach")
    assert "already running" in done.stderr


def test_process_lifecycle_and_streamed_answer(stack):
    proc = json.loads(vfmctl(stack, "spawn", "e2e-bot", "--priority", "25", "--max-tokens",
                             "4000", "-o", "json").stdout)
    pid = str(proc["pid"])
    assert proc["spec"]["priority"] == 25 and proc["state"] == "READY"
    listed = json.loads(vfmctl(stack, "ps", "-o", "json").stdout)
    assert pid in {str(p["pid"]) for p in listed}

    answer = vfmctl(stack, "ask", pid, "What is 2 plus 2? Answer briefly.",
                    "--max-new-tokens", "12")
    assert answer.stdout.strip(), answer.stderr
    assert "12 out" in answer.stderr or "out" in answer.stderr

    detail = json.loads(vfmctl(stack, "inspect", pid, "-o", "json").stdout)
    assert detail["counters"]["asks"] == 1 and 0 < detail["counters"]["tokens_out"] <= 12
    assert detail["counters"]["tokens_in"] > 0

    assert json.loads(vfmctl(stack, "suspend", pid, "-o", "json").stdout)["state"] == "SUSPENDED"
    refused = vfmctl(stack, "ask", pid, "still there?", check=False)
    assert refused.returncode == 7 and "SUSPENDED" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert json.loads(vfmctl(stack, "resume", pid, "-o", "json").stdout)["state"] == "READY"
    assert json.loads(vfmctl(stack, "kill", pid, "-o", "json").stdout)["state"] == "KILLED"
    assert pid not in {str(p["pid"]) for p in json.loads(vfmctl(stack, "ps", "-o", "json").stdout)}
    assert pid in {str(p["pid"]) for p in
                   json.loads(vfmctl(stack, "ps", "-a", "-o", "json").stdout)}


@pytest.mark.parametrize("args,code,text", [
    (("kill", "424242"), 3, "no process with pid 424242"),
    (("spawn", "bad name"), 2, "bad process name"),
    (("spawn", "ok", "--max-tokens", "-3"), 2, "max_tokens"),
    (("spawn", "ok", "--priority", "77"), 2, "priority"),
    (("inspect", "nosuchname"), 3, "no live process named"),
    (("search", "no-such-collection", "anything"), 3, "no-such-collection"),
    (("remember", "1", "text", "--time", "yesterday-ish"), 2, "ISO 8601"),
    (("ingest", "kb", "/no/such/file"), 2, "no such file"),
    (("spawn", "ok", "--quality", "0.5"), 2, "need --model auto"),
    (("feedback", "0" * 24, "up"), 3, "no Ask with id"),
])
def test_errors_are_one_line_with_exit_codes(stack, args, code, text):
    done = vfmctl(stack, *args, check=False)
    assert done.returncode == code
    assert text in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_every_command_has_help():
    for cmd in ("up", "down", "status", "spawn", "ps", "kill", "suspend", "resume", "inspect",
                "ask", "whoami", "token", "collection", "ingest", "search", "remember",
                "recall", "context", "fork", "route", "feedback"):
        done = subprocess.run([*VFMCTL, cmd, "--help"], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0 and "usage: vfmctl" in done.stdout


def test_no_daemon_gives_a_clear_error(tmp_path):
    done = subprocess.run([*VFMCTL, "ps", "--socket", str(tmp_path / "none.sock")],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 6 and "vfmctl up" in done.stderr and "Traceback" not in done.stderr


def test_socket_found_through_environment(stack):
    env = {**os.environ, "VFM_STATE_DIR": stack}
    done = subprocess.run([*VFMCTL, "whoami", "-o", "json"], capture_output=True, text=True,
                          cwd=REPO, env=env)
    assert done.returncode == 0 and json.loads(done.stdout)["tenant"] == "unix:root"
    env = {**os.environ, "VFM_SOCKET": os.path.join(stack, "vfmd.sock")}
    done = subprocess.run([*VFMCTL, "whoami"], capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0 and "root" in done.stdout


def test_knowledge_and_memory_as_typed(stack, tmp_path):
    docs = tmp_path / "kb"
    (docs / "faq").mkdir(parents=True)
    (docs / "faq" / "returns.md").write_text("# Returns\n\nReturns are free within 60 days.\n")
    (docs / "plans.csv").write_text("plan,price\nbasic,5 EUR\npro,12 EUR\n")
    (docs / ".hidden").write_text("never ingested")
    vfmctl(stack, "collection", "create", "support", "--description", "support KB")
    done = vfmctl(stack, "ingest", "support", str(docs))
    assert "2 file(s) into support" in done.stdout, done.stdout
    listed = json.loads(vfmctl(stack, "collection", "list", "-o", "json").stdout)
    assert [c["sources"] for c in listed if c["name"] == "support"] == [2]
    hits = json.loads(vfmctl(stack, "search", "support", "how many days to return",
                             "-o", "json").stdout)
    assert "60 days" in hits[0]["text"] and hits[0]["source"].endswith("returns.md")
    assert "60 days" in vfmctl(stack, "search", "support", "return days").stdout

    pid = str(json.loads(vfmctl(stack, "spawn", "memo", "--collection", "support",
                                "-o", "json").stdout)["pid"])
    vfmctl(stack, "remember", pid, "Caroline went to the support group on Monday",
           "--speaker", "Caroline", "--time", "2023-05-08T13:56", "--meta", "dia_id=D1:3")
    recalled = json.loads(vfmctl(stack, "recall", pid, "support group", "-o", "json").stdout)
    assert recalled[0]["entry"]["speaker"] == "Caroline"
    assert recalled[0]["entry"]["meta"] == {"dia_id": "D1:3"}
    ws = json.loads(vfmctl(stack, "context", pid, "--question", "when can I return things?",
                           "--budget", "300", "-o", "json").stdout)
    kinds = {i["kind"] for i in ws["items"]}
    assert ws["used"] <= 300 and "knowledge" in kinds and kinds & {"memory", "recent"}
    table = vfmctl(stack, "context", pid, "--question", "support group").stdout
    assert "mem:0" in table and "tokens" in table
    child = json.loads(vfmctl(stack, "fork", pid, "--name", "memo-2", "-o", "json").stdout)
    assert child["spec"]["collections"] == ["support"]
    shared = json.loads(vfmctl(stack, "recall", str(child["pid"]), "support group",
                               "-o", "json").stdout)
    assert shared and shared[0]["entry"]["text"].startswith("Caroline went")
    removed = vfmctl(stack, "collection", "rm-source", "support", str(docs / "plans.csv"))
    assert "removed" in removed.stdout


def test_routing_as_typed(stack):
    """spawn --model auto, an Ask that names the model it was routed to and its ask id, the
    router's explanation, and feedback on that ask id."""
    import re
    proc = json.loads(vfmctl(stack, "spawn", "routed", "--model", "auto", "--quality", "0.1",
                             "--allow-models", "smollm2-135m,gemma3-270m", "-o", "json").stdout)
    assert proc["spec"]["model"] == "auto" and proc["spec"]["route"]["quality"] == 0.1
    done = vfmctl(stack, "ask", "routed", "Name a colour.", "--max-new-tokens", "4")
    assert "smollm2-135m (routed: cheapest" in done.stderr
    ask_id = re.search(r"ask ([0-9a-f]{24})\]", done.stderr).group(1)
    explained = json.loads(vfmctl(stack, "route", "explain", "routed", "Name a colour.",
                                  "-o", "json").stdout)
    assert explained["model"] == "smollm2-135m"
    assert {c["model"] for c in explained["candidates"]} == {"smollm2-135m", "gemma3-270m"}
    assert "quality 0.1 of the best" in vfmctl(stack, "inspect", "routed").stdout
    recorded = vfmctl(stack, "feedback", ask_id, "up", "--note", "fine")
    assert "recorded (audit seq" in recorded.stdout
    again = vfmctl(stack, "feedback", ask_id, "down", check=False)
    assert again.returncode != 0 and "already has your feedback" in again.stderr


def test_a_cascade_and_the_model_list_as_typed(stack):
    """spawn --cascade: an unsure first answer is escalated and the Ask says so; `model list`
    shows the registered models and `model jobs` the (empty) job list; an adapter job without
    logged exchanges is refused with the reason."""
    vfmctl(stack, "spawn", "cascaded", "--model", "auto", "--quality", "0",
           "--allow-models", "smollm2-135m,gemma3-270m", "--cascade", "0.999")
    assert "cascade below confidence 0.999" in vfmctl(stack, "inspect", "cascaded").stdout
    done = vfmctl(stack, "ask", "cascaded", "Name a colour.", "--max-new-tokens", "6")
    assert "gemma3-270m (routed:" in done.stderr and "smollm2-135m escalated" in done.stderr
    models = json.loads(vfmctl(stack, "model", "list", "-o", "json").stdout)
    assert {"smollm2-135m", "gemma3-270m"} <= {m["name"] for m in models}
    engines = {m["name"]: m["engine"] for m in models if m["loaded"]}
    assert engines["smollm2-135m"] == engines["gemma3-270m"] == "llama.cpp"
    assert "llama.cpp" in vfmctl(stack, "model", "list").stdout
    assert "no adapter jobs" in vfmctl(stack, "model", "jobs").stdout
    refused = vfmctl(stack, "model", "adapt", "mine", "--from-tenant-log", check=False)
    assert refused.returncode != 0 and "audit.store_text" in refused.stderr
    vfmctl(stack, "spawn", "calibrated", "--model", "auto", "--cascade-rate", "0.1")
    shown = " ".join(vfmctl(stack, "inspect", "calibrated").stdout.split())  # wrapped cells
    assert "cascade of the least sure 10%" in shown
    bad = vfmctl(stack, "spawn", "x", "--cascade", "0.5", check=False)
    assert bad.returncode != 0 and "need --model auto" in bad.stderr
