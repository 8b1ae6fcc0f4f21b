"""Baseline for the syscall bench: a bare grpc.aio echo server on a Unix socket, no kernel logic."""

from __future__ import annotations

import sys

import grpc
import uvloop

from vfmos.kernel.v1 import kernel_pb2 as pb

METHOD = "/bench.Echo/Ping"


async def serve(path: str) -> None:
    async def ping(request: pb.PingRequest, context) -> pb.PingResponse:
        return pb.PingResponse(payload=request.payload)

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Ping": grpc.unary_unary_rpc_method_handler(
            ping, request_deserializer=pb.PingRequest.FromString,
            response_serializer=pb.PingResponse.SerializeToString)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1]))
