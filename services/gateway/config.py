"""vfm-gatewayd configuration: a typed dataclass from file, then VFM_GATEWAY_* variables, then
flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from vfmos_runtime.config import listen_is_loopback, load_config
from vfmos_runtime.paths import KERNEL_SOCKET, default_state_dir

NAME = "vfm-gatewayd"
DEFAULT_LISTEN = "127.0.0.1:8080"
ADDRESS_FILE = "gateway.addr"   # in the state dir: the address it serves (port 0 picks one)


@dataclass
class GatewayConfig:
    state_dir: Path
    kernel_socket: Path | None = None   # None = STATE_DIR/vfmd.sock
    listen: str = DEFAULT_LISTEN        # HOST:PORT; port 0 = any free port
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False              # off loopback without TLS, knowingly
    timeout: float = 600.0              # seconds one kernel call may take (a long answer)
    max_body_mb: float = 8.0
    log_level: str = "INFO"

    def validate(self) -> None:
        listen_is_loopback(self.listen)  # HOST:PORT or a clear error
        if not 0 <= int(self.listen.rpartition(":")[2]) <= 65535:
            raise ValueError(f"--listen {self.listen!r}: the port must be 0..65535")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if not self.tls_cert and not self.insecure and not listen_is_loopback(self.listen):
            raise ValueError(f"--listen {self.listen} without TLS would send API keys in "
                             "clear text across the network: give --tls-cert and --tls-key, "
                             "or --insecure to accept that")
        if not 0 < self.timeout <= 86400:
            raise ValueError("--timeout must be between 0 and 86400 seconds")
        if not 0 < self.max_body_mb <= 256:
            raise ValueError("--max-body-mb must be between 0 and 256")

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.removeprefix("[").removesuffix("]"), int(port)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=NAME, description="VFMOS OpenAI-compatible gateway: "
                                "/v1/chat/completions, /v1/completions, /v1/responses, "
                                "/v1/embeddings and /v1/models over the kernel, with VFMOS "
                                "tokens as API keys.")
    p.add_argument("--config", type=Path, help="TOML file with the settings below")
    p.add_argument("--state-dir", type=Path, help="dir of the kernel's socket (default: as vfmd)")
    p.add_argument("--kernel-socket", type=Path, help="vfmd's socket "
                   f"(default: STATE_DIR/{KERNEL_SOCKET})")
    p.add_argument("--listen", help=f"HOST:PORT to serve HTTP on (default {DEFAULT_LISTEN}; "
                   "port 0 picks a free one, written to STATE_DIR/" + ADDRESS_FILE + ")")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate: serve HTTPS")
    p.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    p.add_argument("--insecure", action="store_const", const=True,
                   help="allow --listen off loopback without TLS (API keys travel in clear)")
    p.add_argument("--timeout", type=float, help="seconds one kernel call may take (default 600)")
    p.add_argument("--max-body-mb", type=float, help="largest request body (default 8 MB)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    return p


def load(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> GatewayConfig:
    env = dict(os.environ if env is None else env)
    args = parser().parse_args(argv)
    cfg = load_config(GatewayConfig, args, env, prefix="VFM_GATEWAY_",
                      state_dir=default_state_dir(env))
    cfg.kernel_socket = cfg.kernel_socket or cfg.state_dir / KERNEL_SOCKET
    return cfg
