"""Only the kernel may call a service: a local client that reaches vfm-datad's or vfm-modeld's
socket directly is refused, while the same calls through vfmd work."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libvfm import Client
from tests.conftest import Daemon, start_kernel, wait_for
from vfmos.data.v1 import data_pb2, data_pb2_grpc
from vfmos.model.v1 import model_pb2, model_pb2_grpc
from vfmos_runtime.protocol import KERNEL_SECRET_HEADER


@pytest.fixture(scope="module")
def stack():
    state = Path(tempfile.mkdtemp(prefix="vfmg", dir="/tmp"))
    os.chmod(state, 0o755)
    kernel = start_kernel(state)
    common = ["--state-dir", str(state), "--kernel-socket", str(state / "vfmd.sock")]
    datad = Daemon(["-m", "services.data.main", *common, "--summary-pages", "0"],
                   state / "logs" / "vfm-datad.log").start()
    modeld = Daemon(["-m", "services.model.main", *common, "--no-preload"],
                    state / "logs" / "vfm-modeld.log").start()
    client = Client(state / "vfmd.sock")
    up = lambda: {d.name for d in client.services() if d.health == "SERVING"}
    wait_for(lambda: {"vfm-datad", "vfm-modeld"} <= up(), 180, "both services to serve",
             log=lambda: datad.log() + modeld.log())
    yield state, client
    client.close()
    for daemon in (modeld, datad, kernel):
        daemon.stop()


async def _direct(sock: Path, metadata=()):
    """Calls a local program would make on a service's own socket, bypassing vfmd."""
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        codes = {}
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        codes["health"] = health.status
        for name, call in _calls(channel, metadata):
            try:
                await call()
                codes[name] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                codes[name] = exc.code()
        return codes


def _calls(channel, metadata):
    data = data_pb2_grpc.DataServiceStub(channel)
    model = model_pb2_grpc.ModelServiceStub(channel)

    async def generate():
        async for _ in model.Generate(model_pb2.GenerateRequest(
                messages=[model_pb2.ChatMessage(role=model_pb2.ROLE_USER, content="hi")],
                max_new_tokens=1),
                metadata=metadata):
            pass

    async def ingest():
        async def parts():
            yield data_pb2.IngestRequest(tenant="bob", collection="c", source="s", data=b"x")
        await data.Ingest(parts(), metadata=metadata)

    return [("list_collections", lambda: data.ListCollections(
                data_pb2.ListCollectionsRequest(tenant="bob"), metadata=metadata)),
            ("ingest", ingest),
            ("list_models", lambda: model.ListModels(model_pb2.ListModelsRequest(),
                                                     metadata=metadata)),
            ("generate", generate)]


@pytest.mark.parametrize("sock, calls", [("datad.sock", ("list_collections", "ingest")),
                                         ("modeld.sock", ("list_models", "generate"))])
@pytest.mark.parametrize("metadata", [(), ((KERNEL_SECRET_HEADER, "guessed"),)])
def test_a_direct_caller_is_refused_but_health_answers(stack, sock, calls, metadata):
    state, _ = stack
    codes = asyncio.run(_direct(state / sock, metadata))
    assert codes["health"] == health_pb2.HealthCheckResponse.SERVING
    for name in calls:
        assert codes[name] == grpc.StatusCode.UNAUTHENTICATED, name


def test_the_kernel_is_admitted(stack):
    _, client = stack
    client.collection_create("notes")
    assert [c.name for c in client.collections()] == ["notes"]
    pid = client.spawn("gate").pid
    assert client.ask(pid, "Say hi.", max_new_tokens=2, stateless=True).usage.tokens_out == 2
