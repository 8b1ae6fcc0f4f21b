"""Remembering survives vfm-datad's outages: a real vfmd, a real vfm-datad and the fake-fast
model service (bench/fake_modeld.py); vfm-datad (or vfmd) is killed with SIGKILL around an
Ask, restarted, and the exchange is then recalled exactly once. An Ask that ran without its
memory says so in its result."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from libvfm import Client
from tests.conftest import Daemon, serving, start_kernel, wait_for
from tests.e2e.test_vfmctl import vfmctl
from tests.integration.test_data_service import start_datad

SLOW_COMMIT_MS = "2500"


def start_fake_modeld(state: Path) -> Daemon:
    return Daemon(["-m", "bench.fake_modeld", "--socket", str(state / "fake-modeld.sock"),
                   "--kernel-socket", str(state / "vfmd.sock")],
                  state / "logs" / "fake-modeld.log").start()


class Stack:
    def __init__(self, state: Path, kernel_env: dict | None = None):
        self.state, self.kernel_env = state, kernel_env
        self.kernel = start_kernel(state, env=kernel_env)
        self.modeld = start_fake_modeld(state)
        self.datad = start_datad(state)
        self.client = Client(state / "vfmd.sock", timeout=60)
        self.wait_serving()

    def wait_serving(self) -> None:
        wait_for(lambda: serving(self.client, "vfm-modeld") and serving(self.client, "vfm-datad"),
                 120, "the fake vfm-modeld and vfm-datad to serve", log=self.datad.log)

    def restart_datad(self) -> None:
        self.datad = start_datad(self.state)
        self.wait_serving()

    def restart_kernel(self) -> None:
        self.client.close()
        self.kernel = start_kernel(self.state, env=self.kernel_env)
        self.client = Client(self.state / "vfmd.sock", timeout=60)
        self.wait_serving()

    def remembered(self, pid: int, text: str) -> int:
        """How many entries of the process's memory are exactly `text`."""
        return sum(1 for h in self.client.recall(pid, text, k=50) if h.entry.text == text)

    def wait_replayed(self) -> None:
        wait_for(lambda: "every exchange that waited has been delivered" in self.kernel.log(),
                 60, "the outbox to be delivered", log=self.kernel.log)

    def close(self) -> None:
        self.client.close()
        for daemon in (self.datad, self.modeld, self.kernel):
            daemon.stop()


@pytest.fixture
def stack_dir():
    state = Path(tempfile.mkdtemp(prefix="vfmo", dir="/tmp"))
    os.chmod(state, 0o755)
    yield state
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def stack(stack_dir):
    parts = Stack(stack_dir)
    yield parts
    parts.close()


def test_an_ask_during_an_outage_says_so_and_is_remembered_when_datad_is_back(stack):
    pid = stack.client.spawn("patient").pid
    stack.datad.kill9()
    question = "My favourite colour is teal. Say OK."
    result = stack.client.ask(pid, question, max_new_tokens=4)
    assert result.finish_reason == "length" and result.text.strip()
    assert result.memory_unavailable
    assert [d.kind for d in result.degraded] == ["memory-unavailable"]
    assert "vfm-datad" in result.degraded[0].reason
    assert "asking without memory or knowledge" in stack.kernel.log()
    # vfmctl as a user types it: a warning line after the answer, and the field in JSON
    typed = vfmctl(stack.state, "ask", str(pid), "Where did I park?", "--max-new-tokens", "4")
    assert typed.stdout.strip()
    assert "[memory unavailable: vfm-datad not reachable]" in typed.stderr.splitlines()
    as_json = json.loads(vfmctl(stack.state, "ask", str(pid), "Where did I park?",
                                "--max-new-tokens", "4", "-o", "json").stdout)
    assert as_json["degraded"] == [{"kind": "memory-unavailable",
                                    "reason": "vfm-datad not reachable"}]
    stack.restart_datad()
    wait_for(lambda: stack.remembered(pid, question), 60, "the exchange to be remembered",
             log=stack.kernel.log)
    stack.wait_replayed()
    assert stack.remembered(pid, question) == 1
    assert stack.remembered(pid, "Where did I park?") == 2  # vfmctl's two asks
    assert stack.remembered(pid, result.text) == 3  # the fake model's answer to all three
    again = stack.client.ask(pid, "And my favourite animal is the otter.", max_new_tokens=4)
    assert again.degraded == []  # memory is back


def test_datad_killed_during_an_ask_loses_nothing(stack):
    pid = stack.client.spawn("interrupted").pid
    question = "The spare key is under the blue flowerpot. Say OK."
    stream = stack.client.ask_stream(pid, question, max_new_tokens=64)
    assert isinstance(next(stream), str)  # answering: its working set was fetched
    stack.client.suspend(pid)             # hold the answer while vfm-datad dies
    stack.datad.kill9()
    stack.client.resume(pid)
    result = list(stream)[-1]
    assert result.finish_reason == "length"
    assert result.degraded == []  # it had its memory; its exchange waits in the outbox
    stack.restart_datad()
    stack.wait_replayed()
    assert stack.remembered(pid, question) == 1


def test_a_delivery_repeated_after_a_kernel_crash_is_remembered_once(stack_dir):
    # An exchange is delivered once its outbox record is durable, and the record's removal,
    # queued when vfm-datad has answered, is a later transaction: with slow commits it takes
    # seconds, so a SIGKILL as soon as vfm-datad has the exchange leaves the record in place,
    # the restarted kernel delivers the exchange again, and vfm-datad must recognise it.
    stack = Stack(stack_dir, kernel_env={**os.environ, "VFM_SLOW_COMMIT_MS": SLOW_COMMIT_MS})
    try:
        pid = stack.client.spawn("twice").pid
        question = "The boat is called Marigold. Say OK."
        stack.client.ask(pid, question, max_new_tokens=4)
        wait_for(lambda: stack.remembered(pid, question), 10, "the first delivery",
                 log=stack.kernel.log)
        stack.kernel.kill9()
        stack.restart_kernel()
        assert "1 exchanges wait to be remembered" in stack.kernel.log()  # it is replayed
        stack.wait_replayed()
        assert stack.remembered(pid, question) == 1
    finally:
        stack.close()
