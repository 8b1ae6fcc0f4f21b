"""Per-sequence decoding pieces: sampling, incremental detokenisation, stop sequences."""

from __future__ import annotations

import torch

from services.model.types import GenParams


class TextStream:
    """Turns a growing token list into text pieces, holding back what may still change:
    an incomplete UTF-8 character, or a tail that could be the start of a stop sequence."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._tokens: list[int] = []
        self._sent = 0
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new text safe to emit, whether a stop sequence was hit)."""
        self._tokens.append(token)
        self.text = self._tokenizer.decode(self._tokens, skip_special_tokens=True)
        for stop in self._stop:
            at = self.text.find(stop)
            if at != -1:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        if self.text.endswith("\ufffd"):
            return "", False
        return self._take(max(self._sent, len(self.text) - self._hold)), False

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        piece = self.text[self._sent:upto]
        self._sent = max(self._sent, upto)
        return piece


def pick(logits: torch.Tensor, params: GenParams, generator: torch.Generator | None) -> int:
    if params.temperature <= 0:
        return int(torch.argmax(logits, dim=-1))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if 0 < params.top_p < 1:
        ordered, index = torch.sort(probs, descending=True)
        keep = torch.cumsum(ordered, dim=-1) - ordered < params.top_p
        probs = torch.zeros_like(probs).scatter(-1, index[keep], ordered[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids
