"""vfm-gatewayd entry point: bind the HTTP port, serve the OpenAI routes over the kernel."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

import uvicorn

from libvfm import AsyncClient
from services.gateway.app import Gateway, create_app
from services.gateway.config import ADDRESS_FILE, NAME, GatewayConfig, load
from services.gateway.keys import Keys
from services.gateway.turns import TurnBook
from vfmos_runtime.notify import notify_ready, notify_stopping
from vfmos_runtime.server import DaemonStartError, run_configured

log = logging.getLogger(NAME)


def bind(cfg: GatewayConfig) -> socket.socket:
    host, port = cfg.host_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DaemonStartError(f"cannot listen on {cfg.listen}: {exc.strerror or exc}; "
                               "choose another with --listen HOST:PORT "
                               "(vfmctl up --gateway-listen)") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def serve(cfg: GatewayConfig) -> None:
    sock = bind(cfg)
    host, port = sock.getsockname()[:2]
    scheme = "https" if cfg.tls_cert else "http"
    address = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}"
    own = AsyncClient(cfg.kernel_socket, timeout=5.0)
    gateway = Gateway(Keys(cfg.kernel_socket, cfg.timeout), TurnBook(), own,
                      int(cfg.max_body_mb * (1 << 20)))
    server = uvicorn.Server(uvicorn.Config(
        create_app(gateway), loop="none", http="httptools", lifespan="off",
        access_log=False, log_config=None, timeout_graceful_shutdown=10,
        ssl_certfile=cfg.tls_cert, ssl_keyfile=cfg.tls_key))

    async def ready() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        path = cfg.state_dir / ADDRESS_FILE
        path.write_text(address + "\n")
        log.info("%s serving the OpenAI API on %s/v1 (kernel %s)", NAME, address,
                 cfg.kernel_socket)
        notify_ready(f"serving on {address}")
    announcing = asyncio.ensure_future(ready())
    try:
        await server.serve(sockets=[sock])  # returns on SIGTERM/SIGINT, after in-flight calls
    finally:
        announcing.cancel()
        notify_stopping()
        (cfg.state_dir / ADDRESS_FILE).unlink(missing_ok=True)
        await gateway.keys.close()
        await own.close()
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    return run_configured(NAME, load, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
