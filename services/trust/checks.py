"""What every check shares: the text it looks at (with one embedding for all the checks that
need it) and the finding it returns. Checks are plain objects: no wire, no storage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np


@dataclass(frozen=True)
class Span:
    """Characters [start, end) of the checked text, what they are, and what replaces them
    when the text is redacted ("" = not replaced)."""

    start: int
    end: int
    label: str
    replacement: str = ""


@dataclass(frozen=True)
class Finding:
    """One check's result on one text. `score` is a calibrated probability (0..1) that the
    text is what the check looks for; the policy compares it with its threshold."""

    check: str
    score: float
    reason: str = ""
    spans: tuple[Span, ...] = ()
    system: int = 1
    elapsed_ms: float = 0.0
    details: dict = field(default_factory=dict)  # per-category scores and the like


class Text:
    """A text under check. Its embedding is computed once, on first use, and shared by every
    check that asks for it."""

    def __init__(self, value: str, embed: Callable[[list[str]], np.ndarray] | None = None,
                 namespace: str = ""):
        self.value = value
        self._embed = embed
        self._vector: np.ndarray | None = None
        self.namespace = namespace  # whose text (the tenant): what a check keeps stays apart

    @property
    def embedding(self) -> np.ndarray:
        if self._vector is None:
            if self._embed is None:
                raise RuntimeError("this Text was made without an embedder")
            self._vector = self._embed([self.value])[0]
        return self._vector

    def preset(self, vector: np.ndarray) -> "Text":
        """Give it an embedding computed elsewhere (a batch of texts embedded together)."""
        self._vector = vector
        return self


class Check(Protocol):
    """A system-1 check on one text."""

    name: str

    def check(self, text: Text) -> Finding:
        ...
