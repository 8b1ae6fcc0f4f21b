"""Continuous batching: sequences join and leave one running batch between decode steps."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from services.model.decode import TextStream, eos_ids, pick
from services.model.types import GenParams, Piece

log = logging.getLogger("vfm-modeld.batch")

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, heads, T, dim]


@dataclass
class Job:
    """One request handed to the engine; `emit` delivers pieces (thread-safe)."""

    input_ids: list[int]
    params: GenParams
    emit: Callable[[Piece | Exception], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Row:
    job: Job
    stream: TextStream
    generator: torch.Generator | None
    token: int = 0
    produced: int = 0
    fresh: bool = False   # its next token is already sampled (at join); feed it, don't resample


@dataclass
class EngineStats:
    steps: int = 0
    rows_decoded: int = 0          # sum over steps of the batch size
    max_rows: int = 0
    prefill_tokens: int = 0
    prefix_hits: int = 0
    prefix_tokens_reused: int = 0


class PrefixCache:
    """KV of recent prompts; a new prompt reuses the longest common prefix it shares."""

    def __init__(self, entries: int = 32, min_tokens: int = 8):
        self._entries: OrderedDict[tuple[int, ...], KV] = OrderedDict()
        self._size = entries
        self._min = min_tokens

    def lookup(self, ids: list[int]) -> tuple[int, KV | None]:
        best, best_kv = 0, None
        for key, kv in self._entries.items():
            n = 0
            for a, b in zip(key, ids):
                if a != b:
                    break
                n += 1
            if n > best:
                best, best_kv = n, kv
        # Keep at least one token to prefill: its logits start the answer.
        best = min(best, len(ids) - 1)
        if best < self._min or best_kv is None:
            return 0, None
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in best_kv]

    def store(self, ids: list[int], kv: KV) -> None:
        key = tuple(ids)
        self._entries[key] = kv
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class BatchEngine:
    """Owns the model in one thread. Between steps it admits queued jobs (prefilled alone,
    then left-padded into the batch KV) and drops finished or cancelled rows; each step is
    one forward pass for every active row."""

    def __init__(self, model, tokenizer, max_batch: int = 8, prefix_cache: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.stats = EngineStats()
        self._prefixes = PrefixCache() if prefix_cache else None
        self._eos = set(eos_ids(model, tokenizer))
        self._rows: list[_Row] = []
        self._kv: KV = []
        self._mask = torch.zeros((0, 0), dtype=torch.long)
        self._logits = torch.zeros((0, 0))

    def active_jobs(self) -> list[Job]:
        return [row.job for row in self._rows]

    @torch.inference_mode()
    def run(self, jobs: "queue.Queue[Job | None]") -> None:
        """Serve jobs until a None arrives."""
        while True:
            if not self._admit(jobs):
                return
            if self._rows:
                self._step()

    def _admit(self, jobs: "queue.Queue[Job | None]") -> bool:
        cancelled = [i for i, r in enumerate(self._rows) if r.job.cancel.is_set()]
        if cancelled:  # free their slots before admitting: a preempted row makes room now
            self._select([i for i in range(len(self._rows)) if i not in cancelled])
        block = not self._rows  # idle: sleep until work comes
        arrivals: list[Job] = []
        running = True
        while len(self._rows) + len(arrivals) < self.max_batch:
            try:
                job = jobs.get(block=block)
            except queue.Empty:
                break
            if job is None:
                running = False
                break
            block = False
            if not job.cancel.is_set():
                arrivals.append(job)
        # The most urgent arrival is prefilled alone, first (and reuses its prefix); the rest
        # share one padded forward.
        arrivals.sort(key=lambda j: -j.params.priority)
        urgent = 1 if len(arrivals) == 1 or (
            len(arrivals) > 1 and arrivals[0].params.priority > arrivals[1].params.priority) else 0
        for batch in (arrivals[:urgent], arrivals[urgent:]):
            try:
                if len(batch) == 1:
                    self._join(batch[0])
                elif batch:
                    self._join_group(batch)
            except Exception as exc:  # a bad request must not take the batch down
                log.exception("prefill failed")
                for job in batch:
                    job.emit(exc)
        return running

    def _join(self, job: Job) -> None:
        from transformers import DynamicCache

        ids = job.input_ids
        started = time.perf_counter()
        reused, past = self._prefixes.lookup(ids) if self._prefixes else (0, None)
        cache = DynamicCache(past) if past else DynamicCache()
        out = self.model(input_ids=torch.tensor([ids[reused:]]), past_key_values=cache,
                         use_cache=True)
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self.stats.prefill_tokens += len(ids) - reused
        if reused:
            self.stats.prefix_hits += 1
            self.stats.prefix_tokens_reused += reused
        if self._prefixes is not None:
            self._prefixes.store(ids, kv)
        log.debug("joined after %.0f ms in queue; prefill %d tokens (%d reused) in %.0f ms; "
                  "%d rows", (started - job.queued_at) * 1000, len(ids) - reused, reused,
                  (time.perf_counter() - started) * 1000, len(self._rows) + 1)
        self._start_row(job, kv, out.logits[:, -1])

    def _join_group(self, group: list[Job]) -> None:
        """Prefill several arrivals in one left-padded forward: one pass instead of one each."""
        from transformers import DynamicCache

        started = time.perf_counter()
        width = max(len(j.input_ids) for j in group)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(j.input_ids)) + j.input_ids for j in group])
        mask = torch.tensor([[0] * (width - len(j.input_ids)) + [1] * len(j.input_ids)
                             for j in group])
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=DynamicCache(), use_cache=True)
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self.stats.prefill_tokens += int(mask.sum())
        log.debug("prefilled %d arrivals together (%d tokens wide) in %.0f ms", len(group),
                  width, (time.perf_counter() - started) * 1000)
        for i, job in enumerate(group):
            start = width - len(job.input_ids)
            kv = [(k[i:i + 1, :, start:], v[i:i + 1, :, start:]) for k, v in layers]
            if self._prefixes is not None:
                self._prefixes.store(job.input_ids, kv)
            self._start_row(job, kv, out.logits[i:i + 1, -1])

    def _start_row(self, job: Job, kv: KV, logits: torch.Tensor) -> None:
        generator = None
        if job.params.temperature > 0:
            generator = torch.Generator().manual_seed(job.params.seed)
        row = _Row(job, TextStream(self.tokenizer, job.params.stop), generator)
        # Sample and send the first token now: time to first token is one prefill, not a
        # prefill plus a wait for the batch's next step.
        if self._advance(row, logits[0]):
            row.fresh = True
            self._merge(row, kv, logits)

    def _merge(self, row: _Row, kv: KV, logits: torch.Tensor) -> None:
        """Left-pad the new row or the batch so both share one sequence length, then stack."""
        length = kv[0][0].shape[2]
        width = self._mask.shape[1]
        if not self._rows:
            self._kv, self._mask = kv, torch.ones((1, length), dtype=torch.long)
            self._logits = logits
            self._rows = [row]
            return
        if length > width:
            self._kv = [(_pad_left(k, length - width), _pad_left(v, length - width))
                        for k, v in self._kv]
            self._mask = torch.nn.functional.pad(self._mask, (length - width, 0))
            width = length
        new_mask = torch.zeros((1, width), dtype=torch.long)
        new_mask[:, width - length:] = 1
        self._kv = [(torch.cat([k, _pad_left(nk, width - length)]),
                     torch.cat([v, _pad_left(nv, width - length)]))
                    for (k, v), (nk, nv) in zip(self._kv, kv)]
        self._mask = torch.cat([self._mask, new_mask])
        self._logits = torch.cat([self._logits, logits])
        self._rows.append(row)

    def _step(self) -> None:
        """Sample one token per row, emit, drop finished rows, then one forward for the rest."""
        keep = []
        for i, row in enumerate(self._rows):
            if row.job.cancel.is_set():
                continue
            if row.fresh:
                row.fresh = False
                keep.append(i)
            elif self._advance(row, self._logits[i]):
                keep.append(i)
        if len(keep) != len(self._rows):
            self._select(keep)
        if not self._rows:
            return
        from transformers import DynamicCache

        self._mask = torch.cat([self._mask, torch.ones((len(self._rows), 1), dtype=torch.long)],
                               dim=1)
        positions = (self._mask.sum(dim=1, keepdim=True) - 1)
        out = self.model(input_ids=torch.tensor([[r.token] for r in self._rows]),
                         attention_mask=self._mask, position_ids=positions,
                         past_key_values=DynamicCache(self._kv), use_cache=True)
        self._kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self._logits = out.logits[:, -1]
        self.stats.steps += 1
        self.stats.rows_decoded += len(self._rows)
        self.stats.max_rows = max(self.stats.max_rows, len(self._rows))

    def _advance(self, row: _Row, logits: torch.Tensor) -> bool:
        """Pick the row's next token and emit it; False when the row is finished."""
        params = row.job.params
        token = pick(logits, params, row.generator)
        finish = ""
        if token in self._eos:
            finish = "stop"
        else:
            row.produced += 1
            row.token = token
            text, stopped = row.stream.push(token)
            row.job.emit(Piece(text=text, tokens=1, prompt_tokens=len(row.job.input_ids),
                               token_ids=(token,)))
            if stopped:
                finish = "stop"
            elif row.produced >= params.max_new_tokens:
                finish = "length"
        if finish:
            row.job.emit(Piece(text=row.stream.flush(), tokens=0,
                               prompt_tokens=len(row.job.input_ids), done=True,
                               finish_reason=finish, completion_tokens=row.produced))
            return False
        return True

    def _select(self, keep: list[int]) -> None:
        """Keep only rows `keep`, then drop the left columns that are padding for all of them."""
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._kv, self._mask = [], torch.zeros((0, 0), dtype=torch.long)
            return
        index = torch.tensor(keep)
        mask = self._mask.index_select(0, index)
        start = int((mask.cumsum(dim=1) == 0).sum(dim=1).min())
        self._mask = mask[:, start:]
        self._kv = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                    for k, v in self._kv]
        self._logits = self._logits.index_select(0, index)


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, 0, n, 0)) if n > 0 else t
