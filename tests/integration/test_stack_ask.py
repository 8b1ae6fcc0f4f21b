"""vfmd with the real vfm-modeld (tiny real model): streamed asks, quotas, preemption, outages."""

from __future__ import annotations

import threading
import time

import pytest

from libvfm import Client, Quota
from libvfm.errors import FailedPrecondition, NotFound, QuotaExceeded, Unavailable
from libvfm.types import AskResult
from tests.conftest import Daemon, serving, start_kernel, wait_for


def start_modeld(state_dir, *extra: str) -> Daemon:
    daemon = Daemon(["-m", "services.model.main", "--state-dir", str(state_dir),
                     "--kernel-socket", str(state_dir / "vfmd.sock"), *extra],
                    state_dir / "logs" / "vfm-modeld.log").start()
    return daemon


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import os
    import shutil
    import tempfile
    from pathlib import Path
    state = Path(tempfile.mkdtemp(prefix="vfms", dir="/tmp"))
    os.chmod(state, 0o755)
    kernel = start_kernel(state)
    # A remote model whose server is down: its failures must not take vfm-modeld down.
    models = state / "models.json"
    models.write_text('{"models": [{"name": "remote-gone", "backend": "openai", '
                      '"base_url": "http://127.0.0.1:9/v1", "remote_model": "x"}]}')
    modeld = start_modeld(state, "--models", str(models))
    client = Client(state / "vfmd.sock")
    wait_for(lambda: serving(client, "vfm-modeld"), 600, "vfm-modeld to serve", log=modeld.log)
    parts = {"state": state, "kernel": kernel, "modeld": modeld, "client": client,
             "models": models}
    yield parts
    client.close()
    parts["modeld"].stop()  # the tests may have replaced either daemon
    parts["kernel"].stop()
    shutil.rmtree(state, ignore_errors=True)


def test_answer_streams_in_pieces_and_is_accounted(stack):
    client = stack["client"]
    pid = client.spawn("streamer").pid
    items = list(client.ask_stream(pid, "Name three colours.", max_new_tokens=16))
    pieces, result = items[:-1], items[-1]
    assert isinstance(result, AskResult) and len(pieces) >= 3
    assert "".join(pieces) == result.text and result.text.strip()
    assert 0 < result.usage.tokens_out <= 16 and result.usage.tokens_in > 0
    assert result.usage.ttft_ms > 0 and result.usage.total_ms >= result.usage.ttft_ms
    proc = client.get(pid)
    assert proc.counters.tokens_out == result.usage.tokens_out
    assert proc.counters.tokens_in == result.usage.tokens_in and proc.counters.asks == 1
    assert proc.state == "READY"


def test_greedy_answers_are_deterministic(stack):
    client = stack["client"]
    pid = client.spawn("det").pid
    a = client.ask(pid, "What is the capital of France?", max_new_tokens=10)
    b = client.ask(pid, "What is the capital of France?", max_new_tokens=10)
    assert a.text == b.text


def test_token_budget_is_never_exceeded(stack):
    client = stack["client"]
    first = client.ask(client.spawn("probe").pid, "Tell me a story.", max_new_tokens=4)
    budget = first.usage.tokens_in + 6   # room for exactly 6 new tokens
    pid = client.spawn("capped", quota=Quota(max_tokens=budget)).pid
    result = client.ask(pid, "Tell me a story.", max_new_tokens=50)
    assert result.usage.tokens_out == 6 and result.finish_reason == "quota"
    proc = client.get(pid)
    assert proc.counters.tokens_in + proc.counters.tokens_out == budget
    with pytest.raises(QuotaExceeded) as info:
        client.ask(pid, "More?")
    assert info.value.quota == "max_tokens"


def test_max_concurrent_quota(stack):
    client = stack["client"]
    pid = client.spawn("one-at-a-time", quota=Quota(max_concurrent=1)).pid
    stream = client.ask_stream(pid, "Count to twenty.", max_new_tokens=40)
    next(stream)  # the first ask is running
    with Client(stack["state"] / "vfmd.sock") as other:
        with pytest.raises(QuotaExceeded) as info:
            other.ask(pid, "And me?", max_new_tokens=2)
    assert info.value.quota == "max_concurrent"
    for _ in stream:
        pass


def test_kill_stops_a_streaming_answer(stack):
    client = stack["client"]
    pid = client.spawn("doomed").pid
    seen: list = []

    def ask():
        with Client(stack["state"] / "vfmd.sock") as c:
            for item in c.ask_stream(pid, "Write a long essay about the sea.", max_new_tokens=400):
                seen.append(item)

    thread = threading.Thread(target=ask)
    thread.start()
    wait_for(lambda: len(seen) >= 3, 60, "the answer to start")
    client.kill(pid)
    thread.join(30)
    assert not thread.is_alive()
    result = seen[-1]
    assert isinstance(result, AskResult) and result.finish_reason == "killed"
    assert result.usage.tokens_out < 400
    assert client.get(pid).state == "KILLED"
    with pytest.raises(FailedPrecondition):
        client.ask(pid, "hello?")


def test_running_process_comes_back_ready_after_kernel_kill9(stack):
    client = stack["client"]
    pid = client.spawn("interrupted").pid
    started = threading.Event()

    def ask():
        try:
            with Client(stack["state"] / "vfmd.sock") as c:
                for _ in c.ask_stream(pid, "Describe the history of Rome.", max_new_tokens=300):
                    started.set()
        except Exception:
            pass  # the kernel dies under it: that is the point

    thread = threading.Thread(target=ask)
    thread.start()
    assert started.wait(60)
    assert client.get(pid).state == "RUNNING"
    stack["kernel"].kill9()
    stack["kernel"] = start_kernel(stack["state"])
    thread.join(30)
    assert client.get(pid).state == "READY"
    # The service re-registers with the new kernel by itself and asks work again.
    wait_for(lambda: serving(client, "vfm-modeld"), 30, "vfm-modeld to re-register")
    assert client.ask(pid, "Still there?", max_new_tokens=3).usage.tokens_out > 0


