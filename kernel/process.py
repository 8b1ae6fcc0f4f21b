"""FM processes: the state machine, the spec's validation and the record kept in the table."""

from __future__ import annotations

import enum
import re
import time
from dataclasses import asdict, dataclass, field

from vfmos_runtime.errors import FailedPrecondition, InvalidArgument
from vfmos_runtime.types import AUTO_MODEL, Counters, ProcessSpec, Quota, RoutePolicy
from vfmos_runtime.validate import number

MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 0, 39, 20
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_SYSTEM_PROMPT = 64 * 1024
MAX_QUOTA = 10**15
MAX_COLLECTIONS = 16
# Tokens of one working set: the one limit, checked when a process is spawned (its
# context_budget) and when a working set is assembled (a Context call's budget).
MAX_CONTEXT_BUDGET = 1 << 20
# How long an ended (EXITED, KILLED) process stays in the table and `ps -a` before it is
# reaped; its counters stay in its tenant's totals.
DEFAULT_REAP_AFTER_S = 24 * 3600.0


class ProcState(enum.IntEnum):
    """Values match vfmos.kernel.v1.ProcState so the wire needs no table."""

    CREATED = 1
    READY = 2
    RUNNING = 3
    WAITING = 4
    SUSPENDED = 5
    ZOMBIE = 6
    EXITED = 7
    KILLED = 8


S = ProcState
# RUNNING -> SUSPENDED is a preemption: the kernel stops the generation first.
TRANSITIONS: dict[ProcState, frozenset[ProcState]] = {
    S.CREATED: frozenset({S.READY, S.KILLED}),
    S.READY: frozenset({S.RUNNING, S.SUSPENDED, S.ZOMBIE, S.KILLED}),
    S.RUNNING: frozenset({S.READY, S.WAITING, S.SUSPENDED, S.ZOMBIE, S.KILLED}),
    S.WAITING: frozenset({S.READY, S.SUSPENDED, S.KILLED}),
    S.SUSPENDED: frozenset({S.READY, S.KILLED}),
    S.ZOMBIE: frozenset({S.EXITED, S.KILLED}),
    S.EXITED: frozenset(),
    S.KILLED: frozenset(),
}
TERMINAL = frozenset({S.EXITED, S.KILLED})
# What a kernel restart does to a state that only made sense while it was running.
ON_RECOVERY = {S.RUNNING: S.READY, S.WAITING: S.READY, S.CREATED: S.READY}


def check_transition(current: ProcState, target: ProcState, pid: int) -> None:
    if target not in TRANSITIONS[current]:
        raise FailedPrecondition(
            f"process {pid} is {current.name}; it cannot become {target.name}")


def validate_quota(quota: Quota) -> Quota:
    for name in ("max_tokens", "tokens_per_minute", "max_concurrent", "max_resident_pages"):
        value = getattr(quota, name)
        if value < 0:
            raise InvalidArgument(f"quota {name} must be >= 0 (0 = no limit), got {value}")
        if value > MAX_QUOTA:
            raise InvalidArgument(f"quota {name} is absurdly large: {value}")
    number(quota.cost_budget, "quota cost_budget", 0, MAX_QUOTA)  # 0 = no limit
    return quota


def validate_priority(priority: int) -> int:
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidArgument(
            f"priority must be between {MIN_PRIORITY} and {MAX_PRIORITY}, got {priority}")
    return priority


def validate_spec(spec: ProcessSpec) -> ProcessSpec:
    """Reject a malformed spec with a message that says what to fix."""
    if not NAME_RE.match(spec.name or ""):
        raise InvalidArgument(
            f"bad process name {spec.name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    validate_priority(spec.priority)
    if not 0 <= spec.context_budget <= MAX_CONTEXT_BUDGET:
        raise InvalidArgument(f"context_budget must be 0..{MAX_CONTEXT_BUDGET} tokens "
                              f"(0 = the default), got {spec.context_budget}")
    if len(spec.model) > 256:
        raise InvalidArgument("model name is longer than 256 characters")
    if len(spec.system_prompt) > MAX_SYSTEM_PROMPT:
        raise InvalidArgument(f"system prompt is longer than {MAX_SYSTEM_PROMPT} characters")
    if len(spec.collections) > MAX_COLLECTIONS:
        raise InvalidArgument(f"at most {MAX_COLLECTIONS} collections per process")
    for name in spec.collections:
        if not NAME_RE.match(name):
            raise InvalidArgument(f"bad collection name {name!r}: use 1-64 letters, digits, "
                                  "'.', '_' or '-'")
    validate_quota(spec.quota)
    validate_route(spec)
    return spec


def validate_route(spec: ProcessSpec) -> None:
    route = spec.route
    if spec.model != AUTO_MODEL:
        if route != RoutePolicy():
            raise InvalidArgument("routing options (quality, cost per ask, first-token SLO, "
                                  "allowed models, cascade) need model \"auto\"")
        return
    number(route.quality, "route quality", 0, 1)
    number(route.max_cost_per_ask, "route max_cost_per_ask", 0, MAX_QUOTA)
    number(route.ttft_slo_ms, "route ttft_slo_ms", 0, 3_600_000)
    number(route.cascade_confidence, "route cascade_confidence", 0, 1)
    number(route.cascade_rate, "route cascade_rate", 0, 0.5)
    if len(route.allowed_models) > 32:
        raise InvalidArgument("at most 32 allowed models")
    for name in route.allowed_models:
        if not name or len(name) > 256:
            raise InvalidArgument(f"bad allowed model name {name!r}")


@dataclass
class ProcRecord:
    """One row of the process table, as stored (msgpack of `to_dict`)."""

    pid: int
    tenant: str
    owner_uid: int
    spec: ProcessSpec
    state: ProcState = ProcState.CREATED
    counters: Counters = field(default_factory=Counters)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def move(self, target: ProcState) -> None:
        check_transition(self.state, target, self.pid)
        self.state = target
        self.updated_at = time.time()

    def to_dict(self) -> dict:
        data = asdict(self)
        data["state"] = int(self.state)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ProcRecord":
        spec = dict(data["spec"])
        spec["quota"] = Quota(**spec.get("quota", {}))
        spec["route"] = RoutePolicy(**spec.get("route", {}))
        return cls(
            pid=data["pid"], tenant=data["tenant"], owner_uid=data.get("owner_uid", -1),
            spec=ProcessSpec(**spec), state=ProcState(data["state"]),
            counters=Counters(**data.get("counters", {})),
            created_at=data["created_at"], updated_at=data["updated_at"])
