"""vfm-datad entry point: open the store, load the embedder, serve, register with the kernel."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import lmdb

from services.registration import serve_registered
from vfmos_runtime.server import (DaemonStartError, ServerConfig, create_server,
                                   models_offline, run_configured)
from vfmos_runtime.gate import KernelGate
from vfmos_runtime.embed import load_daemon_embedder
from services.data.service import DataService
from services.data.servicer import DataServicer
from services.data.summarize import SummaryAgents, Summarizer
from services.data.tokens import TokenCounter
from services.data.config import NAME, DataConfig, load
from vfmos.data.v1 import data_pb2, data_pb2_grpc

log = logging.getLogger("vfm-datad")
SERVICE_NAME = data_pb2.DESCRIPTOR.services_by_name["DataService"].full_name


async def serve(cfg: DataConfig) -> None:
    data_dir, socket = cfg.data_dir, cfg.socket
    embedder = load_daemon_embedder(cfg.embedder, cfg.threads)
    try:
        service = DataService(data_dir, embedder,
                              TokenCounter(cfg.cache_dir / "models" / cfg.token_model))
    except (lmdb.Error, OSError) as exc:
        raise DaemonStartError(f"cannot open the data store in {data_dir}: {exc}") from exc
    servicer = DataServicer(service)
    gate = KernelGate(NAME)
    server, health, _ = create_server(
        ServerConfig(unix_socket=socket, interceptors=(gate,)),
        lambda s: data_pb2_grpc.add_DataServiceServicer_to_server(servicer, s), [SERVICE_NAME])
    await server.start()
    os.chmod(socket, 0o660)  # only the kernel (same user or group) talks to us
    background = ()
    if cfg.summary_pages > 0:
        summarizer = Summarizer(service.memory, service.summaries, service.counter,
                                cfg.kernel_socket, cfg.summary_pages, cfg.summary_interval,
                                SummaryAgents(service.env))
        background = (asyncio.create_task(summarizer.run(service.run)),)
    log.info("%s serving on %s (data in %s, embeddings %s)", NAME, socket, data_dir,
             embedder.name)
    await serve_registered(server, health, NAME, SERVICE_NAME, socket,
                           cfg.kernel_socket, service.close, gate, background)


def main(argv: list[str] | None = None) -> int:
    return run_configured(NAME, load, serve, argv, prepare=models_offline)


if __name__ == "__main__":
    sys.exit(main())
