"""Human escalations: Asks held for a person's decision, kept in the kernel store until resolved.

Who may see and resolve an escalation: an administrator, or its own tenant. A support team's
supervisor works as the tenant the agent runs as (a token of that tenant), so "the tenant
itself" is the supervisor's role; a tenant never sees another tenant's escalations, and
another tenant's id reads as NOT_FOUND, never PERMISSION_DENIED (an id's existence is
itself something a tenant must not learn). Every resolution is audited (kind "escalation")
in the same transaction as the new state.
"""

from __future__ import annotations

import asyncio
import enum
import re
import secrets
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

from kernel.audit import AuditLog
from kernel.store import KernelStore
from vfmos_runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from vfmos_runtime.storage import pack, unpack

ID_RE = re.compile(r"[0-9a-f]{12}")
MAX_TEXT = 16 * 1024            # a supervisor's reply, or the question kept with the escalation
MAX_WAIT_S = 3600.0


class EscalationState(enum.IntEnum):
    """Values match vfmos.kernel.v1.EscalationState."""

    OPEN = 1
    APPROVED = 2
    REJECTED = 3
    REPLIED = 4


class Decision(enum.IntEnum):
    """A supervisor's decision; values match vfmos.kernel.v1.EscalationDecision."""

    APPROVE = 1
    REJECT = 2
    REPLY = 3


S = EscalationState
# Once resolved an escalation stays as it was decided: a second decision is refused.
TRANSITIONS: dict[EscalationState, frozenset[EscalationState]] = {
    S.OPEN: frozenset({S.APPROVED, S.REJECTED, S.REPLIED}),
    S.APPROVED: frozenset(),
    S.REJECTED: frozenset(),
    S.REPLIED: frozenset(),
}
OUTCOME_OF = {Decision.APPROVE: S.APPROVED, Decision.REJECT: S.REJECTED,
              Decision.REPLY: S.REPLIED}


@dataclass(frozen=True)
class Escalation:
    id: str
    tenant: str
    pid: int
    question: str
    verdict: dict                    # the verdict that escalated: outcome, reasons, rule, ...
    holding_reply: str
    state: EscalationState = S.OPEN
    text: str = ""                   # the supervisor's reply (REPLIED) or note
    resolved_by: str = ""
    created_at: float = 0.0
    resolved_at: float = 0.0
    audit_seq: int = 0               # the audit record of the resolution

    @property
    def resolved(self) -> bool:
        return self.state != S.OPEN

    def to_dict(self) -> dict:
        d = asdict(self)
        d["state"] = int(self.state)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Escalation":
        return cls(**{**d, "state": EscalationState(d["state"])})


def check_id(escalation_id: str) -> str:
    if not ID_RE.fullmatch(escalation_id):
        raise InvalidArgument(f"id: an escalation id is 12 hex digits (as 'vfmctl escalations' "
                              f"lists them), got {escalation_id[:40]!r}")
    return escalation_id


