"""Continuous batching: sequences join and leave one running batch between decode steps."""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer

from vfmos_runtime.errors import Internal
from services.model import layerwise
from services.model.decode import TextStream, emit_token, eos_ids, pick
from services.model.prefix import KV, PrefixCache, common_prefix
from services.model.types import GenParams, Piece

log = logging.getLogger("vfm-modeld.batch")


@dataclass
class Job:
    """One request handed to the engine; `emit` delivers pieces (thread-safe)."""

    input_ids: list[int]
    params: GenParams
    emit: Callable[[Piece | Exception], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    taken_at: float = 0.0          # the engine took it from the queue
    prefill_at: float = 0.0        # its own prefill began
    first_at: float = 0.0          # its first token was sampled
    others_prefill_s: float = 0.0  # other arrivals' prefills while it waited
    group: int = 0                 # rows prefilled in the same forward
    interleaved: bool = False      # prefilled between two layers of a running step

    def first_token_ms(self) -> dict[str, float]:
        """Where the engine's part of this job's time to first token went, in ms: waiting
        for the running decode step (or bookkeeping), for other arrivals' prefills, and
        its own prefill; `held` is the part of the wait after the engine saw the job."""
        wait = self.prefill_at - self.queued_at
        return {"engine": (self.first_at - self.queued_at) * 1000,
                "step": (wait - self.others_prefill_s) * 1000,
                "others_prefill": self.others_prefill_s * 1000,
                "prefill": (self.first_at - self.prefill_at) * 1000,
                "held": (self.prefill_at - self.taken_at) * 1000}


@dataclass
class _Row:
    job: Job
    stream: TextStream
    generator: torch.Generator | None
    token: int = 0
    produced: list[int] = field(default_factory=list)
    fresh: bool = False   # its next token is already sampled (at join); feed it, don't resample


@dataclass
class EngineStats:
    steps: int = 0
    rows_decoded: int = 0          # sum over steps of the batch size
    max_rows: int = 0
    prefills: int = 0              # forward passes that admitted arrivals
    prefill_tokens: int = 0        # prompt tokens computed
    prefill_seconds: float = 0.0
    prefix_hits: int = 0           # arrivals that skipped a shared prefix
    prefix_tokens_reused: int = 0  # prompt tokens those arrivals did not compute
    cancelled: int = 0             # rows dropped because their caller left
    last_cancel_step: int = 0      # `steps` when the latest of them was dropped
    interleaved: int = 0           # urgent arrivals prefilled between two layers of a step
    heap_trims: int = 0            # times the engine gave freed memory back (idle, or busy 30 s)


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends into spare room instead of concatenating: the stock one
    copies the whole cache once per decoded token. Assigning `keys`/`values` adopts a tensor
    as is; the next append moves it into a buffer with room. Merges and row selection build
    buffers with room themselves (`length` = the part in use): one copy, not two."""

    SPARE = 128  # tokens of room added per growth: one copy per 128 steps, not per step

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None,
                 length: int | None = None):
        self._k = self._v = None
        self._len, self._room = 0, 0
        super().__init__()
        if keys is not None:
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
            self.keys, self.values = keys, values
            if length is not None:
                self._len, self._room = length, keys.shape[-2] - length

    @property
    def keys(self):
        return None if self._k is None else self._k[:, :, :self._len]

    @keys.setter
    def keys(self, tensor):
        self._k, self._room = tensor, 0
        self._len = 0 if tensor is None else tensor.shape[-2]

    @property
    def values(self):
        return None if self._v is None else self._v[:, :, :self._len]

    @values.setter
    def values(self, tensor):
        self._v = tensor

    def keep_rows(self, keep: list[int], start: int) -> None:
        """Keep rows `keep` (ascending) from column `start` on, in place: the rows after a
        dropped one move up, nothing is allocated (a new buffer costs page faults)."""
        for buffer in (self._k, self._v):
            for j, i in enumerate(keep):
                if i != j:  # the part in use only: the room's pages may not exist yet
                    buffer[j, :, start:self._len] = buffer[i, :, start:self._len]
        n = len(keep)
        self._k, self._v = self._k[:n, :, start:], self._v[:n, :, start:]
        self._len -= start  # the room on the right is unchanged

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self._len, self._len + key_states.shape[-2]
        if end > self._len + self._room:
            self._k, self._v = (_with_room(t, start, end + self.SPARE, new)
                                for t, new in ((self._k, key_states), (self._v, value_states)))
            self._room = self._k.shape[-2] - start
        self._k[:, :, start:end] = key_states
        self._v[:, :, start:end] = value_states
        self._len, self._room = end, self._room - (end - start)
        return self.keys, self.values


def _with_room(old: torch.Tensor, length: int, capacity: int, like: torch.Tensor) -> torch.Tensor:
    rows, heads, _, dim = like.shape
    buffer = like.new_empty((rows, heads, capacity, dim))
    buffer[:, :, :length] = old[:, :, :length]
    return buffer


def _cache(kv: KV | None = None) -> Cache:
    if not kv:
        return Cache(layer_class_to_replicate=_GrowingLayer)
    return Cache(layers=[_GrowingLayer(k, v) for k, v in kv])


def _room_like(t: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    return t.new_empty((rows, t.shape[1], length + _GrowingLayer.SPARE, t.shape[3]))


def _stacked(blocks: list[KV], width: int) -> Cache:
    """The row blocks' KV left-padded with zeros to `width` and stacked, in buffers with room."""
    rows = sum(block[0][0].shape[0] for block in blocks)
    layers = []
    for parts in zip(*blocks):
        buffers = [_room_like(parts[0][0], rows, width), _room_like(parts[0][1], rows, width)]
        at = 0
        for part in parts:
            n, pad = part[0].shape[0], width - part[0].shape[2]
            for buffer, tensor in zip(buffers, part):
                buffer[at:at + n, :, :pad] = 0
                buffer[at:at + n, :, pad:width] = tensor
            at += n
        layers.append(_GrowingLayer(*buffers, length=width))
    return Cache(layers=layers)


def _layers(cache: Cache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


@dataclass
class _Prefill:
    """Arrivals after their prompt forward: left-padded KV, mask, last-position logits."""

    kv: KV
    mask: torch.Tensor
    logits: torch.Tensor


# Prompt tokens computed in one prefill forward. Its transient memory (attention scores,
# MLP activations) grows with rows x length: 8 rows of 1,400 tokens took 1.1 GB above the
# model, 3 rows 0.4 GB. More arrivals than this are prefilled in several forwards, so the
# daemon's peak does not grow with the batch's working sets.
PREFILL_TOKENS = 4096
# Under steady load the engine is never idle, so freed memory is also given back this often.
TRIM_EVERY_S = 30.0


def prefill_groups(jobs: list[Job], budget: int) -> list[list[Job]]:
    """`jobs` in order, cut into groups of at most `budget` prompt tokens (a longer prompt
    goes alone)."""
    groups: list[list[Job]] = []
    tokens = budget + 1
    for job in jobs:
        if tokens + len(job.input_ids) > budget:
            groups.append([])
            tokens = 0
        groups[-1].append(job)
        tokens += len(job.input_ids)
    return groups


def _heap_trimmer() -> Callable[[], None]:
    """glibc keeps the memory a batch freed (padded activations, KV) at its high-water mark
    (an RSS that doubles under load and stays); malloc_trim gives it back to the system.
    Elsewhere a no-op."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class BatchEngine:
    """Owns the model in one thread. Between steps it drops cancelled rows, admits queued
    jobs (prefilled together, a shared prompt prefix computed once) and left-pads them into
    the batch; each step is one forward pass for every active row."""

    def __init__(self, model, tokenizer, max_batch: int = 8, prefix_cache_mb: int = 256,
                 prefill_tokens: int = PREFILL_TOKENS):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.stats = EngineStats()
        self.prefixes = PrefixCache(prefix_cache_mb << 20) if prefix_cache_mb > 0 else None
        self._eos = set(eos_ids(model, tokenizer))
        self._pad = tokenizer.pad_token_id or 0
        self._stopping = threading.Event()
        self._trim_heap = _heap_trimmer()
        self._worked = False  # something ran since the engine was last idle
        self._trimmed_at = time.monotonic()
        self._rows: list[_Row] = []
        self._cache = _cache()
        self._mask = torch.zeros((0, 0), dtype=torch.long)
        self._logits = torch.zeros((0, 0))
        self._layerwise = layerwise.supported(model)
        self._jobs: queue.Queue | None = None
        self._held: list[Job | None] = []   # taken from the queue mid-step, admitted next
        # Rows prefilled mid-forward, merged when it ends and the batch has room for them.
        self._joined: list[tuple[list[_Row], _Prefill, list[int]]] = []
        self._top_priority = 0  # of the rows in the forward running now
        self._prefill_spans: deque[tuple[float, float]] = deque(maxlen=64)  # (start, end)

    def active_jobs(self) -> list[Job]:
        return [row.job for row in self._rows]

    def stop(self) -> None:
        """Leave `run` after the current step (a full batch may not read the queue soon)."""
        self._stopping.set()

    @torch.inference_mode()
    def run(self, jobs: "queue.Queue[Job | None]") -> None:
        """Serve jobs until a None arrives; an exception here means the engine is dead."""
        self._jobs = jobs
        while not self._stopping.is_set() and self._admit(jobs):
            if self._rows:
                self._step()

    def _admit(self, jobs: "queue.Queue[Job | None]") -> bool:
        self._drop_cancelled()  # free their slots first: a preempted row makes room now
        self._merge_joined()
        block = not self._rows  # idle: sleep until work comes
        if self._worked and ((block and not self._held)
                             or time.monotonic() - self._trimmed_at >= TRIM_EVERY_S):
            self._give_back_memory()  # when the last row has left, and now and then when busy
        arrivals: list[Job] = []
        running = True
        while len(self._rows) + self._waiting() + len(arrivals) < self.max_batch:
            try:
                job = self._held.pop(0) if self._held else jobs.get(block=block)
            except queue.Empty:
                break
            if job is None:
                running = False
                break
            block = False
            if not job.cancel.is_set():
                job.taken_at = job.taken_at or time.perf_counter()
                arrivals.append(job)
        # The most urgent arrival is prefilled alone, first; the rest share one forward.
        arrivals.sort(key=lambda j: -j.params.priority)
        urgent = 1 if len(arrivals) == 1 or (
            len(arrivals) > 1 and arrivals[0].params.priority > arrivals[1].params.priority) else 0
        for group in (arrivals[:urgent], *prefill_groups(arrivals[urgent:], self.prefill_tokens)):
            if group:
                self._join(group)
        return running

    def _give_back_memory(self) -> None:
        self._trim_heap()
        self._trimmed_at = time.monotonic()
        self._worked = bool(self._rows)
        self.stats.heap_trims += 1

    def _join(self, group: list[Job]) -> None:
        """Prefill `group` and merge it into the batch. A more urgent arrival may be
        prefilled between two layers of this prefill (see _between_layers)."""
        self._top_priority = max(j.params.priority for j in (*self.active_jobs(), *group))
        self._worked = True
        joined = self._prefill_rows(group, self._between_layers)
        if joined is not None and joined[0]:
            self._merge(*joined)
        self._merge_joined()  # urgent arrivals prefilled meanwhile decode from the next step

    def _waiting(self) -> int:
        return sum(len(rows) for rows, _, _ in self._joined)

    def _merge_joined(self) -> None:
        """Rows prefilled mid-forward join the batch while it has room. A full batch makes
        room soon: the kernel sends an urgent ask right after preempting a row, and that
        row's cancel may land a moment after the ask."""
        while self._joined and len(self._rows) + len(self._joined[0][0]) <= self.max_batch:
            self._merge(*self._joined.pop(0))

    def _between_layers(self) -> None:
        """Mid-forward (a decode step or a prefill): an arrival more urgent than every row
        in it is prefilled now and its first token sent, even into a full batch; it joins
        the batch when the forward ends and there is room. Others wait for the step's end."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.taken_at = time.perf_counter()
            if (job is None or job.cancel.is_set() or job.params.priority <= self._top_priority
                    or self._waiting() >= self.max_batch):  # bounds the KV kept waiting
                self._held.append(job)
                continue
            job.interleaved = True
            joined = self._prefill_rows([job])
            self.stats.interleaved += 1
            if joined is not None and joined[0]:
                self._joined.append(joined)

    def _prefill_rows(self, group: list[Job], between: Callable[[], None] | None = None
                      ) -> tuple[list[_Row], _Prefill, list[int]] | None:
        """Prefill arrivals and send each its first token; the rows still to be merged.
        `between` is called between two layers of the forward (where supported)."""
        started = time.perf_counter()
        for job in group:
            job.prefill_at, job.group = started, len(group)
            job.others_prefill_s = sum(max(0.0, min(end, started) - max(begin, job.queued_at))
                                       for begin, end in self._prefill_spans)
        try:
            prefill = self._prefill([job.input_ids for job in group], between)
        except Exception as exc:  # a bad request must not take the batch down
            log.exception("prefill failed")
            for job in group:
                job.emit(Internal(f"prefill failed: {exc}"))
            return None
        done = time.perf_counter()
        elapsed = done - started
        self._prefill_spans.append((started, done))
        self.stats.prefills += 1
        self.stats.prefill_seconds += elapsed
        log.debug("prefilled %d arrival(s) in %.0f ms (waited %.0f ms); %d rows", len(group),
                  elapsed * 1000, (started - min(j.queued_at for j in group)) * 1000,
                  len(self._rows) + len(group))
        rows, keep = [], []
        for i, job in enumerate(group):
            generator = None
            if job.params.temperature > 0:
                generator = torch.Generator().manual_seed(job.params.seed)
            row = _Row(job, TextStream(self.tokenizer, job.params.stop), generator)
            job.first_at = done
            # Sample and send the first token now: time to first token is one prefill, not
            # a prefill plus a wait for the batch's next step.
            if self._advance(row, prefill.logits[i]):
                row.fresh = True
                rows.append(row)
                keep.append(i)
        return rows, prefill, keep

    def _prefill(self, prompts: list[list[int]], between: Callable[[], None] | None) -> _Prefill:
        """One forward for the arrivals. A prefix they share is taken from the prefix cache,
        or computed once for all of them, and every row computes only the rest."""
        shared = min(len(p) for p in prompts) - 1  # each row computes its last token at least
        for prompt in prompts[1:]:
            shared = min(shared, common_prefix(prompts[0], prompt))
        reused, past, once = 0, None, 0
        if self.prefixes is not None:
            reused, past = self.prefixes.lookup(prompts[0], shared)
            if len(prompts) > 1 and shared - reused >= self.prefixes.min_tokens:
                once = shared - reused
                past = self._extend(prompts[0][reused:shared], past, between)
                self.stats.prefill_tokens += once
                reused = shared
        if reused:  # the part computed once here counts as paid by the first row
            self.stats.prefix_hits += len(prompts) - (reused == once)
            self.stats.prefix_tokens_reused += reused * len(prompts) - once
        prefill = self._forward_suffixes(prompts, reused, past, between)
        if self.prefixes is not None:
            for i, prompt in enumerate(prompts):
                start = prefill.mask.shape[1] - len(prompt)
                self.prefixes.store(prompt, [(k[i:i + 1, :, start:], v[i:i + 1, :, start:])
                                             for k, v in prefill.kv])
        return prefill

    def _extend(self, tokens: list[int], past: KV | None, between: Callable[[], None] | None) -> KV:
        cache = _cache(past)
        start = past[0][0].shape[2] if past else 0
        positions = torch.arange(start, start + len(tokens))[None]
        self._forward(torch.tensor([tokens]), None, positions, cache, between)
        return _layers(cache)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                 cache: Cache, between: Callable[[], None] | None = None) -> torch.Tensor:
        """The last position's logits; with `between`, layer by layer, calling it between."""
        if between is not None and self._layerwise:
            return layerwise.last_logits(self.model, ids, mask, positions, cache, between)
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                          past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def _forward_suffixes(self, prompts: list[list[int]], reused: int, past: KV | None,
                          between: Callable[[], None] | None) -> _Prefill:
        """Left-pad the unshared parts behind the shared prefix, run them, then move each
        row's padding to the left end so the result merges like any left-padded row."""
        rows = len(prompts)
        width = max(len(p) for p in prompts) - reused
        pads = [width - (len(p) - reused) for p in prompts]
        ids = torch.tensor([[self._pad] * pad + p[reused:] for pad, p in zip(pads, prompts)])
        mask = torch.tensor([[1] * reused + [0] * pad + [1] * (width - pad) for pad in pads])
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, reused:]
        cache = _cache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                        for k, v in past] if past else None)
        logits = self._forward(ids, mask, positions, cache, between)
        self.stats.prefill_tokens += int(mask[:, reused:].sum())
        kv = _layers(cache)
        if reused and any(pads):
            order = torch.tensor([list(range(reused, reused + pad)) + list(range(reused))
                                  + list(range(reused + pad, reused + width)) for pad in pads])
            mask = mask.gather(1, order)
            index = order[:, None, :, None].expand(-1, kv[0][0].shape[1], -1, kv[0][0].shape[3])
            kv = [(k.gather(2, index), v.gather(2, index)) for k, v in kv]
        return _Prefill(kv, mask, logits)

    def _merge(self, rows: list[_Row], prefill: _Prefill, keep: list[int]) -> None:
        """Left-pad the arrivals or the batch so both share one length, then stack them."""
        kv, mask, logits = prefill.kv, prefill.mask, prefill.logits
        if len(keep) < mask.shape[0]:
            index = torch.tensor(keep)
            kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in kv]
            mask, logits = mask.index_select(0, index), logits.index_select(0, index)
            kv, mask = _trim(kv, mask)
        if not self._rows:
            self._cache = _stacked([kv], mask.shape[1])
            self._mask, self._logits, self._rows = mask, logits, rows
            return
        old, new = self._mask.shape[1], mask.shape[1]
        width = max(old, new)
        self._cache = _stacked([_layers(self._cache), kv], width)
        self._mask = torch.cat([torch.nn.functional.pad(self._mask, (width - old, 0)),
                                torch.nn.functional.pad(mask, (width - new, 0))])
        self._logits = torch.cat([self._logits, logits])
        self._rows += rows

    def _step(self) -> None:
        """Sample one token per row, emit, drop finished rows, then one forward for the rest."""
        keep = []
        for i, row in enumerate(self._rows):
            if row.job.cancel.is_set():
                self._release(i)
            elif row.fresh:
                row.fresh = False
                keep.append(i)
            elif self._advance(row, self._logits[i]):
                keep.append(i)
        if len(keep) != len(self._rows):
            self._select(keep)
        if not self._rows:
            return
        self._mask = torch.nn.functional.pad(self._mask, (0, 1), value=1)
        positions = self._mask.sum(dim=1, keepdim=True) - 1
        ids = torch.tensor([[r.token] for r in self._rows])
        self._top_priority = max(r.job.params.priority for r in self._rows)
        try:
            self._logits = self._forward(ids, self._mask, positions, self._cache,
                                         self._between_layers if self._jobs is not None else None)
        except Exception as exc:  # e.g. out of memory: these requests fail, the engine goes on
            log.exception("decode step failed")
            failed = Internal(f"decode step failed: {exc}")
            self._fail_all(failed)
            for rows, _, _ in self._joined:
                for row in rows:
                    row.job.emit(failed)
            self._joined.clear()
            return
        self._merge_joined()
        self.stats.steps += 1
        self.stats.rows_decoded += len(self._rows)
        self.stats.max_rows = max(self.stats.max_rows, len(self._rows))

    def _advance(self, row: _Row, logits: torch.Tensor) -> bool:
        """Pick the row's next token and emit it; False when the row is finished."""
        params = row.job.params
        token = pick(logits, params, row.generator)
        # The model's own probability of its token (temperature 1): a cascade's confidence.
        logprob = float(logits[token] - torch.logsumexp(logits, dim=-1))
        row.token = token
        return not emit_token(row.job, row.stream, row.produced, token, logprob,
                              token in self._eos)

    def _drop_cancelled(self) -> None:
        cancelled = [i for i, r in enumerate(self._rows) if r.job.cancel.is_set()]
        for i in cancelled:
            self._release(i)
        if cancelled:
            self._select([i for i in range(len(self._rows)) if i not in cancelled])

    def _release(self, i: int) -> None:
        """A cancelled row leaves. Its KV is kept as a prefix: a preempted answer resumes
        (its prompt plus what it said so far) without recomputing any of it."""
        row = self._rows[i]
        self.stats.cancelled += 1
        self.stats.last_cancel_step = self.stats.steps
        if self.prefixes is None or not row.produced:
            return
        real = self._mask[i].bool()
        said = row.job.input_ids + row.produced
        self.prefixes.store(said[:int(real.sum())], [(k[i:i + 1, :, real], v[i:i + 1, :, real])
                                                     for k, v in _layers(self._cache)])

    def _select(self, keep: list[int]) -> None:
        """Keep only rows `keep`, then drop the left columns that are padding for all of them."""
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = _cache(), torch.zeros((0, 0), dtype=torch.long)
            return
        index = torch.tensor(keep)
        mask = self._mask.index_select(0, index)
        start = _padding_columns(mask)
        for layer in self._cache.layers:
            layer.keep_rows(keep, start)
        self._mask = mask[:, start:]
        self._logits = self._logits.index_select(0, index)

    def _fail_all(self, error: Exception) -> None:
        for row in self._rows:
            row.job.emit(error)
        self._select([])


def _padding_columns(mask: torch.Tensor) -> int:
    """How many left columns are padding in every row."""
    return int((mask.cumsum(dim=1) == 0).sum(dim=1).min())


def _trim(kv: KV, mask: torch.Tensor) -> tuple[KV, torch.Tensor]:
    """Drop the left columns that are padding in every row."""
    start = _padding_columns(mask)
    if not start:
        return kv, mask
    return [(k[:, :, start:], v[:, :, start:]) for k, v in kv], mask[:, start:]
