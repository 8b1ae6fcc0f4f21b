"""Plain dataclasses that libvfm returns: callers never see protobuf messages."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vfmos_runtime.types import Counters, ProcessSpec, Usage
from vfmos_runtime.types import Quota as Quota  # part of libvfm's API
from vfmos_runtime.types import RoutePolicy as RoutePolicy  # part of libvfm's API
from vfmos_runtime.types import TokenLimits as TokenLimits  # part of libvfm's API


@dataclass
class Process:
    pid: int
    tenant: str
    state: str
    spec: ProcessSpec
    counters: Counters
    created_at: float
    updated_at: float
    running: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Degradation:
    """Something an Ask went without; it still answered. `kind`: "memory-unavailable" (no
    memory or knowledge: vfm-datad was not reachable) or "not-remembered" (later Asks will
    not recall this exchange); `reason` says why in words."""

    kind: str
    reason: str


@dataclass
class CheckResult:
    """One trust check of an Ask: a calibrated `score` (0..1) against the policy's
    `threshold`, what it decided alone, why, where (`spans`: (start, end, label)) and on
    which text (`target`: "question", "item:N", "output", "answer")."""

    check: str
    score: float
    threshold: float
    outcome: str
    reason: str = ""
    system: int = 1
    elapsed_ms: float = 0.0
    target: str = ""
    spans: list[tuple[int, int, str]] = field(default_factory=list)


# How `Verdict.summary` says an outcome (a redacted answer was allowed: what was redacted
# follows), and names what a redaction replaced.
_DONE = {"allow": "allowed", "redact": "allowed", "revise": "revised", "refuse": "refused",
         "escalate": "escalated"}
_ENTITY_WORDS = {"EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone number", "PERSON": "name",
                 "CREDIT_CARD": "card number", "IBAN_CODE": "IBAN", "IP_ADDRESS": "IP address",
                 "US_SSN": "SSN", "LOCATION": "place", "DATE_TIME": "date"}


@dataclass
class Verdict:
    """What the trust agent decided about an Ask: `outcome` (allow, redact, revise, refuse,
    escalate), whether deliberate checks ran (`system` 2) and how long all took, every check,
    the reasons, and the escalation id when a human must decide. `unverified`: vfm-trustd
    was not reachable and the policy let the answer through unchecked."""

    outcome: str
    system: int = 1
    elapsed_ms: float = 0.0
    checks: list[CheckResult] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    escalation_id: str = ""
    policy_version: int = 0
    level: str = ""
    unverified: bool = False
    dropped_items: list[str] = field(default_factory=list)
    revisions: int = 0
    escalation_rule: str = ""
    redacted_text: str = ""   # policy tests: what would be released
    holding_reply: str = ""   # policy tests: what the caller would get instead

    def summary(self) -> str:
        """One line for people: "allowed · s1 75 ms · pii: redacted 1 email"."""
        parts = [_DONE.get(self.outcome, self.outcome or "unchecked")]
        if self.unverified:
            parts.append("unverified")
        elif self.level == "off":
            parts.append("trust off")
        else:
            parts.append(f"s{self.system} {self.elapsed_ms:.0f} ms")
        for check in sorted({c.check for c in self.checks if c.outcome == "redact"}):
            counts: dict[str, int] = {}
            for c in self.checks:
                if c.check == check and c.outcome == "redact":
                    for _, _, label in c.spans:
                        counts[label] = counts.get(label, 0) + 1
            things = [f"{n} {_ENTITY_WORDS.get(label, label.lower().replace('_', ' '))}"
                      f"{'s' if n > 1 else ''}" for label, n in sorted(counts.items())]
            parts.append(f"{check}: redacted {', '.join(things) or 'text'}")
        if self.dropped_items:
            parts.append(f"dropped {len(self.dropped_items)} item"
                         f"{'s' if len(self.dropped_items) > 1 else ''}")
        if self.revisions:
            parts.append(f"revised {self.revisions}x")
        if self.escalation_id:
            parts.append(f"escalation {self.escalation_id}")
        if self.outcome in ("refuse", "escalate") and self.reasons:
            parts.append(self.reasons[0])
        return " · ".join(parts)


@dataclass
class AskResult:
    """What an Ask ended with, after every piece of text was streamed."""

    text: str
    finish_reason: str
    usage: Usage
    degraded: list[Degradation] = field(default_factory=list)  # empty: it lacked nothing
    verdict: Verdict | None = None  # None when vfmd runs with the trust agent off
    # finish "tool-calls": what the model called, in OpenAI's shape
    # ({"id", "type": "function", "function": {"name", "arguments"}})
    tool_calls: list[dict] = field(default_factory=list)

    @property
    def escalation_id(self) -> str:
        """The escalation to wait for (finish reason "escalated"), else ""."""
        return self.verdict.escalation_id if self.verdict else ""

    @property
    def memory_unavailable(self) -> bool:
        """The answer was made without the process's memory and knowledge."""
        return any(d.kind == "memory-unavailable" for d in self.degraded)


@dataclass
class TenantUsage:
    tenant: str
    weight: float
    processes: int
    running: int
    queued: int
    counters: Counters


@dataclass
class SystemUsage:
    policy: str
    capacity: int
    running: int
    queued: int
    tenants: list[TenantUsage]


