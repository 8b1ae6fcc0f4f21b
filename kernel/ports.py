"""The kernel's ports to the services it uses: plain request/answer types and the client interfaces.

The domain (`AskRunner`, `ContextManager`) speaks only these; `kernel/adapters.py` implements
them over gRPC (the only kernel module that builds model/data protobufs), and unit tests
implement them in memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import AsyncIterator, Protocol, Sequence

from kernel.memory import Candidates
from vfmos_runtime.types import RoutePolicy


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
    tenant: str = ""  # another tenant's adapter is unknown to this call
    tools_json: str = ""  # an app's messages and tools, for an OpenAI-compatible backend


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
    logprob: float | None = None  # sum over its tokens, when the model reports it
    tool_calls_json: str = ""     # the last piece of a "tool-calls" finish: the calls


@dataclass(frozen=True)
class ModelInfo:
    name: str
    backend: str = ""
    context_window: int = 0
    cost_per_1k_tokens: float = 0.0
    loaded: bool = False
    is_default: bool = False
    max_batch: int = 0
    tenant: str = ""        # an adapter's owner; empty: every tenant's
    base: str = ""
    status: str = ""        # an adapter's: "promoted" or "candidate"
    quality: float = 0.0
    base_quality: float = 0.0
    engine: str = ""        # a loaded local model's: "llama.cpp" or "torch"


@dataclass(frozen=True)
class AdaptJob:
    """One adapter job as vfm-modeld reports it (state: queued, running, done, failed)."""

    id: str
    tenant: str
    name: str
    base: str
    teacher: str
    state: str
    progress: float = 0.0
    message: str = ""
    train_exchanges: int = 0
    held_back: int = 0
    base_quality: float = 0.0
    adapted_quality: float = 0.0
    promoted: bool = False
    started_at: float = 0.0
    finished_at: float = 0.0
    error: str = ""
    train_seconds: float = 0.0
    adapter_bytes: int = 0


class GenerateStream(Protocol):
    """The pieces of one generation. `cancel()` may be called at any time, from outside
    the iterating task: the service stops generating and the iteration ends without a
    done piece (it does not raise). Errors are raised as VfmError."""

    def __aiter__(self) -> AsyncIterator[GenPiece]: ...

    def cancel(self) -> None: ...


@dataclass(frozen=True)
class RouteCandidate:
    model: str
    quality: float
    cost: float
    ttft_ms: float
    eligible: bool
    note: str
    head: str


@dataclass(frozen=True)
class RouteDecision:
    model: str
    reason: str
    candidates: tuple[RouteCandidate, ...] = ()


class ModelClient(Protocol):
    def generate(self, call: GenerateCall) -> GenerateStream: ...

    async def route(self, tenant: str, prompt: str, policy: RoutePolicy, prompt_tokens: int,
                    max_new_tokens: int, ask_id: str) -> RouteDecision:
        """The router's choice for one question (ask_id empty: explain only, nothing kept)."""
        ...

    async def feedback(self, tenant: str, ask_id: str, good: bool, source: str,
                       model: str = "") -> tuple[int, bool]:
        """Teach the tenant's router; (its feedback entries, whether its correction is used).
        NotFound when the router has no such routed Ask of the tenant."""
        ...

    async def list_models(self) -> list[ModelInfo]:
        """Every model the service offers; raises Unavailable when it does not answer."""
        ...

    async def start_adapt(self, tenant: str, name: str, base: str, teacher: str,
                          exchanges: list[tuple[str, str]], system_prompt: str,
                          quick: bool) -> AdaptJob:
        """Start training a tenant's adapter on (prompt, reply) exchanges."""
        ...

    async def adapt_jobs(self, tenant: str) -> list[AdaptJob]:
        """Adapter jobs, newest first (tenant empty: every tenant's)."""
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



# trust service
# Outcomes, weakest first: an Ask's verdict carries the strongest one any check applied.
OUTCOMES = ("allow", "redact", "revise", "escalate", "refuse")