class EscalationBook:
    """The escalations (sub-database `escalations`, keyed by id), and the waiters on them.

    Reads are LMDB reads; every change is durable before it is reported or wakes a waiter.
    """

    def __init__(self, store: KernelStore, audit: AuditLog,
                 clock: Callable[[], float] = time.time):
        self._store = store
        self._db = store.open_table(b"escalations")
        self._audit = audit
        self._clock = clock
        # Waited-on ids: the event a resolution sets, and how many wait on it.
        self._waiters: dict[str, tuple[asyncio.Event, int]] = {}
        self._resolving: set[str] = set()

    async def open(self, tenant: str, pid: int, question: str, verdict: dict | str,
                   holding_reply: str) -> str:
        """A new open escalation, durable when this returns: its id."""
        if isinstance(verdict, str):
            verdict = {"outcome": verdict}
        elif hasattr(verdict, "to_dict"):  # the Ask path's Verdict
            verdict = verdict.to_dict()
        escalation = Escalation(id=secrets.token_hex(6), tenant=tenant, pid=pid,
                                question=question[:MAX_TEXT], verdict=dict(verdict),
                                holding_reply=holding_reply, created_at=self._clock())
        await asyncio.wrap_future(self._put(escalation))
        return escalation.id

    def list(self, tenant: str | None, state: EscalationState | None = None) -> list[Escalation]:
        """`tenant`'s escalations (None: every tenant's), oldest first."""
        with self._store.read() as txn:
            found = [Escalation.from_dict(unpack(raw)) for _, raw in txn.cursor(db=self._db)]
        return sorted((e for e in found if (tenant is None or e.tenant == tenant)
                       and (state is None or e.state == state)),
                      key=lambda e: (e.created_at, e.id))

    def get(self, tenant: str | None, escalation_id: str) -> Escalation:
        """One escalation; another tenant's reads as missing (None: an administrator)."""
        check_id(escalation_id)
        with self._store.read() as txn:
            raw = txn.get(escalation_id.encode(), db=self._db)
        found = Escalation.from_dict(unpack(raw)) if raw else None
        if found is None or (tenant is not None and found.tenant != tenant):
            raise NotFound(f"no escalation with id {escalation_id}")
        return found

    async def resolve(self, tenant: str | None, escalation_id: str, decision: Decision,
                      text: str, by: str) -> Escalation:
        """Decide an open escalation, audit the decision, wake whoever waits on it.
        `tenant` None: an administrator. Errors: NotFound, FailedPrecondition (already
        resolved), InvalidArgument (a reply without text, an oversized text)."""
        if decision == Decision.REPLY and not text.strip():
            raise InvalidArgument("text: a reply needs the text the client is to get")
        if len(text) > MAX_TEXT:
            raise InvalidArgument(f"text: at most {MAX_TEXT} characters, got {len(text)}")
        current = self.get(tenant, escalation_id)
        target = OUTCOME_OF[decision]
        if escalation_id in self._resolving:  # decided a moment ago, not yet durable
            raise FailedPrecondition(f"escalation {escalation_id} is being resolved already")
        if target not in TRANSITIONS[current.state]:
            raise FailedPrecondition(f"escalation {escalation_id} is already "
                                     f"{current.state.name.lower()} by {current.resolved_by}")
        resolved = replace(current, state=target, text=text, resolved_by=by,
                           resolved_at=self._clock())
        key = escalation_id.encode()

        def put_resolved(txn, seq: int) -> None:  # in the audit record's transaction
            txn.put(key, pack(replace(resolved, audit_seq=seq).to_dict()), db=self._db)
        seq, future = self._audit.submit({
            "kind": "escalation", "tenant": current.tenant, "pid": current.pid,
            "escalation_id": escalation_id, "decision": decision.name.lower(),
            "verdict": target.name.lower(), "text": text, "by": by}, also=put_resolved)
        self._resolving.add(escalation_id)
        try:
            await asyncio.wrap_future(future)
        finally:
            self._resolving.discard(escalation_id)
        waiting = self._waiters.get(escalation_id)
        if waiting is not None:
            waiting[0].set()
        return replace(resolved, audit_seq=seq)

    async def wait(self, tenant: str | None, escalation_id: str, timeout: float) -> Escalation:
        """The escalation once resolved, or as it is when `timeout` seconds have passed."""
        if not 0 <= timeout <= MAX_WAIT_S:
            raise InvalidArgument(f"timeout: 0..{MAX_WAIT_S:.0f} seconds, got {timeout:g}")
        current = self.get(tenant, escalation_id)
        if current.resolved or timeout == 0:
            return current
        event, count = self._waiters.get(escalation_id, (asyncio.Event(), 0))
        self._waiters[escalation_id] = (event, count + 1)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            event, count = self._waiters[escalation_id]
            if count == 1:
                del self._waiters[escalation_id]
            else:
                self._waiters[escalation_id] = (event, count - 1)
        return self.get(tenant, escalation_id)

    def _put(self, escalation: Escalation):
        key, value = escalation.id.encode(), pack(escalation.to_dict())
        return self._store.submit(lambda txn: txn.put(key, value, db=self._db))
