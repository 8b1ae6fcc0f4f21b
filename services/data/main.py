"""vfm-datad entry point: open the store, load the embedder, serve, register with the kernel."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import lmdb

from kernel.runtime.notify import notify_status
from kernel.runtime.registration import serve_registered
from kernel.runtime.server import (DaemonStartError, ServerConfig, create_server, run_daemon,
                                   setup_logging)
from libvfm.errors import VfmError
from libvfm.paths import DATA_SOCKET, KERNEL_SOCKET, default_data_dir, default_state_dir
from services.data.embed import load_embedder
from services.data.service import DataService
from services.data.servicer import DataServicer
from services.data.summarize import Summarizer
from services.data.tokens import TokenCounter
from services.model.local import cache_root
from vfmos.data.v1 import data_pb2, data_pb2_grpc

log = logging.getLogger("vfm-datad")
NAME = "vfm-datad"
SERVICE_NAME = data_pb2.DESCRIPTOR.services_by_name["Data"].full_name
DEFAULT_MODEL = "smollm2-135m"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=NAME, description="VFMOS Data Agent: knowledge "
                                     "collections, episodic memory, retrieval.")
    parser.add_argument("--state-dir", type=Path, help="dir of the sockets (default: as vfmd)")
    parser.add_argument("--data-dir", type=Path, help="dir of data.lmdb (default: as vfmd)")
    parser.add_argument("--socket", type=Path, help="this service's socket "
                        "(default: STATE_DIR/datad.sock)")
    parser.add_argument("--kernel-socket", type=Path, help="vfmd's socket "
                        "(default: STATE_DIR/vfmd.sock)")
    parser.add_argument("--embedder", help="a local HF encoder directory "
                        "(default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--token-model", default=DEFAULT_MODEL,
                        help="model whose tokenizer counts working-set tokens "
                        f"(default: {DEFAULT_MODEL}, from vfm-modeld's model cache)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for embeddings (default 1: the models keep the rest)")
    parser.add_argument("--summary-pages", type=int, default=4,
                        help="pages per background summary (default 4; 0 = no summaries)")
    parser.add_argument("--summary-interval", type=float, default=10.0,
                        help="seconds between looks for ranges to summarise (default 10)")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    state_dir = args.state_dir or default_state_dir()
    data_dir = args.data_dir or default_data_dir(args.state_dir)
    socket = args.socket or state_dir / DATA_SOCKET
    notify_status("loading the embedding model")
    try:
        import torch

        torch.set_num_threads(max(1, args.threads))
        embedder = load_embedder(args.embedder)
    except (VfmError, OSError, ValueError) as exc:
        raise DaemonStartError(f"cannot load the embedding model: {exc}") from exc
    try:
        service = DataService(data_dir, embedder,
                              TokenCounter(cache_root() / "models" / args.token_model))
    except (lmdb.Error, OSError) as exc:
        raise DaemonStartError(f"cannot open the data store in {data_dir}: {exc}") from exc
    servicer = DataServicer(service)
    server, health, _ = create_server(
        ServerConfig(unix_socket=socket),
        lambda s: data_pb2_grpc.add_DataServicer_to_server(servicer, s), [SERVICE_NAME])
    await server.start()
    os.chmod(socket, 0o660)  # only the kernel (same user or group) talks to us
    background = ()
    if args.summary_pages > 0:
        summarizer = Summarizer(service.memory, service.summaries, service.counter,
                                args.kernel_socket or state_dir / KERNEL_SOCKET,
                                args.summary_pages, args.summary_interval)
        background = (asyncio.create_task(summarizer.run(service.run)),)
    log.info("%s serving on %s (data in %s, embeddings %s)", NAME, socket, data_dir,
             embedder.name)
    await serve_registered(server, health, NAME, SERVICE_NAME, socket,
                           args.kernel_socket or state_dir / KERNEL_SOCKET, service.close,
                           background)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_daemon(lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
