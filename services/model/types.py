"""Request and response types of the model service's domain layer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    assistant_prefix: str = ""   # an interrupted answer to continue
    assistant_prefix_ids: tuple[int, ...] = ()  # the same as token ids, when known
    priority: int = 0            # arrivals with higher priority are prefilled first
    # The reader takes several decode steps in one piece: steps already queued when it
    # asks for the next piece come merged (the gRPC servicer: one message, not one each).
    merge_queued: bool = False
    # An OpenAI-compatible backend only: the app's messages, tools and tool_choice (JSON).
    tools_json: str = ""


@dataclass
class Piece:
    """What one decode step produced; the last piece has done=True and the totals."""

    text: str
    tokens: int = 1
    prompt_tokens: int = 0
    done: bool = False
    finish_reason: str = ""
    completion_tokens: int = 0
    token_ids: tuple[int, ...] = ()
    logprob: float | None = None  # sum over its tokens; None when the engine does not say
    tool_calls_json: str = ""     # the last piece of a "tool-calls" finish: the calls

    def merged(self, later: "Piece") -> "Piece":
        """This piece and the next one as one (neither is the final piece)."""
        return Piece(text=self.text + later.text, tokens=self.tokens + later.tokens,
                     prompt_tokens=self.prompt_tokens or later.prompt_tokens,
                     token_ids=self.token_ids + later.token_ids,
                     logprob=None if self.logprob is None or later.logprob is None
                     else self.logprob + later.logprob)
