"""The kernel's side of routing: explain a route for a process with model "auto", and take a
judgement of an answer by its ask id (audited; for a routed Ask, passed to the tenant's
router in vfm-modeld). The router itself lives in vfm-modeld."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kernel.ask import DEFAULT_NEW_TOKENS
from kernel.asklog import AskLog
from kernel.cascade import plan as plan_cascade
from kernel.audit import AuditLog
from kernel.identity import Caller
from kernel.ports import ModelClient, RouteDecision
from kernel.table import ProcessTable
from vfmos_runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from vfmos_runtime.types import AUTO_MODEL

MAX_NOTE = 1000
RATINGS = ("up", "down")


@dataclass(frozen=True)
class FeedbackResult:
    routed: bool
    tenant_feedback: int
    correction_active: bool
    audit_seq: int


class RouteDesk:
    def __init__(self, table: ProcessTable, models: ModelClient, asks: AskLog, audit: AuditLog):
        self._table = table
        self._models = models
        self._asks = asks
        self._audit = audit

    async def explain(self, caller: Caller, pid: int, question: str) -> RouteDecision:
        record = self._table.get(caller, pid)
        if record.spec.model != AUTO_MODEL:
            raise FailedPrecondition(f"process {pid} runs model {record.spec.model or '(default)'}"
                                     "; only a process spawned with model \"auto\" is routed")
        if not question.strip():
            raise InvalidArgument("the question is empty")
        chars = len(record.spec.system_prompt) + len(question)
        policy = record.spec.route
        decision = await self._models.route(record.tenant, question, policy, chars // 4,
                                            DEFAULT_NEW_TOKENS, "")
        cascade = plan_cascade(decision, policy.cascade_confidence, policy.max_cost_per_ask,
                               policy.cascade_rate)
        if cascade is None:
            return decision
        return dataclasses.replace(decision, model=cascade.first,
                                   reason=f"{decision.reason}; {cascade.describe()}")

    async def feedback(self, caller: Caller, ask_id: str, rating: str, note: str) -> FeedbackResult:
        if rating not in RATINGS:
            raise InvalidArgument("rate the answer up or down")
        if len(note) > MAX_NOTE:
            raise InvalidArgument(f"the note is longer than {MAX_NOTE} characters")
        entry = self._asks.get(ask_id)
        # Another tenant's Ask reads as unknown, like another tenant's pid.
        if entry is None or not caller.may_touch(entry.tenant):
            raise NotFound(f"no Ask with id {ask_id!r} (ids are in an answer's usage)")
        if "user" in entry.judged_by:
            raise AlreadyExists(f"Ask {ask_id} already has your feedback")
        count, active = 0, False
        if entry.routed:
            count, active = await self._models.feedback(entry.tenant, ask_id, rating == "up",
                                                        "user", entry.model)
        seq = await self._audit.record({
            "kind": "feedback", "tenant": entry.tenant, "pid": entry.pid, "model": entry.model,
            "verdict": rating, "reasons": [note] if note else [], "ask_id": ask_id,
            "by": caller.tenant})
        self._asks.record(dataclasses.replace(entry, judged_by=(*entry.judged_by, "user")))
        return FeedbackResult(entry.routed, count, active, seq)
