"""Continuous batching on llama.cpp (its low-level API through llama-cpp-python): a GGUF
decoded as it is quantized, which reads a fifth of the fp32 weights per token.

One llama context; each row is a sequence with a KV stream of its own (a non-unified cache:
a row's numbers do not depend on which other rows share its step, so its greedy answer is
the one it gets alone, measured bit for bit). A step is one `llama_decode` of one token per
decoding row plus a chunk of the prompts still being prefilled (most urgent first), so a
long prompt never holds the batch (or an urgent arrival) for longer than one chunk.

A row that leaves (finished or cancelled) leaves its stream as it is. A later prompt that
starts with the same tokens (a shared system prompt, the next turn of a conversation, a
preempted answer resumed by its ids) takes that stream and keeps the shared part; the rest
is dropped. A prompt that shares a prefix with a running row gets a copy of that row's
stream. There are a few more streams than rows, so recent prefixes outlive their rows."""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vfmos_runtime.errors import Internal, InvalidArgument, Unavailable
from services.model.batch import EngineStats, Job
from services.model.decode import TextStream, emit_token, pick
from services.model.prefix import common_prefix

log = logging.getLogger("vfm-modeld.llama")

# Prompt tokens computed in one step beside the decoding rows: the longest a decoding row
# or an urgent arrival waits for a prompt ahead of it (~0.5-1 s on 2 cores).
CHUNK_TOKENS = 256
MIN_REUSE = 8  # shorter shared prefixes are computed again (a stream copy is not free)
SPARE_STREAMS = 2  # streams beyond the rows: prefixes kept after their rows left


def llama_cpp():
    """The bindings, imported on first use (they load the native library). llama.cpp's own
    log goes to stderr from errors up: its load report is hundreds of lines per model."""
    import llama_cpp as lib
    from llama_cpp import _logger

    if _logger.logger.level == logging.NOTSET:
        _logger.set_verbose(False)
    return lib


@dataclass
class _Row:
    job: Job
    seq: int
    stream: TextStream
    generator: torch.Generator | None
    fed: list[int] = field(default_factory=list)   # tokens whose KV this sequence holds
    pending: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    produced: list[int] = field(default_factory=list)
    token: int | None = None    # sampled, not yet fed


def extra_buffers_safe(system_info: str) -> bool:
    """Whether llama.cpp may repack the weights into its extra buffer types. Not where its
    AMX kernel is built in (`AMX_INT8 = 1`: pip builds for the CPU it runs on, and Sapphire
    Rapids has AMX): `ggml_backend_amx_mul_mat` segfaults on our batches (llama.cpp issue
    20824, closed without a fix), so the model uses the plain CPU kernels there."""
    return "AMX_INT8 = 1" not in system_info


def model_params(lib):
    """llama.cpp's default model parameters, on the kernels that are safe on this CPU."""
    params = lib.llama_model_default_params()
    params.use_extra_bufts = extra_buffers_safe(lib.llama_print_system_info().decode())
    return params


class LlamaModel:
    """A GGUF loaded by llama.cpp: the weights once, shared by every context made from it."""

    def __init__(self, path: Path, threads: int):
        lib = llama_cpp()
        lib.llama_backend_init()
        params = model_params(lib)
        self.path = path
        self.threads = threads
        self.ptr = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise Unavailable(f"llama.cpp could not load {path}")
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lib.llama_model_n_ctx_train(self.ptr)
        layers, heads = lib.llama_model_n_layer(self.ptr), lib.llama_model_n_head_kv(self.ptr)
        head_dim = lib.llama_model_n_embd(self.ptr) // max(1, lib.llama_model_n_head(self.ptr))
        self.kv_bytes_per_token = 2 * layers * heads * head_dim * 2  # K and V in f16
        self._eog = [bool(lib.llama_vocab_is_eog(self.vocab, t)) for t in range(self.n_vocab)]

    def is_eog(self, token: int) -> bool:
        return self._eog[token]

    def meta(self, key: str) -> str:
        lib = llama_cpp()
        buf = ctypes.create_string_buffer(4096)
        n = lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else ""

    def context(self, cells_per_seq: int, seqs: int, chunk: int):
        """A context of `seqs` sequences, each with a KV stream of `cells_per_seq` cells."""
        lib = llama_cpp()
        params = lib.llama_context_default_params()
        params.n_ctx = cells_per_seq * seqs
        params.n_batch = params.n_ubatch = chunk + seqs  # one chunk plus a token per row
        params.n_seq_max = seqs
        params.n_threads = params.n_threads_batch = self.threads
        params.kv_unified = False  # a stream per row: batch-invariant numbers
        params.swa_full = True     # sliding-window layers keep every cell: prefixes reusable
        params.no_perf = True
        ctx = lib.llama_init_from_model(self.ptr, params)
        if not ctx:
            raise Unavailable(f"llama.cpp could not make a context of {seqs} x "
                              f"{cells_per_seq} cells")
        return ctx

    def close(self) -> None:
        if self.ptr:
            llama_cpp().llama_model_free(self.ptr)
            self.ptr = None


