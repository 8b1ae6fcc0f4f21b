"""vfm-trustd configuration: a typed dataclass from file, then VFM_TRUSTD_* variables, then flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from vfmos_runtime.config import load_config, service_parser, service_sockets, state_dir_named
from vfmos_runtime.paths import TRUST_SOCKET, default_data_dir, default_state_dir
from vfmos_runtime.protocol import TRUST_SERVICE

NAME = TRUST_SERVICE
# Check families a daemon may load; tenant rules and the overlap leak check always run.
FAMILIES = ("learned", "pii", "grounding", "constraints", "embeddings")


@dataclass
class TrustConfig:
    state_dir: Path
    data_dir: Path | None = None      # policies.lmdb; None = as vfmd
    socket: Path | None = None        # None = STATE_DIR/trustd.sock
    kernel_socket: Path | None = None  # None = STATE_DIR/vfmd.sock
    embedder: str = ""                # a local HF encoder directory; empty = packaged MiniLM
    threads: int = 1                  # torch threads for the checks' encoder
    workers: int = 2                  # threads that run checks (off the event loop)
    checks: str = ",".join(FAMILIES)  # families to load; "rules" = tenant rules only
    log_level: str = "INFO"

    def validate(self) -> None:
        if not 1 <= self.threads <= 64:
            raise ValueError("--threads must be 1..64")
        if not 1 <= self.workers <= 64:
            raise ValueError("--workers must be 1..64")
        unknown = self.families_named() - set(FAMILIES) - {"rules"}
        if unknown:
            raise ValueError(f"--checks: unknown {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(FAMILIES)}, rules")

    def families_named(self) -> set[str]:
        return {part.strip() for part in self.checks.split(",") if part.strip()}

    def families(self) -> set[str]:
        """The check families to load ("embeddings": denied topics by similarity)."""
        return self.families_named() & set(FAMILIES)


def parser() -> argparse.ArgumentParser:
    p = service_parser(NAME, "VFMOS Trust Agent: checks what goes into and comes out of a "
                       "model, under each tenant's trust policy.", TRUST_SOCKET)
    p.add_argument("--data-dir", type=Path, help="dir of policies.lmdb (default: as vfmd)")
    p.add_argument("--embedder", help="a local HF encoder directory "
                   "(default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--threads", type=int,
                   help="torch threads for the checks' encoder (default 1)")
    p.add_argument("--workers", type=int,
                   help="threads that run checks off the event loop (default 2)")
    p.add_argument("--checks", help="check families to load, comma-separated (default: "
                   f"{','.join(FAMILIES)}; 'rules' = tenant rules and the overlap leak check "
                   "only, which always run)")
    return p


def load(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> TrustConfig:
    env = dict(os.environ if env is None else env)
    args = parser().parse_args(argv)
    cfg = load_config(TrustConfig, args, env, prefix="VFM_TRUSTD_",
                      state_dir=default_state_dir(env))
    named = state_dir_named(args, env)
    cfg.data_dir = cfg.data_dir or default_data_dir(cfg.state_dir if named else None, env)
    service_sockets(cfg, TRUST_SOCKET)
    return cfg