@dataclass(frozen=True)
class TrustScope:
    """Whose policy applies: the tenant (as the kernel names it) and the process."""

    tenant: str
    pid: int = 0


@dataclass(frozen=True)
class TrustSpan:
    start: int
    end: int
    label: str
    replacement: str = ""


@dataclass(frozen=True)
class CheckResult:
    """One check's result: a calibrated score against the policy's threshold."""

    check: str
    score: float = 0.0
    threshold: float = 0.0
    outcome: str = "allow"
    reason: str = ""
    spans: tuple[TrustSpan, ...] = ()
    system: int = 1
    elapsed_ms: float = 0.0
    target: str = ""


@dataclass
class Verdict:
    """A decision of vfm-trustd on one text, or the kernel's sum of them for one Ask.
    `unverified`, `dropped_items` and `revisions` are the kernel's own (never from trustd)."""

    outcome: str = "allow"
    checks: list[CheckResult] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    system: int = 1
    elapsed_ms: float = 0.0
    policy_version: int = 0
    redacted_text: str = ""
    holding_reply: str = ""
    feedback: str = ""
    level: str = ""
    escalation_rule: str = ""
    unverified: bool = False
    dropped_items: list[str] = field(default_factory=list)
    revisions: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ScreenItem:
    """A text that would enter the working set: kind "knowledge", "memory", "other" or "turn"
    (the process's own conversation, or what its owner pinned: see trust_path.screen_item)."""

    kind: str
    id: str
    text: str


@dataclass(frozen=True)
class ItemVerdict:
    index: int
    id: str = ""
    dropped: bool = False
    checks: tuple[CheckResult, ...] = ()
    reason: str = ""


@dataclass
class Screening:
    """ScreenInput's answer: the question's verdict, one per item, and whether system 2
    should see the answer."""

    verdict: Verdict
    items: list[ItemVerdict] = field(default_factory=list)
    escalate_to_system2: bool = False


@dataclass
class OutputDecision:
    """CheckOutput's answer: `text` may be released (from offset 0); `cut` ends the answer."""

    verdict: Verdict
    text: str
    cut: bool = False


@dataclass
class Verification:
    verdict: Verdict
    revise_model: str = ""


@dataclass(frozen=True)
class Placeholder:
    placeholder: str
    original: str
    label: str = ""


@dataclass
class Pseudonymized:
    texts: list[str]
    placeholders: list[Placeholder] = field(default_factory=list)


@dataclass(frozen=True)
class TrustPolicy:
    """What the kernel itself needs of a scope's effective policy (vfm-trustd applies the rest)."""

    level: str = "standard"
    on_unavailable: str = "refuse"   # what an Ask does while vfm-trustd cannot be reached
    store_text: bool = False         # the audit record may keep the question and answer
    max_revisions: int = 1
    holding_reply: str = ""
    refusal_reply: str = ""
    version: int = 0


class TrustClient(Protocol):
    """vfm-trustd. Every method raises Unavailable when it cannot be reached."""

    async def policy(self, scope: TrustScope) -> TrustPolicy: ...

    async def screen_input(self, scope: TrustScope, question: str, items: Sequence[ScreenItem],
                           system_prompt: str) -> Screening: ...

    async def check_output(self, scope: TrustScope, text: str, final: bool, question: str,
                           protected: Sequence[str], released: int) -> OutputDecision: ...

    async def verify(self, scope: TrustScope, question: str, answer: str,
                     sources: Sequence[ScreenItem], model: str) -> Verification: ...

    async def pseudonymize(self, scope: TrustScope, texts: Sequence[str]) -> Pseudonymized: ...


class EscalationOpener(Protocol):
    """Where an escalated Ask waits for a human (`kernel/escalations.py`'s EscalationBook)."""

    async def open(self, tenant: str, pid: int, question: str, verdict: Verdict,
                   holding_reply: str) -> str:
        """A new escalation, durable when this returns: its id."""


class AuditSink(Protocol):
    """Where each Ask's record goes (`kernel/audit.py`'s AuditLog)."""

    def append(self, record: dict) -> int: ...