class LlamaEngine:
    """The same contract as the PyTorch BatchEngine (`run`, `stop`, `active_jobs`,
    `stats`), on llama.cpp."""

    def __init__(self, model: LlamaModel, tokenizer, max_batch: int = 8,
                 prefix_cache_mb: int = 256, row_tokens: int = 4096, chunk: int = CHUNK_TOKENS):
        lib = self._lib = llama_cpp()
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.chunk = chunk
        self.stats = EngineStats()
        # A row holds its prompt and answer in `row_tokens` cells (rounded as llama.cpp does).
        self.row_tokens = min(row_tokens, model.n_ctx_train or row_tokens)
        self.row_tokens = max(256, -(-self.row_tokens // 256) * 256)
        self._seqs = max_batch + SPARE_STREAMS
        self._ctx = model.context(self.row_tokens, self._seqs, chunk)
        self.kv_bytes = self.row_tokens * self._seqs * model.kv_bytes_per_token
        self._mem = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(chunk + self._seqs, 0, 1)
        self._keep_prefixes = prefix_cache_mb > 0
        # Streams no row uses, least recently left first, with the tokens each still holds.
        self._free: OrderedDict[int, list[int]] = OrderedDict((s, []) for s in range(self._seqs))
        self._rows: list[_Row] = []
        self._stopping = threading.Event()

    def active_jobs(self) -> list[Job]:
        return [row.job for row in self._rows]

    def stop(self) -> None:
        self._stopping.set()

    def close(self) -> None:
        lib = self._lib
        if self._ctx:
            lib.llama_batch_free(self._batch)
            lib.llama_free(self._ctx)
            self._ctx = None

    def run(self, jobs: "queue.Queue[Job | None]") -> None:
        """Serve jobs until a None arrives; an exception here means the engine is dead."""
        try:
            while not self._stopping.is_set() and self._admit(jobs):
                if self._rows:
                    self._step()
        finally:
            self.close()

    # ---- admission ----------------------------------------------------------------------
    def _admit(self, jobs: "queue.Queue[Job | None]") -> bool:
        self._drop_cancelled()
        block = not self._rows
        running = True
        while len(self._rows) < self.max_batch:
            try:
                job = jobs.get(block=block)
            except queue.Empty:
                break
            if job is None:
                running = False
                break
            block = False
            if not job.cancel.is_set():
                job.taken_at = job.taken_at or time.perf_counter()
                self._start(job)
        return running

    def _start(self, job: Job) -> None:
        need = len(job.input_ids) + 1
        if need > self.row_tokens:
            job.emit(InvalidArgument(f"the prompt is {len(job.input_ids)} tokens; a row of this "
                                     f"engine holds {self.row_tokens} (vfm-modeld --row-tokens)"))
            return
        job.params.max_new_tokens = min(job.params.max_new_tokens, self.row_tokens - need + 1)
        generator = None
        if job.params.temperature > 0:
            generator = torch.Generator().manual_seed(job.params.seed)
        seq, kept = self._take_stream(job.input_ids)
        row = _Row(job, seq, TextStream(self.tokenizer, job.params.stop), generator,
                   fed=list(job.input_ids[:kept]), pending=list(job.input_ids[kept:]))
        if kept:
            self._count_reuse(kept)
        self._rows.append(row)

    def _take_stream(self, prompt: list[int]) -> tuple[int, int]:
        """A free stream for `prompt` and how many of its first tokens the stream already
        holds: the one sharing the longest prefix, else the least recently used."""
        limit = len(prompt) - 1  # the last prompt token is computed: its logits are needed
        best, seq = 0, next(iter(self._free))
        if self._keep_prefixes:
            for candidate, tokens in self._free.items():
                n = min(common_prefix(tokens, prompt), limit)
                if n > best:
                    best, seq = n, candidate
        if best < MIN_REUSE:
            best = 0
        del self._free[seq]
        self._lib.llama_memory_seq_rm(self._mem, seq, best, -1)
        return seq, best

    # ---- prefixes -----------------------------------------------------------------------
    def _share(self, row: _Row) -> None:
        """A running row already holds more of `row`'s prompt: copy its stream, keep the
        shared part."""
        if not self._keep_prefixes:
            return
        have, want = len(row.fed), row.fed + row.pending
        limit = len(want) - 1
        best, source = have, None
        for other in self._rows:
            if other is row or len(other.fed) <= best:
                continue
            n = min(common_prefix(other.fed, want), limit)
            if n > best:
                best, source = n, other
        if source is None or best - have < MIN_REUSE:
            return
        self._lib.llama_memory_seq_rm(self._mem, row.seq, -1, -1)
        self._lib.llama_memory_seq_cp(self._mem, source.seq, row.seq, -1, -1)
        self._lib.llama_memory_seq_rm(self._mem, row.seq, best, -1)
        row.fed += row.pending[:best - have]
        del row.pending[:best - have]
        self._count_reuse(best - have)

    def _count_reuse(self, tokens: int) -> None:
        self.stats.prefix_hits += 1
        self.stats.prefix_tokens_reused += tokens

    def _release(self, row: _Row) -> None:
        """A leaving row's stream is free again, its tokens kept for a later prompt."""
        if not self._keep_prefixes or not row.fed:
            self._lib.llama_memory_seq_rm(self._mem, row.seq, -1, -1)
        self._free[row.seq] = list(row.fed) if self._keep_prefixes else []

    # ---- one step -----------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        for row in [r for r in self._rows if r.job.cancel.is_set()]:
            self._leave(row)
            self.stats.cancelled += 1
            self.stats.last_cancel_step = self.stats.steps

    def _leave(self, row: _Row) -> None:
        self._rows.remove(row)
        self._release(row)

    def _step(self) -> None:
        """One llama_decode: a token for each decoding row, then prompt chunks, most
        urgent first; then sample for every row that has logits."""
        self._drop_cancelled()
        if not self._rows:
            return
        plan: list[tuple[_Row, list[int]]] = []
        budget = self.chunk
        for row in self._rows:
            if row.token is not None:
                plan.append((row, [row.token]))
        prefilling = sorted((r for r in self._rows if r.pending),
                            key=lambda r: (-r.job.params.priority, r.job.queued_at))
        started = time.perf_counter()
        planned: list[_Row] = []
        for row in prefilling:
            if budget <= 0:
                break
            self._share(row)
            if any(_ahead(other, row) for other in planned):
                continue  # a row in this step computes its next tokens: shared next step
            row.job.prefill_at = row.job.prefill_at or started
            take = row.pending[:budget]
            budget -= len(take)
            plan.append((row, take))
            planned.append(row)
        if not plan:
            return
        outputs = self._decode(plan)
        if outputs is None:
            return
        done = time.perf_counter()
        prefilled = sum(len(t) for r, t in plan if r.token is None or len(t) > 1)
        if prefilled:
            self.stats.prefills += 1
            self.stats.prefill_tokens += prefilled
            self.stats.prefill_seconds += done - started
        self.stats.steps += 1
        decoding = sum(1 for r, t in plan if r.token is not None)
        self.stats.rows_decoded += decoding
        self.stats.max_rows = max(self.stats.max_rows, len(self._rows))
        for (row, tokens), index in outputs:
            if row.job.cancel.is_set():
                continue  # its caller left during the step: dropped at the next one
            if row.token is not None:
                row.token = None
            else:
                del row.pending[:len(tokens)]
                if row.pending:
                    continue  # more of its prompt next step
                row.job.first_at = done
                row.job.group = 1
            if index >= 0:
                self._advance(row, index)

    def _decode(self, plan: list[tuple[_Row, list[int]]]):
        """Fill the batch and decode it; each planned part with its logits' index (-1: none).
        A failed decode fails the rows in it (the engine goes on)."""
        lib, batch = self._lib, self._batch
        n, outputs = 0, []
        for row, tokens in plan:
            start = len(row.fed)
            last = row.token is not None or len(tokens) == len(row.pending)
            for k, token in enumerate(tokens):
                batch.token[n], batch.pos[n] = token, start + k
                batch.n_seq_id[n], batch.seq_id[n][0] = 1, row.seq
                batch.logits[n] = int(last and k == len(tokens) - 1)
                n += 1
            outputs.append(((row, tokens), n - 1 if last else -1))
        batch.n_tokens = n
        rc = lib.llama_decode(self._ctx, batch)
        if rc != 0:
            log.error("llama_decode failed (rc %d) for %d rows", rc, len(plan))
            error = Internal(f"llama_decode failed ({rc})")
            for row, _ in plan:
                row.job.emit(error)
                row.fed = []  # its stream's content is unknown now
                self._leave(row)
            return None
        for (row, tokens), _ in outputs:
            row.fed += tokens
        return outputs

    def _advance(self, row: _Row, index: int) -> None:
        """Sample the row's next token from its logits and emit it; a finished row leaves."""
        pointer = self._lib.llama_get_logits_ith(self._ctx, index)
        logits = np.ctypeslib.as_array(pointer, shape=(self.model.n_vocab,))
        params = row.job.params
        # numpy, not torch, for the per-token math: torch's thread pool, woken for a 49k
        # vector, spins on the cores llama.cpp's threads need (~10% of decode speed).
        if params.temperature <= 0:
            token = int(logits.argmax())
        else:
            token = pick(torch.from_numpy(logits.copy()), params, row.generator)
        top = logits.max()
        logprob = float(logits[token] - top - np.log(np.exp(logits - top).sum()))
        if emit_token(row.job, row.stream, row.produced, token, logprob,
                      self.model.is_eog(token)):
            row.token = None
            self._leave(row)
        else:
            row.token = token


def _ahead(other: _Row, row: _Row) -> bool:
    """Whether `other` is about to compute at least MIN_REUSE of `row`'s next prompt tokens."""
    have = len(row.fed)
    shared = common_prefix(other.fed + other.pending, row.fed + row.pending)
    return shared - max(have, len(other.fed)) >= MIN_REUSE
