"""The one gRPC boundary, over a real in-process channel: VfmError keeps its code and message,
anything else is INTERNAL with an error id, in unary and streaming handlers alike."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from vfmos_runtime.boundary import rpc
from vfmos_runtime.errors import NotFound

log = logging.getLogger("test.boundary")


class Echo:
    @rpc(log)
    async def Unary(self, request: bytes, context) -> bytes:
        if request == b"missing":
            raise NotFound("no such thing")
        if request == b"bug":
            raise KeyError("secret internals")
        return request

    @rpc(log)
    async def Stream(self, request: bytes, context):
        yield b"first"
        if request == b"bug":
            raise RuntimeError("secret internals")
        yield b"second"


async def _serve_and_call(request: bytes, method: str):
    echo = Echo()
    handler = grpc.method_handlers_generic_handler("t.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(echo.Unary),
        "Stream": grpc.unary_stream_rpc_method_handler(echo.Stream)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            if method == "Unary":
                return await channel.unary_unary("/t.Echo/Unary")(request)
            return [m async for m in channel.unary_stream("/t.Echo/Stream")(request)]
    finally:
        await server.stop(0)


def test_unary_values_and_domain_errors_pass_through():
    assert asyncio.run(_serve_and_call(b"hi", "Unary")) == b"hi"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(_serve_and_call(b"missing", "Unary"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "no such thing"


@pytest.mark.parametrize("method", ["Unary", "Stream"])
def test_a_surprise_is_internal_with_an_id_and_no_internals(method, caplog):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(_serve_and_call(b"bug", method))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    details = info.value.details()
    assert "error id" in details and "secret" not in details and "Traceback" not in details
    incident = details.split("error id ")[1].split(";")[0]
    assert any(incident in r.getMessage() and r.exc_info for r in caplog.records)
