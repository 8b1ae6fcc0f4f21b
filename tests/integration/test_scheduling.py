"""The scheduler with the real model and two tenants: fair share vs fifo order, priorities."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from libvfm import Client
from tests.conftest import Daemon, free_port, serving, start_kernel, wait_for


class Stack:
    def __init__(self, *kernel_args: str):
        self.state = Path(tempfile.mkdtemp(prefix="vfmq", dir="/tmp"))
        os.chmod(self.state, 0o755)
        self.port = free_port()
        self.kernel = start_kernel(self.state, "--listen", f"127.0.0.1:{self.port}", *kernel_args)
        self.modeld = Daemon(["-m", "services.model.main", "--state-dir", str(self.state),
                              "--kernel-socket", str(self.state / "vfmd.sock")],
                             self.state / "logs" / "vfm-modeld.log").start()
        self.admin = Client(self.state / "vfmd.sock")
        wait_for(lambda: serving(self.admin, "vfm-modeld"), 300, "vfm-modeld",
                 log=self.modeld.log)

    def tenant(self, name: str):
        """A factory of clients that act as tenant `name` (over TCP, with a bearer token)."""
        token, _ = self.admin.token_create(name)
        return lambda: Client(target=f"127.0.0.1:{self.port}", token=token)

    def close(self) -> None:
        self.admin.close()
        self.modeld.stop()
        self.kernel.stop()
        shutil.rmtree(self.state, ignore_errors=True)


def _run_flood(stack: Stack) -> list[str]:
    """Tenant hog queues three asks on one slot; then tenant lite asks once. Returns who
    got their first token in which order."""
    order: list[str] = []
    lock = threading.Lock()

    def ask(client_factory, pid, label, tokens):
        with client_factory() as c:
            for item in c.ask_stream(pid, "Write a long story about a dragon.",
                                     max_new_tokens=tokens):
                with lock:
                    if label not in order:
                        order.append(label)

    # Each thread needs its own client; a tenant is its token.
    hog, lite = stack.tenant("hog"), stack.tenant("lite")
    with hog() as c:
        hog_pid = c.spawn("hog").pid
    with lite() as c:
        lite_pid = c.spawn("lite").pid
    threads = [threading.Thread(target=ask, args=(hog, hog_pid, f"hog{i}", 40)) for i in range(3)]
    for i, t in enumerate(threads):
        t.start()
        wait_for(lambda: stack.admin.usage().running + stack.admin.usage().queued >= i + 1, 30,
                 "the hog's asks to queue")
    wait_for(lambda: "hog0" in order, 60, "the first hog ask to start")
    lite_thread = threading.Thread(target=ask, args=(lite, lite_pid, "lite", 5))
    lite_thread.start()
    for t in (*threads, lite_thread):
        t.join(120)
    return order


@pytest.mark.parametrize("policy,expected_lite_position", [("fair", 1), ("fifo", 3)])
def test_fair_share_lets_a_light_tenant_overtake_a_flood(policy, expected_lite_position):
    stack = Stack("--max-slots", "1", "--policy", policy)
    try:
        order = _run_flood(stack)
        assert sorted(order) == ["hog0", "hog1", "hog2", "lite"]
        assert order.index("lite") == expected_lite_position, order
        usage = stack.admin.usage()
        assert usage.policy == policy and usage.capacity == 1
        by_tenant = {t.tenant: t for t in usage.tenants}
        assert by_tenant["hog"].counters.asks == 3 and by_tenant["lite"].counters.asks == 1
        assert by_tenant["hog"].counters.queue_ms > 0
    finally:
        stack.close()
