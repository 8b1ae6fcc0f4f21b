"""`python -m services.model.train_router [--data-dir DIR] [--out FILE]`: trains the router's
quality model on RouteLLM's MMLU and GSM8K dev files (GPT-4 = head "strong", Mixtral-8x7B =
head "weak"; contaminated prompts dropped) and writes services/model/weights/router.npz.
`python -m bench routing` gives its held-out figures (k-fold on the same files). A rerun on the
same machine writes the same bytes (fixed seed; the embeddings are deterministic)."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.model.route_features import feature_matrix
from services.model.router import QualityModel, fit

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "routing"
WEIGHTS = Path(__file__).resolve().parent / "weights" / "router.npz"
STRONG = "gpt-4-1106-preview"
WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
HEADS = ("strong", "weak")
SEED = 20261201


@dataclass
class LabelledSet:
    """Prompts with one 0/1 label per head (NaN: unknown) and, for RouterBench, a cost each."""

    name: str
    prompts: list[str]
    labels: np.ndarray                 # (N, H)
    heads: tuple[str, ...]
    costs: np.ndarray | None = None    # (N, H) in US dollars


def load_routellm(data_dir: Path, name: str) -> LabelledSet:
    """`mmlu` or `gsm8k` from `<name>_dev.jsonl.gz`; contaminated prompts dropped, as RouteLLM
    does before evaluating."""
    path = Path(data_dir) / f"{name}_dev.jsonl.gz"
    with gzip.open(path, "rt") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    rows = [r for r in rows if not r.get("contaminated")]
    labels = np.array([[r[STRONG], r[WEAK]] for r in rows], dtype=np.float32)
    return LabelledSet(name, [r["prompt"] for r in rows], labels, HEADS)


def embed_cached(prompts: list[str], cache: Path | None = None) -> np.ndarray:
    """MiniLM embeddings of the prompts; with a cache file (outside the repository), a rerun
    embeds only prompts it has not seen."""
    known: dict[str, np.ndarray] = {}
    if cache and cache.exists():
        known = pickle.loads(cache.read_bytes())
    keys = [hashlib.sha1(p.encode()).hexdigest() for p in prompts]
    missing = sorted({k: p for k, p in zip(keys, prompts) if k not in known}.items())
    if missing:
        from vfmos_runtime.embed import load_embedder

        started = time.monotonic()
        print(f"embedding {len(missing)} prompts with MiniLM ...", file=sys.stderr, flush=True)
        vectors = load_embedder().embed([p for _, p in missing])
        known.update((k, v) for (k, _), v in zip(missing, vectors))
        print(f"  {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_bytes(pickle.dumps(known))
    return np.stack([known[k] for k in keys]).astype(np.float32)


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("VFM_ROUTING_EMBED_CACHE") or Path(base) / "vfmos" / "routing-embed.pkl")


def train(data_dir: Path, cache: Path | None) -> QualityModel:
    sets = [load_routellm(data_dir, name) for name in ("mmlu", "gsm8k")]
    prompts = [p for s in sets for p in s.prompts]
    labels = np.vstack([s.labels for s in sets])
    emb = embed_cached(prompts, cache)
    return fit(emb, feature_matrix(prompts), labels, HEADS, seed=SEED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.model.train_router",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                        help="folder with mmlu_dev.jsonl.gz and gsm8k_dev.jsonl.gz")
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="weights file to write")
    parser.add_argument("--no-cache", action="store_true",
                        help="embed every prompt again (the cache is ~/.cache/vfmos)")
    args = parser.parse_args(argv)
    for name in ("mmlu", "gsm8k"):
        if not (args.data_dir / f"{name}_dev.jsonl.gz").exists():
            print(f"error: {args.data_dir / (name + '_dev.jsonl.gz')} not found", file=sys.stderr)
            return 2
    import torch

    torch.set_num_threads(1)  # one thread: the same float sums every run
    model = train(args.data_dir, None if args.no_cache else default_cache())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB, "
          f"{len(model.keys)} prompts, heads {', '.join(model.heads)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
