"""Ended processes leave the table after the retention period (`vfmd --reap-after`), also
across a restart, and `ps -a` pages through many of them (real vfmd over its socket)."""

from __future__ import annotations

import grpc
import pytest

from libvfm import Client
from libvfm.errors import NotFound
from tests.conftest import start_kernel, wait_for
from vfmos.kernel.v1 import kernel_pb2 as pb
from vfmos.kernel.v1 import kernel_pb2_grpc
from vfmos_runtime.credentials import fetch_ticket
from vfmos_runtime.protocol import TICKET_HEADER


def test_killed_processes_are_reaped_after_the_retention_period(state_dir):
    kernel = start_kernel(state_dir, "--reap-after", "1")
    try:
        with Client(state_dir / "vfmd.sock") as client:
            live = client.spawn("stays").pid
            killed = [client.spawn(f"gone{i}").pid for i in range(3)]
            for pid in killed:
                client.kill(pid)
            wait_for(lambda: [p.pid for p in client.ps(all=True)] == [live], 30,
                     "the killed processes to be reaped", log=kernel.log)
            for pid in killed:
                with pytest.raises(NotFound):
                    client.get(pid)
            assert client.get(live).state == "READY"
    finally:
        kernel.stop()
    kernel = start_kernel(state_dir)  # the default retention: a day
    try:
        with Client(state_dir / "vfmd.sock") as client:
            assert [p.pid for p in client.ps(all=True)] == [live]  # reaped for good
            assert client.spawn("next").pid > max(killed)  # pids are still never reused
    finally:
        kernel.stop()


def test_ps_all_pages_through_more_processes_than_a_page(kernel, state_dir):
    with Client(state_dir / "vfmd.sock") as client:
        pids = [client.spawn(f"p{i}").pid for i in range(130)]
        for pid in pids[:120]:
            client.kill(pid)
        assert [p.pid for p in client.ps(all=True)] == pids
        assert [p.pid for p in client.ps()] == pids[120:]
    sock = state_dir / "vfmd.sock"
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        stub = kernel_pb2_grpc.KernelServiceStub(channel)
        metadata = ((TICKET_HEADER, fetch_ticket(sock)),)
        first = stub.ListProcesses(pb.ListProcessesRequest(all=True), metadata=metadata)
        assert len(first.processes) == 100 and first.next_page_token
        rest = stub.ListProcesses(pb.ListProcessesRequest(
            all=True, page_token=first.next_page_token), metadata=metadata)
        assert [p.pid for p in (*first.processes, *rest.processes)] == pids
        assert not rest.next_page_token
