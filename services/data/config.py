"""vfm-datad configuration: a typed dataclass from file, then VFM_DATAD_* variables, then flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from vfmos_runtime.config import load_config, service_parser, service_sockets, state_dir_named
from vfmos_runtime.paths import DATA_SOCKET, cache_root, default_data_dir, default_state_dir

NAME = "vfm-datad"
DEFAULT_TOKEN_MODEL = "smollm2-135m"


@dataclass
class DataConfig:
    state_dir: Path
    cache_dir: Path                   # where vfm-modeld keeps converted models (tokenizers)
    data_dir: Path | None = None      # data.lmdb; None = as vfmd
    socket: Path | None = None        # None = STATE_DIR/datad.sock
    kernel_socket: Path | None = None  # None = STATE_DIR/vfmd.sock
    embedder: str = ""                # a local HF encoder directory; empty = packaged MiniLM
    token_model: str = DEFAULT_TOKEN_MODEL
    threads: int = 1                  # torch threads for embeddings
    summary_pages: int = 4            # pages per background summary; 0 = no summaries
    summary_interval: float = 10.0    # seconds between looks for ranges to summarise
    log_level: str = "INFO"

    def validate(self) -> None:
        if self.threads < 1:
            raise ValueError("--threads must be >= 1")
        if self.summary_pages < 0:
            raise ValueError("--summary-pages must be >= 0 (0 = no summaries)")
        if not 0 < self.summary_interval <= 86400:
            raise ValueError("--summary-interval must be between 0 and 86400 seconds")
        if not self.token_model or "/" in self.token_model:
            raise ValueError(f"bad --token-model {self.token_model!r}: a model name")


def parser() -> argparse.ArgumentParser:
    p = service_parser(NAME, "VFMOS Data Agent: knowledge collections, episodic memory, "
                       "retrieval.", DATA_SOCKET)
    p.add_argument("--data-dir", type=Path, help="dir of data.lmdb (default: as vfmd)")
    p.add_argument("--cache-dir", type=Path, help="vfm-modeld's model cache, for the token "
                   "counter (default: $VFM_CACHE_DIR or ~/.cache/vfmos)")
    p.add_argument("--embedder", help="a local HF encoder directory "
                   "(default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--token-model", help="model whose tokenizer counts working-set tokens "
                   f"(default: {DEFAULT_TOKEN_MODEL}, from vfm-modeld's model cache)")
    p.add_argument("--threads", type=int,
                   help="torch threads for embeddings (default 1: the models keep the rest)")
    p.add_argument("--summary-pages", type=int,
                   help="pages per background summary (default 4; 0 = no summaries)")
    p.add_argument("--summary-interval", type=float,
                   help="seconds between looks for ranges to summarise (default 10)")
    return p


def load(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> DataConfig:
    env = dict(os.environ if env is None else env)
    args = parser().parse_args(argv)
    cfg = load_config(DataConfig, args, env, prefix="VFM_DATAD_",
                      state_dir=default_state_dir(env), cache_dir=cache_root(env))
    named = state_dir_named(args, env)
    cfg.data_dir = cfg.data_dir or default_data_dir(cfg.state_dir if named else None, env)
    service_sockets(cfg, DATA_SOCKET)
    return cfg
