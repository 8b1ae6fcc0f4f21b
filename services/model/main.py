"""vfm-modeld entry point: load the default model, serve Generate, register with the kernel."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from grpc_health.v1 import health_pb2

from kernel.runtime.notify import notify_status
from kernel.runtime.registration import serve_registered
from kernel.runtime.server import (DaemonStartError, ServerConfig, create_server, run_daemon,
                                   setup_logging)
from libvfm.errors import VfmError
from libvfm.paths import KERNEL_SOCKET, MODEL_SOCKET, default_state_dir
from services.model.local import cache_root
from services.model.registry import ModelRegistry
from services.model.service import ModelService
from services.model.servicer import ModelServicer
from vfmos.model.v1 import model_pb2, model_pb2_grpc

log = logging.getLogger("vfm-modeld")
NAME = "vfm-modeld"
SERVICE_NAME = model_pb2.DESCRIPTOR.services_by_name["Model"].full_name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=NAME, description="VFMOS model service: physical "
                                     "FMs, streaming generation.")
    parser.add_argument("--state-dir", type=Path, help="dir of the sockets (default: as vfmd)")
    parser.add_argument("--socket", type=Path, help="this service's socket "
                        "(default: STATE_DIR/modeld.sock)")
    parser.add_argument("--kernel-socket", type=Path, help="vfmd's socket "
                        "(default: STATE_DIR/vfmd.sock)")
    parser.add_argument("--models", type=Path, help='JSON file adding models: {"models": '
                        '[{"name": ..., "backend": "local-torch"|"openai", ...}], "default": ...}')
    parser.add_argument("--model", help="default model (default: smollm2-135m)")
    parser.add_argument("--no-preload", action="store_true",
                        help="load the default model on first use instead of at start")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="recompute every prompt (no reuse of shared prompt prefixes)")
    parser.add_argument("--prefix-cache-mb", type=int, default=256,
                        help="memory for reusable prompt prefixes (KV), per model (default 256)")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="sequences decoded together by a local model (default 8)")
    parser.add_argument("--ttft-trace", type=Path, metavar="FILE",
                        help="append one JSON line per request at its first token: where the "
                        "time went (running step, other prefills, own prefill)")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    state_dir = args.state_dir or default_state_dir()
    socket = args.socket or state_dir / MODEL_SOCKET
    try:
        registry = ModelRegistry.load(args.models, args.model)
    except (VfmError, ValueError, OSError, TypeError) as exc:
        raise DaemonStartError(f"bad model configuration: {exc}") from exc
    if args.prefix_cache_mb < 0:
        raise DaemonStartError("--prefix-cache-mb must be >= 0 (0 = no prefix cache)")
    if not 1 <= args.max_batch <= 256:
        raise DaemonStartError("--max-batch must be between 1 and 256")
    try:
        service = ModelService(registry, cache_root(), args.threads, args.max_batch,
                               prefix_cache_mb=0 if args.no_prefix_cache else args.prefix_cache_mb,
                               ttft_trace=args.ttft_trace)
    except OSError as exc:
        raise DaemonStartError(f"--ttft-trace: {exc}") from exc
    servicer = ModelServicer(service)
    server, health, _ = create_server(
        ServerConfig(unix_socket=socket),
        lambda s: model_pb2_grpc.add_ModelServicer_to_server(servicer, s), [SERVICE_NAME])
    await server.start()
    os.chmod(socket, 0o660)  # only the kernel (same user or group) talks to us
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    if not args.no_preload:
        log.info("loading the default model %s", registry.default)
        notify_status(f"loading {registry.default}")
        backend = service.backend(registry.default)
        await backend.wait_loaded()
    log.info("%s serving on %s (default model %s)", NAME, socket, registry.default)
    await serve_registered(server, health, NAME, SERVICE_NAME, socket,
                           args.kernel_socket or state_dir / KERNEL_SOCKET, service.stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_daemon(lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
