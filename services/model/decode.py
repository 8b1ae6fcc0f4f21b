"""Per-sequence decoding pieces: sampling, incremental detokenisation, stop sequences."""

from __future__ import annotations

import torch

from services.model.types import GenParams, Piece


class TextStream:
    """Turns a growing token list into text pieces, holding back what may still change:
    an incomplete UTF-8 character, or a tail that could be the start of a stop sequence.
    Only a window of recent tokens is decoded per token, so a long answer costs the same
    per token as a short one."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._hold = max(self._longest_stop, 1) - 1
        self._tokens: list[int] = []
        self._window = 0   # tokens before it are in `text` for good
        self._read = 0     # tokens before it are in `text`
        self._sent = 0
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new text safe to emit, whether a stop sequence was hit)."""
        self._tokens.append(token)
        # Decode the last complete token(s) with the new ones: a token's text can depend on
        # its neighbour (a character split across tokens), never on anything earlier.
        before = self._decode(self._tokens[self._window:self._read])
        after = self._decode(self._tokens[self._window:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return "", False  # an incomplete character: wait for its next token
        new = after[len(before):]
        self._window, self._read = self._read, len(self._tokens)
        self.text += new
        for stop in self._stop:
            at = self.text.find(stop, max(0, len(self.text) - len(new) - len(stop) + 1))
            if at != -1:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        return self._take(max(self._sent, len(self.text) - self._hold)), False

    def _decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""

    def flush(self) -> str:
        """All text not yet emitted, an incomplete last character included."""
        if self._read < len(self._tokens):
            before = self._decode(self._tokens[self._window:self._read])
            self.text += self._decode(self._tokens[self._window:])[len(before):]
            self._window = self._read = len(self._tokens)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        piece = self.text[self._sent:upto]
        self._sent = max(self._sent, upto)
        return piece


def emit_token(job, stream: TextStream, produced: list[int], token: int, logprob: float,
               end: bool) -> str:
    """Hand a row's sampled token (or, `end`, its end-of-turn) to its job, then its final
    piece if this ends it; the finish reason, empty while the row goes on. Both engines'
    rows end here alike: end of turn, a stop sequence, or max_new_tokens."""
    prompt = len(job.input_ids)
    finish = ""
    if end:
        finish = "stop"
    else:
        produced.append(token)
        text, stopped = stream.push(token)
        job.emit(Piece(text=text, tokens=1, prompt_tokens=prompt, token_ids=(token,),
                       logprob=logprob))
        if stopped:
            finish = "stop"
        elif len(produced) >= job.params.max_new_tokens:
            finish = "length"
    if finish:
        job.emit(Piece(text=stream.flush(), tokens=0, prompt_tokens=prompt, done=True,
                       finish_reason=finish, completion_tokens=len(produced)))
    return finish


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
