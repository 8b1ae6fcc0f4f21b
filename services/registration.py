"""A user-space service's life with the kernel: register (again after kernel restarts),
report health and readiness, and shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2

from vfmos_runtime.gate import KernelGate
from vfmos_runtime.notify import notify_ready, notify_stopping
from vfmos_runtime.server import serve_until_signal
from libvfm import AsyncClient
from vfmos_runtime.errors import VfmError

log = logging.getLogger("vfmos.registration")


async def register_forever(kernel_socket: Path, name: str, address: str,
                           gate: KernelGate) -> None:
    """Register every heartbeat; each answer tells `gate` which secret the kernel presents."""
    client = AsyncClient(kernel_socket, timeout=3.0)
    interval, warned = 2.0, False
    while True:
        try:
            registration = await client.register_service(name, address, os.getpid())
            gate.admit(registration.kernel_secret)
            interval = registration.heartbeat_s or 2.0
            if warned:
                log.info("%s registered with the kernel again", name)
            warned = False
        except VfmError as err:
            if not warned:
                log.warning("%s cannot register with the kernel at %s: %s (retrying)",
                            name, kernel_socket, err.message)
            warned = True
            interval = 1.0
        await asyncio.sleep(interval)


async def serve_registered(server: grpc.aio.Server, health, name: str, service_name: str,
                           socket: Path, kernel_socket: Path, close: Callable[[], None],
                           gate: KernelGate, background: tuple[asyncio.Task, ...] = (),
                           drain: Callable[[], None] | None = None) -> None:
    """Mark the (started) server SERVING, register with the kernel, tell systemd we are
    ready, and serve until a signal; then `drain()` (end the long-lived streams that are
    idle), stop the background tasks and `close()`."""
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    tasks = (asyncio.create_task(register_forever(kernel_socket, name, f"unix:{socket}", gate)),
             *background)
    notify_ready(f"serving on {socket}")

    async def on_stop() -> None:
        notify_stopping()
        if drain is not None:
            drain()
        for task in tasks:
            task.cancel()
        await health.enter_graceful_shutdown()

    try:
        await serve_until_signal(server, on_stop)
    finally:
        close()
        socket.unlink(missing_ok=True)