@dataclass
class RouteCandidate:
    model: str
    quality: float     # predicted chance of a good answer
    cost: float        # predicted cost of the Ask
    ttft_ms: float     # predicted first-token time
    eligible: bool     # within the budget and the SLO
    note: str
    head: str


@dataclass
class RouteExplanation:
    model: str
    reason: str
    candidates: list[RouteCandidate]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FeedbackResult:
    routed: bool             # the router learned from it
    tenant_feedback: int     # feedback entries the tenant's router holds
    correction_active: bool  # the tenant's correction of the shared router is in use
    audit_seq: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelInfo:
    name: str
    backend: str
    context_window: int
    cost_per_1k_tokens: float
    loaded: bool
    is_default: bool
    tenant: str = ""          # an adapter's owner (empty: a shared model)
    base: str = ""            # an adapter's base model
    status: str = ""          # an adapter's: "promoted" or "candidate"
    quality: float = 0.0      # an adapter's ROUGE-L to its tenant's held-back replies
    base_quality: float = 0.0
    engine: str = ""          # a loaded local model's: "llama.cpp" or "torch"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelJob:
    id: str
    tenant: str
    name: str
    base: str
    teacher: str
    state: str               # queued, running, done, failed
    progress: float
    message: str
    train_exchanges: int
    held_back: int
    base_quality: float
    adapted_quality: float
    promoted: bool
    started_at: float
    finished_at: float
    error: str
    train_seconds: float
    adapter_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Identity:
    tenant: str
    uid: int
    admin: bool
    transport: str


@dataclass
class DaemonStatus:
    name: str
    address: str
    pid: int
    health: str
    rss_mb: float
    cpu_percent: float
    uptime_s: float
    last_seen: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenInfo:
    """A bearer token (never its secret): its limits, and what its Asks used so far."""

    token_id: str
    tenant: str
    admin: bool
    label: str
    created_at: float
    limits: TokenLimits = field(default_factory=TokenLimits)
    tokens_used: int = 0     # prompt + answer tokens of its Asks
    cost_spent: float = 0.0  # their cost, in the model registry's cost unit


@dataclass
class MemoryEntry:
    """One remembered turn of an FM process; `time` in unix seconds (0 = now)."""

    text: str
    speaker: str = "user"
    time: float = 0.0
    meta: dict[str, str] = field(default_factory=dict)
    pinned: bool = False
    seq: int = -1
    tokens: int = 0
    page: int = -1
    line: str = ""


@dataclass
class RecallHit:
    entry: MemoryEntry
    score: float


@dataclass
class ContextItem:
    kind: str
    text: str
    tokens: int
    source_ids: list[str]
    meta: dict[str, str]
    score: float
    page: int
    speaker: str
    time: float


@dataclass
class WorkingSet:
    pid: int
    budget: int
    used: int
    items: list[ContextItem]
    page_faults: int
    page_hits: int
    resident_pages: int
    pages: int
    pagein_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Collection:
    name: str
    description: str
    chunks: int
    sources: int
    created_at: float


@dataclass
class SearchHit:
    chunk_id: str
    score: float
    text: str
    source: str
    title: str
    position: str
    meta: dict[str, str]
    collection: str = ""


@dataclass
class IngestResult:
    source: str
    chunks: int
    unchanged: bool
    replaced: int


@dataclass
class ServiceRegistration:
    """The kernel's answer to a service that registers."""

    heartbeat_s: float
    kernel_secret: str = field(repr=False)


# trust: policies, the audit trail, escalations
@dataclass
class PolicyApplied:
    """A policy that `apply_policy` set: its new version and the effective policy."""

    version: int
    effective: dict
    document_sha256: str
    audit_seq: int


@dataclass
class Policy:
    """The effective policy of a tenant or process; `origin`: process, tenant or default."""

    effective: dict
    version: int
    origin: str
    document: str = ""


@dataclass
class PolicyTest:
    """`test_policy`'s result: the input screen, and the output check when one was asked."""

    input: Verdict
    output: Verdict | None = None


@dataclass
class AuditRecord:
    seq: int
    time: float
    kind: str                        # ask, policy, escalation
    tenant: str
    pid: int
    verdict: str
    model: str = ""
    policy_version: int = 0
    checks: list[CheckResult] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    prompt_sha256: str = ""
    answer_sha256: str = ""
    prompt_text: str = ""
    answer_text: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    hash: str = ""
    prev_hash: str = ""


@dataclass
class AuditVerification:
    """`verify_audit`'s answer; `reason`, `records` and `head_seq` only for administrators."""

    ok: bool
    first_bad_seq: int
    reason: str = ""
    records: int = 0
    head_seq: int = 0


@dataclass
class Escalation:
    """An Ask held for a human; `state`: open, approved, rejected or replied."""

    id: str
    tenant: str
    pid: int
    question: str
    state: str
    holding_reply: str
    outcome: str = ""
    reasons: list[str] = field(default_factory=list)
    escalation_rule: str = ""
    text: str = ""                   # the human's reply (replied) or note
    resolved_by: str = ""
    created_at: float = 0.0
    resolved_at: float = 0.0
    audit_seq: int = 0

    @property
    def resolved(self) -> bool:
        return self.state != "open"
