"""The kernel's ports to the services it uses: plain request/answer types and the two client interfaces.

The domain (`AskRunner`, `ContextManager`) speaks only these; `kernel/adapters.py` implements
them over gRPC (the only kernel module that builds model/data protobufs), and unit tests
implement them in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol, Sequence

from kernel.memory import Candidates


# model service
@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerateCall:
    """One stretch of generation: the conversation, and the answer so far to continue from."""

    model: str
    messages: tuple[ChatMessage, ...]
    max_new_tokens: int
    assistant_prefix: str = ""
    assistant_prefix_ids: tuple[int, ...] = ()
    temperature: float = 0.0
    top_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    priority: int = 0


@dataclass(slots=True)
class GenPiece:
    """What one streamed message carries: text and how many tokens it is (several when the
    model service merged queued steps), their ids when known, the prompt's size (from the
    first piece on), and on the last piece done=True with the finish reason."""

    text: str = ""
    tokens: int = 0
    token_ids: Sequence[int] = ()
    prompt_tokens: int = 0
    done: bool = False
    finish_reason: str = ""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    backend: str = ""
    context_window: int = 0
    cost_per_1k_tokens: float = 0.0
    loaded: bool = False
    is_default: bool = False
    max_batch: int = 0


class GenerateStream(Protocol):
    """The pieces of one generation. `cancel()` may be called at any time, from outside
    the iterating task: the service stops generating and the iteration ends without a
    done piece (it does not raise). Errors are raised as VfmError."""

    def __aiter__(self) -> AsyncIterator[GenPiece]: ...

    def cancel(self) -> None: ...


class ModelClient(Protocol):
    def generate(self, call: GenerateCall) -> GenerateStream: ...

    async def list_models(self) -> list[ModelInfo]:
        """Every model the service offers; raises Unavailable when it does not answer."""
        ...


# data service
@dataclass(frozen=True)
class CandidatesQuery:
    tenant: str
    pid: int
    question: str
    limit: int
    recent: int
    collections: tuple[str, ...] = ()
    knowledge_k: int = 8
    now: float = 0.0


@dataclass
class CandidatesReply:
    candidates: Candidates
    pages: int = 0  # pages the process's memory has in all


@dataclass(frozen=True)
class MemoryEntry:
    speaker: str
    text: str
    time: float = 0.0


class DataClient(Protocol):
    async def candidates(self, query: CandidatesQuery) -> CandidatesReply: ...

    async def remember(self, tenant: str, pid: int, entries: list[MemoryEntry],
                       exchange_id: str = "") -> None:
        """Append entries; with `exchange_id`, a second call with the same id appends nothing."""
        ...

    async def fork_memory(self, tenant: str, parent: int, child: int) -> None: ...


class DataRelay(Protocol):
    """Syscalls the kernel hands to vfm-datad as the caller's tenant: requests and replies
    are the kernel's own wire messages (which have no tenant; the adapter copies them into
    vfm-datad's, which do), so only the wire layer uses this."""

    async def forward(self, method: str, tenant: str, request): ...

    async def ingest(self, tenant: str, parts: AsyncIterator): ...

    def ingest_progress(self, tenant: str, parts: AsyncIterator) -> AsyncIterator: ...