def test_model_service_outage_is_unavailable_then_recovers(stack):
    client = stack["client"]
    pid = client.spawn("patient").pid
    stack["modeld"].kill9()
    wait_for(lambda: not serving(client, "vfm-modeld"), 10, "the kernel to notice the outage")
    with pytest.raises(Unavailable, match="vfm-modeld"):
        client.ask(pid, "Anyone?")
    assert client.get(pid).state == "READY"
    status = {d.name: d.health for d in client.services()}
    assert status["vfm-modeld"] in ("UNREACHABLE", "NOT_SERVING")
    stack["modeld"] = start_modeld(stack["state"], "--models", str(stack["models"]))
    wait_for(lambda: serving(client, "vfm-modeld"), 120, "vfm-modeld to come back",
             log=stack["modeld"].log)
    assert client.ask(pid, "Back?", max_new_tokens=3).usage.tokens_out > 0


def test_a_remote_backend_down_leaves_the_model_service_up(stack):
    client = stack["client"]
    remote = client.spawn("remote-user", model="remote-gone").pid
    local = client.spawn("local-user").pid
    with pytest.raises(Unavailable):
        client.ask(remote, "hello?", max_new_tokens=3)
    # At once, not after the next health check: the local model never stopped serving.
    assert client.ask(local, "Still fine?", max_new_tokens=3).usage.tokens_out > 0
    assert serving(client, "vfm-modeld")


def test_unknown_model_is_a_clear_error(stack):
    client = stack["client"]
    pid = client.spawn("picky", model="no-such-model").pid
    with pytest.raises(NotFound, match="unknown model 'no-such-model'"):
        client.ask(pid, "hi")
    assert client.get(pid).state == "READY"


def test_question_bigger_than_the_budget_left_is_refused_and_not_charged(stack):
    client = stack["client"]
    pid = client.spawn("tiny-budget", quota=Quota(max_tokens=20)).pid
    with pytest.raises(QuotaExceeded, match="has only 20 left") as info:
        client.ask(pid, "Please explain, in detail, how rainbows form after a storm.")
    assert info.value.quota == "max_tokens"
    counters = client.get(pid).counters
    assert counters.tokens_in == 0 and counters.tokens_out == 0


def test_cost_is_accounted_at_the_model_price(stack):
    client = stack["client"]
    pid = client.spawn("payer").pid
    result = client.ask(pid, "Say hi.", max_new_tokens=4)
    tokens = result.usage.tokens_in + result.usage.tokens_out
    assert result.usage.model == "smollm2-135m"
    assert result.usage.cost == pytest.approx(tokens / 1000 * 0.01)
    assert client.get(pid).counters.cost == pytest.approx(result.usage.cost)


def _stream_in_thread(state, pid, prompt, tokens):
    seen: list = []

    def run():
        with Client(state / "vfmd.sock") as c:
            for item in c.ask_stream(pid, prompt, max_new_tokens=tokens):
                seen.append(item)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, seen


def test_suspend_pauses_and_resume_continues_the_same_answer(stack):
    client = stack["client"]
    prompt = "Explain how a bicycle works."
    reference = client.ask(client.spawn("reference").pid, prompt, max_new_tokens=30)
    pid = client.spawn("pausable").pid
    thread, seen = _stream_in_thread(stack["state"], pid, prompt, 30)
    wait_for(lambda: len(seen) >= 5, 60, "the answer to start")
    assert client.suspend(pid).state == "SUSPENDED"
    time.sleep(0.3)  # a step in flight may still land
    paused_at = len(seen)
    time.sleep(1.0)
    assert len(seen) == paused_at, "generation went on while suspended"
    assert client.get(pid).state == "SUSPENDED"
    client.resume(pid)
    thread.join(60)
    result = seen[-1]
    assert isinstance(result, AskResult) and result.finish_reason == reference.finish_reason
    assert result.usage.tokens_out == reference.usage.tokens_out
    assert result.text == reference.text  # a context switch, not a restart


def test_kill_while_suspended_ends_the_answer(stack):
    client = stack["client"]
    pid = client.spawn("frozen").pid
    thread, seen = _stream_in_thread(stack["state"], pid, "Count from one to fifty.", 60)
    wait_for(lambda: len(seen) >= 3, 60, "the answer to start")
    client.suspend(pid)
    client.kill(pid)
    thread.join(30)
    assert isinstance(seen[-1], AskResult) and seen[-1].finish_reason == "killed"


def test_tokens_per_minute_and_cost_budget_are_enforced(stack):
    client = stack["client"]
    pid = client.spawn("rate-limited", quota=Quota(tokens_per_minute=30)).pid
    client.ask(pid, "Say something.", max_new_tokens=8)  # ~40 tokens: the bucket is in debt
    with pytest.raises(QuotaExceeded, match="tokens/minute") as info:
        client.ask(pid, "Again?", max_new_tokens=2)
    assert info.value.quota == "tokens_per_minute"
    pid = client.spawn("frugal", quota=Quota(cost_budget=0.0001)).pid
    client.ask(pid, "Say something.", max_new_tokens=4)  # ~35 tokens at 0.01/1k = 0.00035
    with pytest.raises(QuotaExceeded) as info:
        client.ask(pid, "Again?", max_new_tokens=2)
    assert info.value.quota == "cost_budget"
    detail = client.get(pid)
    assert detail.counters.cost >= 0.0001 and detail.counters.asks == 1
