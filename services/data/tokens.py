"""Token counts in the default model's tokenizer, so working-set budgets mean model tokens."""

from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger("vfm-datad.tokens")


class TokenCounter:
    """Counts with the model's own tokenizer.json (from vfm-modeld's converted-model cache);
    until that exists, estimates from characters and says so once."""

    CHARS_PER_TOKEN = 3.6  # measured on LoCoMo turns with SmolLM2's tokenizer

    def __init__(self, model_dir: Path | None):
        self._dir = model_dir
        self._tokenizer = None
        self._warned = False

    def _load(self):
        if self._tokenizer is None and self._dir is not None:
            path = self._dir / "tokenizer.json"
            if path.exists():
                from tokenizers import Tokenizer

                self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    @property
    def exact(self) -> bool:
        return self._load() is not None

    def count(self, texts: list[str]) -> list[int]:
        tokenizer = self._load()
        if tokenizer is None:
            if not self._warned:
                log.warning("no tokenizer at %s yet: estimating token counts from characters",
                            self._dir)
                self._warned = True
            return [max(1, math.ceil(len(t) / self.CHARS_PER_TOKEN)) for t in texts]
        return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
