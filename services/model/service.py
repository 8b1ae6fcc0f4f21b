"""The model service's domain: pick the backend for a request, validate it, stream the answer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import AsyncIterator

from vfmos_runtime.errors import InvalidArgument, NotFound
from vfmos_runtime.protocol import MAX_NEW_TOKENS
from services.model.local import FirstTokenTrace, LocalBackend
from services.model.openai_compat import OpenAIBackend
from services.model.registry import ModelEntry, ModelRegistry
from services.model.types import GenParams, Piece

log = logging.getLogger("vfm-modeld")

ROLES = ("system", "user", "assistant")


class ModelService:
    """Holds the registry and one backend per model, started on first use (or preloaded)."""

    def __init__(self, registry: ModelRegistry, cache: Path, threads: int = 0,
                 max_batch: int = 8, prefix_cache_mb: int = 256, ttft_trace: Path | None = None,
                 engine: str = "auto", row_tokens: int = 4096):
        self.registry = registry
        self._trace = FirstTokenTrace(ttft_trace) if ttft_trace else None
        self._max_batch = max_batch
        self._prefix_cache_mb = prefix_cache_mb
        self._cache = cache
        self._threads = threads
        self._engine = engine
        self._row_tokens = row_tokens
        self._backends: dict[str, LocalBackend | OpenAIBackend] = {}

    def backend(self, name: str = ""):
        entry = self.registry.get(name)
        backend = self._backends.get(entry.name)
        if backend is None:
            backend = self._make(entry)
            backend.start()
            self._backends[entry.name] = backend
        return backend

    def _make(self, entry: ModelEntry):
        if entry.backend == "openai":
            return OpenAIBackend(entry)
        return LocalBackend(entry, self._cache, self._threads, self._max_batch,
                                 self._prefix_cache_mb, self._trace, self._engine,
                                 self._row_tokens)

    def max_batch(self, name: str) -> int:
        """Sequences the model decodes together (what the kernel may send at once)."""
        entry = self.registry.get(name)
        backend = self._backends.get(entry.name)
        if entry.backend == "openai":
            return int(entry.options.get("max_batch", 64))
        if backend is not None and backend.loaded:
            return backend.max_batch
        return self._max_batch

    def engine(self, name: str) -> str:
        """The engine serving a loaded local model ("llama.cpp" or "torch"), else empty."""
        backend = self._backends.get(self.registry.get(name).name)
        return getattr(backend, "engine_name", "") if backend is not None and backend.loaded \
            else ""

    def window(self, name: str) -> int:
        """The longest prompt plus answer the model takes: its registry window, or less
        where its engine holds less (a llama.cpp row)."""
        entry = self.registry.get(name)
        backend = self._backends.get(entry.name)
        if backend is not None and backend.loaded:
            return getattr(backend, "window", entry.context_window)
        return entry.context_window

    def is_loaded(self, name: str) -> bool:
        backend = self._backends.get(self.registry.get(name).name)
        return backend is not None and backend.loaded

    async def generate(self, model: str, messages: list[dict], params: GenParams,
                       tenant: str = "") -> AsyncIterator[Piece]:
        self._validate(messages, params)
        entry = self.check_tenant(model, tenant)
        if params.tools_json and entry.backend != "openai":
            raise InvalidArgument(f"model {entry.name} runs here ({entry.backend}) and takes no "
                                  "tools: only a model behind an OpenAI-compatible server does")
        backend = self.backend(model)
        async for piece in backend.generate(messages, params):
            yield piece

    def check_tenant(self, model: str, tenant: str) -> ModelEntry:
        """The model, if `tenant` may use it: another tenant's adapter reads as unknown."""
        entry = self.registry.get(model)
        owner = entry.options.get("tenant", "")
        if owner and owner != tenant:
            raise NotFound(f"unknown model {model!r}")
        return entry

    @staticmethod
    def _validate(messages: list[dict], params: GenParams) -> None:
        if not messages or not any(m["content"].strip() for m in messages):
            raise InvalidArgument("the request has no message with content")
        for m in messages:
            if m["role"] not in ROLES:
                raise InvalidArgument(f"unknown role {m['role']!r}; use {', '.join(ROLES)}")
        if not 1 <= params.max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidArgument(f"max_new_tokens must be 1..{MAX_NEW_TOKENS}, "
                                  f"got {params.max_new_tokens}")
        if not 0 <= params.temperature <= 5 or not 0 <= params.top_p <= 1:
            raise InvalidArgument("temperature must be 0..5 and top_p 0..1")

    def stop(self) -> None:
        for backend in self._backends.values():
            backend.stop()
        if self._trace is not None:
            self._trace.close()
