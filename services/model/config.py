"""vfm-modeld configuration: a typed dataclass from file, then VFM_MODELD_* variables, then flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from services.model.registry import ENGINES
from vfmos_runtime.config import load_config, service_parser, service_sockets
from vfmos_runtime.paths import MODEL_SOCKET, cache_root, default_state_dir

NAME = "vfm-modeld"


@dataclass
class ModelConfig:
    state_dir: Path
    cache_dir: Path                   # converted models
    socket: Path | None = None        # this service's socket; None = STATE_DIR/modeld.sock
    kernel_socket: Path | None = None  # None = STATE_DIR/vfmd.sock
    models: Path | None = None        # JSON file adding models
    model: str = ""                   # default model; empty = the registry's default
    preload: bool = True              # load the default model at start
    threads: int = 0                  # torch threads; 0 = all cores
    prefix_cache_mb: int = 256        # per model; 0 = no prefix cache
    max_batch: int = 8
    engine: str = "auto"              # local GGUF models: llama.cpp, or torch; auto = llama.cpp
    row_tokens: int = 4096            # llama.cpp engine: prompt + answer one row may hold
    ttft_trace: Path | None = None
    log_level: str = "INFO"

    def validate(self) -> None:
        if self.prefix_cache_mb < 0:
            raise ValueError("--prefix-cache-mb must be >= 0 (0 = no prefix cache)")
        if not 1 <= self.max_batch <= 256:
            raise ValueError("--max-batch must be between 1 and 256")
        if not 256 <= self.row_tokens <= 1 << 20:
            raise ValueError("--row-tokens must be between 256 and 1048576")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be auto, llama.cpp or torch, not {self.engine!r}")
        if self.threads < 0:
            raise ValueError("--threads must be >= 0 (0 = all cores)")


def parser() -> argparse.ArgumentParser:
    p = service_parser(NAME, "VFMOS model service: physical FMs, streaming generation.",
                       MODEL_SOCKET)
    p.add_argument("--cache-dir", type=Path, help="converted models (default: $VFM_CACHE_DIR "
                   "or ~/.cache/vfmos)")
    p.add_argument("--models", type=Path, help='JSON file adding models: {"models": '
                   '[{"name": ..., "backend": "local-torch"|"openai", ...}], "default": ...}')
    p.add_argument("--model", help="default model (default: smollm2-135m)")
    p.add_argument("--no-preload", dest="preload", action="store_const", const=False,
                   help="load the default model on first use instead of at start")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache_mb", action="store_const", const=0,
                   help="recompute every prompt (no reuse of shared prompt prefixes)")
    p.add_argument("--prefix-cache-mb", type=int,
                   help="memory for reusable prompt prefixes (KV), per model (default 256)")
    p.add_argument("--max-batch", type=int,
                   help="sequences decoded together by a local model (default 8)")
    p.add_argument("--engine", choices=ENGINES,
                   help="engine for local GGUF models: llama.cpp decodes the quantized "
                   "weights; torch dequantizes them (auto, the default: llama.cpp where it "
                   "loads the model, torch otherwise and for adapters and HF directories)")
    p.add_argument("--row-tokens", type=int,
                   help="llama.cpp engine: the longest prompt plus answer one row holds (its "
                   "KV is allocated at start: rows + 2 of these; default 4096, at most the "
                   "model's window)")
    p.add_argument("--ttft-trace", type=Path, metavar="FILE",
                   help="append one JSON line per request at its first token: where the "
                   "time went (running step, other prefills, own prefill)")
    return p


def load(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> ModelConfig:
    env = os.environ if env is None else env
    args = parser().parse_args(argv)
    cfg = load_config(ModelConfig, args, env, prefix="VFM_MODELD_",
                      state_dir=default_state_dir(dict(env)), cache_dir=cache_root(dict(env)))
    service_sockets(cfg, MODEL_SOCKET)
    return cfg
