"""The contract as a plain-grpcio integrator meets it: reflection v1, pages, error details."""

from __future__ import annotations

import asyncio

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection_pb2

from libvfm import Client
from vfmos_runtime.credentials import fetch_ticket
from vfmos_runtime.errors import QuotaExceeded, to_status
from vfmos.kernel.v1 import kernel_pb2 as pb
from vfmos.kernel.v1 import kernel_pb2_grpc

V1_REFLECTION = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


def _reflect(channel, *requests):
    """Speak reflection v1 (wire-identical to v1alpha but for the service name)."""
    call = channel.stream_stream(
        V1_REFLECTION, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    return list(call(iter(requests), timeout=10))


def test_reflection_v1_lists_and_describes_the_kernel(kernel, state_dir):
    with grpc.insecure_channel(f"unix:{state_dir / 'vfmd.sock'}") as channel:
        listed, described = _reflect(
            channel, reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="vfmos.kernel.v1.KernelService"))
    names = {s.name for s in listed.list_services_response.service}
    assert {"vfmos.kernel.v1.KernelService", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert described.file_descriptor_response.file_descriptor_proto  # grpcurl can decode calls


def _raw_stub(state_dir):
    channel = grpc.insecure_channel(f"unix:{state_dir / 'vfmd.sock'}")
    ticket = fetch_ticket(state_dir / "vfmd.sock")
    return channel, kernel_pb2_grpc.KernelServiceStub(channel), (("x-vfm-ticket", ticket),)


def test_list_processes_pages_with_an_opaque_token(kernel, state_dir):
    channel, stub, meta = _raw_stub(state_dir)
    with channel:
        pids = [stub.SpawnProcess(pb.SpawnProcessRequest(spec=pb.ProcessSpec(name=f"p{i}")),
                                  metadata=meta).process.pid for i in range(5)]
        pages, token = [], ""
        while True:
            reply = stub.ListProcesses(pb.ListProcessesRequest(page_size=2, page_token=token),
                                       metadata=meta)
            pages.append([p.pid for p in reply.processes])
            token = reply.next_page_token
            if not token:
                break
        assert pages == [pids[0:2], pids[2:4], pids[4:5]]
        for bad in (pb.ListProcessesRequest(page_size=1001),
                    pb.ListProcessesRequest(page_token="not-a-token")):
            try:
                stub.ListProcesses(bad, metadata=meta)
                raise AssertionError("a bad page request was accepted")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_libvfm_follows_pages_so_ps_and_token_list_are_whole(kernel, state_dir):
    with Client(state_dir / "vfmd.sock") as client:
        spawned = [client.spawn(f"many{i}").pid for i in range(105)]  # > one default page
        ids = {client.token_create(f"t{i}")[1] for i in range(3)}
        assert [p.pid for p in client.ps()] == spawned
        assert {t.token_id for t in client.token_list()} == ids
    channel, stub, meta = _raw_stub(state_dir)
    with channel:
        first = stub.ListTokens(pb.ListTokensRequest(page_size=2), metadata=meta)
        rest = stub.ListTokens(pb.ListTokensRequest(page_size=2, page_token=first.next_page_token),
                               metadata=meta)
    assert len(first.tokens) == 2 and len(rest.tokens) == 1 and not rest.next_page_token


def test_quota_refusal_details_reach_a_raw_grpcio_client(tmp_path):
    """QuotaFailure and ErrorInfo travel in grpc-status-details-bin, as any language reads it."""
    async def refuse(request, context):
        await context.abort_with_status(
            to_status(QuotaExceeded("process 4 has used its budget", "max_tokens", "pid 4")))

    async def scenario():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "vfmos.kernel.v1.KernelService", {"Ping": grpc.unary_unary_rpc_method_handler(
                refuse, request_deserializer=pb.PingRequest.FromString,
                response_serializer=pb.PingResponse.SerializeToString)}),))
        server.add_insecure_port(f"unix:{tmp_path / 'q.sock'}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{tmp_path / 'q.sock'}") as channel:
                try:
                    await kernel_pb2_grpc.KernelServiceStub(channel).Ping(pb.PingRequest())
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.trailing_metadata()
        finally:
            await server.stop(0)

    code, trailers = asyncio.run(scenario())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    raw = dict(trailers)["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    info, failure = error_details_pb2.ErrorInfo(), error_details_pb2.QuotaFailure()
    kinds = {d.type_url.rsplit("/", 1)[-1] for d in status.details}
    assert kinds == {"google.rpc.ErrorInfo", "google.rpc.QuotaFailure"}
    for detail in status.details:
        detail.Unpack(info) or detail.Unpack(failure)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "QUOTA_MAX_TOKENS", "vfmos.dev", {"quota": "max_tokens", "subject": "pid 4"})
    assert failure.violations[0].description == "max_tokens"
