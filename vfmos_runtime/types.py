"""The FM-process vocabulary every part speaks: a process's spec and quotas, its counters, an ask's usage."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Quota:
    """Limits of one FM process; 0 means no limit."""

    max_tokens: int = 0
    tokens_per_minute: int = 0
    max_concurrent: int = 0
    max_resident_pages: int = 0
    cost_budget: float = 0.0


@dataclass
class TokenLimits:
    """Limits of one bearer token ("virtual key") over every syscall made with it; 0 means
    no limit. Tokens and cost count its Asks (prompt + answer; Usage.cost)."""

    max_tokens: int = 0
    cost_budget: float = 0.0
    requests_per_minute: int = 0
    max_concurrent: int = 0


AUTO_MODEL = "auto"  # a process's model name that asks the router for a model per Ask


@dataclass
class RoutePolicy:
    """What a process with model "auto" wants of the router, per Ask; 0 / empty = no limit."""

    quality: float = 0.0
    max_cost_per_ask: float = 0.0
    ttft_slo_ms: float = 0.0
    allowed_models: list[str] = field(default_factory=list)
    cascade_confidence: float = 0.0  # > 0: cheapest model first, escalated below this confidence
    cascade_rate: float = 0.0        # > 0: escalate about this share, the least sure answers


@dataclass
class ProcessSpec:
    name: str
    priority: int = 20
    model: str = ""
    context_budget: int = 0
    quota: Quota = field(default_factory=Quota)
    system_prompt: str = ""
    collections: list[str] = field(default_factory=list)
    route: RoutePolicy = field(default_factory=RoutePolicy)


@dataclass
class Counters:
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    asks: int = 0
    page_faults: int = 0
    page_hits: int = 0
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    preemptions: int = 0


@dataclass
class Usage:
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    model: str = ""
    decode_ms: float = 0.0
    preemptions: int = 0
    ask_id: str = ""
    route_reason: str = ""
    escalated_from: str = ""   # a cascade's first model, its answer escalated (not shown)
    confidence: float = 0.0    # geometric mean of the answer's token probabilities; 0 = unknown
