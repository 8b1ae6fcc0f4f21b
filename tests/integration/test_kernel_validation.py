"""Bad numbers, times and enums in syscall requests: INVALID_ARGUMENT naming the field, never
INTERNAL, from libvfm and from a raw gRPC caller alike (real vfmd and vfm-datad)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from libvfm import Client
from libvfm.errors import InvalidArgument, NotFound
from libvfm.types import MemoryEntry
from tests.conftest import serving, start_kernel, wait_for
from tests.integration.test_data_service import start_datad
from vfmos.kernel.v1 import kernel_pb2 as pb
from vfmos.kernel.v1 import kernel_pb2_grpc
from vfmos_runtime.credentials import fetch_ticket
from vfmos_runtime.protocol import TICKET_HEADER


@pytest.fixture(scope="module")
def stack():
    state = Path(tempfile.mkdtemp(prefix="vfmv", dir="/tmp"))
    os.chmod(state, 0o755)
    kernel, datad = start_kernel(state), start_datad(state)
    client = Client(state / "vfmd.sock")
    wait_for(lambda: serving(client, "vfm-datad"), 120, "vfm-datad to serve", log=datad.log)
    client.collection_create("kb")
    client.ingest("kb", "refunds.md", b"# Refunds\n\nRefunds take five days.\n")
    pid = client.spawn("probe").pid
    client.remember(pid, [MemoryEntry(text="the refund was approved")])
    yield {"client": client, "pid": pid, "state": state}
    client.close()
    datad.stop()
    kernel.stop()
    shutil.rmtree(state, ignore_errors=True)


# The calls of the hardening issue, as a Python caller writes them.
LIBVFM_CALLS = {
    "search since=1e20": (lambda c, pid: c.search("kb", "refund", since=1e20), "since"),
    "search until=-1": (lambda c, pid: c.search("kb", "refund", until=-1.0), "until"),
    "recall now=nan": (lambda c, pid: c.recall(pid, "x", now=float("nan")), "now"),
    "context now=inf": (lambda c, pid: c.context(pid, "x", now=float("inf")), "now"),
    "remember time=1e13": (lambda c, pid: c.remember(pid, [MemoryEntry(text="t", time=1e13)]),
                           "time"),
    "ingest mtime=nan": (lambda c, pid: c.ingest("kb", "x.md", b"x", mtime=float("nan")),
                         "mtime"),
}


@pytest.mark.parametrize("name", sorted(LIBVFM_CALLS))
def test_bad_times_from_libvfm_are_invalid_argument_naming_the_field(stack, name):
    call, field = LIBVFM_CALLS[name]
    with pytest.raises(InvalidArgument, match=field):
        call(stack["client"], stack["pid"])


def _ts(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


# Requests libvfm would never build, as any gRPC caller can send them.
WIRE_CALLS = {
    "Search since year 31 million": ("Search", lambda pid: pb.SearchRequest(
        collection="kb", query="refund", since=_ts(10**15)), "since"),
    "Search until before 1970": ("Search", lambda pid: pb.SearchRequest(
        collection="kb", query="refund", until=_ts(-10**11)), "until"),
    "Search bad nanos": ("Search", lambda pid: pb.SearchRequest(
        collection="kb", query="refund", since=_ts(1, -5)), "since"),
    "Search k huge": ("Search", lambda pid: pb.SearchRequest(
        collection="kb", query="refund", k=2**31 - 1), "k"),
    "Recall now far future": ("Recall", lambda pid: pb.RecallRequest(
        pid=pid, query="refund", now=_ts(10**14)), "now"),
    "Recall k negative": ("Recall", lambda pid: pb.RecallRequest(
        pid=pid, query="refund", k=-3), "k"),
    "Remember entry time": ("Remember", lambda pid: pb.RememberRequest(
        pid=pid, entries=[pb.MemoryEntry(text="x", time=_ts(10**15))]), "entries[0].time"),
    "GetWorkingSet now": ("GetWorkingSet", lambda pid: pb.GetWorkingSetRequest(
        pid=pid, question="refund", now=_ts(2**62)), "now"),
    "GetProcess pid 0": ("GetProcess", lambda pid: pb.GetProcessRequest(pid=0), "pid"),
    "KillProcess pid negative": ("KillProcess", lambda pid: pb.KillProcessRequest(pid=-7),
                                 "pid"),
    "Spawn cost_budget inf": ("SpawnProcess", lambda pid: pb.SpawnProcessRequest(
        spec=pb.ProcessSpec(name="x", quota=pb.Quota(cost_budget=float("inf")))), "cost_budget"),
    "SetQuota cost_budget nan": ("SetProcessQuota", lambda pid: pb.SetProcessQuotaRequest(
        pid=pid, quota=pb.Quota(cost_budget=float("nan"))), "cost_budget"),
    "Ask ttft_slo negative": ("Ask", lambda pid: pb.AskRequest(
        pid=pid, prompt="hi", ttft_slo=Duration(seconds=-1)), "ttft_slo"),
    "RegisterService pid negative": ("RegisterService", lambda pid: pb.RegisterServiceRequest(
        name="vfm-trustd", address="unix:/tmp/x.sock", pid=-1), "pid"),
    "Ingest unknown kind": ("Ingest", lambda pid: [pb.IngestRequest(
        collection="kb", source="a.md", kind=99, data=b"x")], "kind"),
    "Ingest mtime year 10000": ("Ingest", lambda pid: [pb.IngestRequest(
        collection="kb", source="a.md", mtime=_ts(253402300800), data=b"x")], "mtime"),
}


@pytest.mark.parametrize("name", sorted(WIRE_CALLS))
def test_bad_fields_on_the_wire_are_invalid_argument_naming_the_field(stack, name):
    method, build, field = WIRE_CALLS[name]
    sock = stack["state"] / "vfmd.sock"
    metadata = ((TICKET_HEADER, fetch_ticket(sock)),)
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        rpc = getattr(kernel_pb2_grpc.KernelServiceStub(channel), method)
        request = build(stack["pid"])
        with pytest.raises(grpc.RpcError) as err:
            reply = rpc(iter(request) if isinstance(request, list) else request,
                        metadata=metadata, timeout=10)
            if method == "Ask":
                list(reply)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert field in err.value.details()


def test_good_requests_still_work_after_the_bad_ones(stack):
    client, pid = stack["client"], stack["pid"]
    assert client.search("kb", "refund", since=1.0, until=4102444800.0)
    assert client.recall(pid, "refund", now=1700000000.0)
    assert client.get(pid).state == "READY"


def test_spawn_refuses_a_context_budget_no_working_set_could_have(stack):
    client = stack["client"]
    with pytest.raises(InvalidArgument, match="context_budget"):
        client.spawn("b", context_budget=1_000_000_000)
    assert "b" not in {p.name for p in client.ps()}


def test_the_largest_budget_spawn_accepts_is_one_a_working_set_accepts(stack):
    from kernel.process import MAX_CONTEXT_BUDGET

    client = stack["client"]
    pid = client.spawn("widest", context_budget=MAX_CONTEXT_BUDGET).pid
    assert client.context(pid, "refund").budget == MAX_CONTEXT_BUDGET
    with pytest.raises(InvalidArgument, match="budget"):
        client.context(pid, "refund", budget=MAX_CONTEXT_BUDGET + 1)


def test_an_error_that_echoes_a_huge_input_still_arrives_as_invalid_argument(stack):
    """A refusal quoting a 256 KiB collection name would pass gRPC's 16 KiB trailer limit, and
    the caller would read RESOURCE_EXHAUSTED instead of the error: the message is cut."""
    huge = "c" * (256 * 1024 + 1)
    with pytest.raises(NotFound) as err:  # "no collection 'ccc...'": the name is quoted
        stack["client"].search(huge, "refund")
    assert len(err.value.message) < 2048
    assert "more characters" in err.value.message
    # Non-ASCII travels percent-encoded, three bytes for one: the cut counts bytes, not characters.
    with pytest.raises(NotFound) as err:
        stack["client"].search("日" * 65536, "refund")
    assert "more characters" in err.value.message
