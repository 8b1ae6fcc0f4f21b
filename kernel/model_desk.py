"""The kernel's side of models and adapters: which models a caller may name (shared ones and
its own tenant's adapters), and adapter jobs started from the tenant's logged exchanges that a
teacher answered and the trust agent allowed. vfm-modeld trains; the kernel chooses the data,
since only it holds the tenant's audit log."""

from __future__ import annotations

import asyncio

from kernel.audit import AuditLog
from kernel.identity import Caller
from kernel.ports import AdaptJob, ModelClient, ModelInfo
from vfmos_runtime.errors import FailedPrecondition

DEFAULT_TEACHER = "gemma3-270m"
MIN_EXCHANGES = 8
MAX_EXCHANGES = 20_000
ACCEPTED = ("allow", "redact")
PAGE = 1000


class ModelDesk:
    def __init__(self, models: ModelClient, audit: AuditLog):
        self._models = models
        self._audit = audit

    async def list_models(self, caller: Caller) -> list[ModelInfo]:
        """Shared models and the caller's adapters; another tenant's adapter is not shown."""
        found = await self._models.list_models()
        return [m for m in found if not m.tenant or caller.may_touch(m.tenant)]

    async def adapt(self, caller: Caller, name: str, base: str, teacher: str,
                    system_prompt: str, quick: bool) -> AdaptJob:
        teacher = teacher or DEFAULT_TEACHER
        exchanges = await asyncio.to_thread(self.exchanges, caller.tenant, teacher)
        if len(exchanges) < MIN_EXCHANGES:
            raise FailedPrecondition(
                f"tenant {caller.tenant} has {len(exchanges)} logged exchanges answered by "
                f"{teacher} and allowed by the trust agent; an adapter needs at least "
                f"{MIN_EXCHANGES}. Exchanges are logged with their text only when the "
                "tenant's trust policy sets audit.store_text: true")
        return await self._models.start_adapt(caller.tenant, name, base, teacher, exchanges,
                                              system_prompt, quick)

    def exchanges(self, tenant: str, teacher: str) -> list[tuple[str, str]]:
        """(question, answer) of the tenant's Asks that `teacher` answered whole, that the
        trust agent allowed, and whose text the audit kept; the newest MAX_EXCHANGES."""
        out: list[tuple[str, str]] = []
        after = 0
        while True:
            records, after = self._audit.list(tenant, kind="ask", limit=PAGE, after=after)
            for r in records:
                if (r.get("model") == teacher and r.get("verdict") in ACCEPTED
                        and r.get("prompt_text") and r.get("answer_text")):
                    out.append((r["prompt_text"], r["answer_text"]))
            if not after:
                return out[-MAX_EXCHANGES:]

    async def jobs(self, caller: Caller) -> list[AdaptJob]:
        return await self._models.adapt_jobs("" if caller.admin else caller.tenant)
