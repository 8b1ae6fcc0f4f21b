"""vfm-modeld entry point: load the default model, serve Generate, register with the kernel."""

from __future__ import annotations

import logging
import os
import sys

from grpc_health.v1 import health_pb2

from vfmos_runtime.notify import notify_status
from services.registration import serve_registered
from vfmos_runtime.server import (DaemonStartError, ServerConfig, create_server,
                                   models_offline, run_configured)
from vfmos_runtime.errors import VfmError
from vfmos_runtime.gate import KernelGate
from services.model.config import NAME, ModelConfig, load
from services.model.adapters import AdapterJobs
from services.model.local import converted_dir
from services.model.registry import ModelRegistry
from services.model.routing import RoutingService
from services.model.service import ModelService
from services.model.servicer import ModelServicer
from vfmos.model.v1 import model_pb2, model_pb2_grpc

log = logging.getLogger("vfm-modeld")
SERVICE_NAME = model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name


async def serve(cfg: ModelConfig) -> None:
    socket = cfg.socket
    try:
        registry = ModelRegistry.load(cfg.models, cfg.model or None)
    except (VfmError, ValueError, OSError, TypeError) as exc:
        raise DaemonStartError(f"bad model configuration: {exc}") from exc
    try:
        service = ModelService(registry, cfg.cache_dir, cfg.threads, cfg.max_batch,
                               prefix_cache_mb=cfg.prefix_cache_mb, ttft_trace=cfg.ttft_trace,
                               engine=cfg.engine, row_tokens=cfg.row_tokens)
    except OSError as exc:
        raise DaemonStartError(f"--ttft-trace: {exc}") from exc
    routing = RoutingService(registry, cfg.state_dir)
    adapters = AdapterJobs(registry, cfg.state_dir, lambda e: converted_dir(e, cfg.cache_dir),
                           cfg.threads)
    servicer = ModelServicer(service, routing, adapters)
    gate = KernelGate(NAME)
    server, health, _ = create_server(
        ServerConfig(unix_socket=socket, interceptors=(gate,)),
        lambda s: model_pb2_grpc.add_ModelServiceServicer_to_server(servicer, s), [SERVICE_NAME])
    await server.start()
    os.chmod(socket, 0o660)  # only the kernel (same user or group) talks to us
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    if cfg.preload:
        log.info("loading the default model %s", registry.default)
        notify_status(f"loading {registry.default}")
        backend = service.backend(registry.default)
        await backend.wait_loaded()
    log.info("%s serving on %s (default model %s)", NAME, socket, registry.default)
    await serve_registered(server, health, NAME, SERVICE_NAME, socket,
                           cfg.kernel_socket,
                           lambda: (adapters.stop(), service.stop(), routing.close()), gate,
                           drain=servicer.many.drain)


def main(argv: list[str] | None = None) -> int:
    return run_configured(NAME, load, serve, argv, prepare=models_offline)


if __name__ == "__main__":
    sys.exit(main())
