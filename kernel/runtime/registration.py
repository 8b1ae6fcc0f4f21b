"""Keep the kernel told where a user-space service listens; survives kernel restarts."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from libvfm import AsyncClient
from libvfm.errors import VfmError

log = logging.getLogger("vfmos.registration")


async def register_forever(kernel_socket: Path, name: str, address: str) -> None:
    client = AsyncClient(kernel_socket, timeout=3.0)
    interval, warned = 2.0, False
    while True:
        try:
            interval = await client.register_service(name, address, os.getpid()) or 2.0
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
