"""How the kernel reads a service's refusal (a real gRPC server and call, real LMDB)."""

from __future__ import annotations

import asyncio

import grpc

from kernel.adapters import _service_error
from kernel.registry import ServiceRegistry
from kernel.store import KernelStore
from vfmos_runtime.errors import Unavailable


async def _refused(code: grpc.StatusCode, socket: str) -> grpc.RpcError:
    async def handler(request, context):
        await context.abort(code, "only the kernel may call vfm-datad; go through vfmd")

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "probe.Probe", {"Call": grpc.unary_unary_rpc_method_handler(handler)})])
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            try:
                await channel.unary_unary("/probe.Probe/Call")(b"", timeout=10)
            except grpc.RpcError as exc:
                return exc
        raise AssertionError("the call was not refused")
    finally:
        await server.stop(None)


def test_a_service_refusing_the_kernels_secret_reads_as_unavailable(tmp_path):
    """After a restart a service holds a new secret until it registers again: its refusal
    of the kernel's old one is the service not being back yet, never the caller's fault."""
    async def run():
        store = KernelStore(tmp_path / "kernel.lmdb")
        try:
            registry = ServiceRegistry(store)
            exc = await _refused(grpc.StatusCode.UNAUTHENTICATED, str(tmp_path / "s.sock"))
            err = _service_error(registry, "vfm-datad", exc)
            assert isinstance(err, Unavailable)
            assert "vfm-datad" in err.message and "go through vfmd" not in err.message
            other = await _refused(grpc.StatusCode.NOT_FOUND, str(tmp_path / "t.sock"))
            assert _service_error(registry, "vfm-datad", other).code == grpc.StatusCode.NOT_FOUND
        finally:
            store.close()
    asyncio.run(run())
