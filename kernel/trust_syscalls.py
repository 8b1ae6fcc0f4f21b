"""Syscalls of trust: policies (forwarded to vfm-trustd as the caller's tenant), audit, escalations."""

from __future__ import annotations

import hashlib
import logging
from typing import NamedTuple

from kernel.adapters import TrustPolicyClient
from kernel.audit import KINDS, MAX_LIST, AuditLog
from kernel.escalations import Decision, Escalation, EscalationBook, EscalationState, check_id
from kernel.escalations import MAX_WAIT_S
from kernel.identity import Caller
from kernel.pagination import DEFAULT_PAGE_SIZE, decode_token, encode_token, page
from kernel.syscall import syscall
from kernel.table import ProcessTable
from vfmos_runtime import validate
from vfmos_runtime.convert import timestamp
from vfmos_runtime.errors import InvalidArgument
from vfmos.kernel.v1 import kernel_pb2 as pb

log = logging.getLogger("vfmd.syscall")
MAX_POLICY_BYTES = 256 * 1024
MAX_FILENAME = 256
MAX_TEST_TEXT = 64 * 1024
MAX_VERDICT_FILTER = 64
# Record fields the wire carries as fields of their own; the rest go to `attributes`.
_RECORD_FIELDS = frozenset({"seq", "time", "kind", "tenant", "pid", "model", "policy_version",
                            "version", "checks", "verdict", "reasons", "tokens_in",
                            "tokens_out", "cost", "prompt_sha256", "answer_sha256",
                            "prompt_text", "answer_text", "hash", "prev_hash"})


class TrustParts(NamedTuple):
    """What the trust syscalls work with, built once in kernel/main.py."""

    trust_policy: TrustPolicyClient
    audit: AuditLog
    escalations: EscalationBook


def who(caller: Caller) -> str:
    """The kernel's name of a caller, as audit records and escalations keep it."""
    return f"{caller.tenant} (admin)" if caller.admin else caller.tenant


class TrustSyscalls:
    """Mixed into KernelServicer: needs `self.table`, `self.trust_policy`, `self.audit` and
    `self.escalations`. An administrator sees every tenant's records and escalations; a
    tenant its own, and another tenant's escalation id reads as NOT_FOUND."""

    table: ProcessTable
    trust_policy: TrustPolicyClient
    audit: AuditLog
    escalations: EscalationBook

    def _scope(self, caller: Caller, pid: int) -> tuple[str, int]:
        """(tenant, pid) a policy call is for: the caller's tenant, or the tenant of a
        process the caller may touch (another tenant's pid is NOT_FOUND)."""
        if pid < 0:
            raise InvalidArgument(f"pid must be a process id, or 0 for the tenant, got {pid}")
        if pid == 0:
            return caller.tenant, 0
        return self.table.get(caller, pid).tenant, pid

    # policies
    @syscall
    async def ApplyPolicy(self, caller: Caller, request: pb.ApplyPolicyRequest):
        _check_document(request.document, request.filename, required=True)
        tenant, pid = self._scope(caller, request.pid)
        reply = await self.trust_policy.put_policy(tenant, pid, request.document,
                                                   request.filename, who(caller))
        digest = reply.document_sha256 or hashlib.sha256(request.document.encode()).hexdigest()
        reply.audit_seq = await self.audit.record({
            "kind": "policy", "tenant": tenant, "pid": pid, "version": reply.version,
            "author": who(caller), "document_sha256": digest,
            "filename": request.filename})
        return reply

    @syscall
    async def GetPolicy(self, caller: Caller, request: pb.GetPolicyRequest):
        tenant, pid = self._scope(caller, request.pid)
        return await self.trust_policy.get_policy(tenant, pid)

    @syscall
    async def TestPolicy(self, caller: Caller, request: pb.TestPolicyRequest):
        _check_document(request.document, request.filename, required=False)
        if not request.text.strip():
            raise InvalidArgument("text: the text to screen is empty")
        for name in ("text", "output_text"):
            if len(getattr(request, name)) > MAX_TEST_TEXT:
                raise InvalidArgument(f"{name}: at most {MAX_TEST_TEXT} characters")
        tenant, pid = self._scope(caller, request.pid)
        return await self.trust_policy.test_policy(tenant, pid, request.document,
                                                   request.filename, request.text,
                                                   request.output_text)

    # the audit trail
    @syscall
    def ListAudit(self, caller: Caller, request: pb.ListAuditRequest):
        size = _page_size(request.page_size)
        since = validate.time_field(request, "since")
        if request.kind and request.kind not in KINDS:
            raise InvalidArgument(f"kind must be one of {', '.join(KINDS)} (empty = all), "
                                  f"got {request.kind[:40]!r}")
        if len(request.verdict) > MAX_VERDICT_FILTER:
            raise InvalidArgument(f"verdict: at most {MAX_VERDICT_FILTER} characters")
        after = decode_token("ListAudit", request.page_token) if request.page_token else 0
        if not isinstance(after, int):
            raise InvalidArgument("bad page_token for ListAudit: pass a next_page_token it "
                                  "returned")
        records, last = self.audit.list(None if caller.admin else caller.tenant,
                                        pid=request.pid, since=since, verdict=request.verdict,
                                        limit=size, after=after, kind=request.kind)
        return pb.ListAuditResponse(records=[record_to_pb(r) for r in records],
                                    next_page_token=encode_token("ListAudit", last)
                                    if last else "")

    @syscall
    async def VerifyAudit(self, caller: Caller, request: pb.VerifyAuditRequest):
        result = await self.audit.verify_async()
        if not result.ok:
            log.warning("audit verify (asked by %s): seq %d: %s", who(caller),
                        result.first_bad_seq, result.reason)
        if not caller.admin:  # the chain holds every tenant's records: only the verdict
            return pb.VerifyAuditResponse(ok=result.ok, first_bad_seq=result.first_bad_seq)
        return pb.VerifyAuditResponse(ok=result.ok, first_bad_seq=result.first_bad_seq,
                                      reason=result.reason, records=result.records,
                                      head_seq=result.head_seq)

    # escalations
    @syscall
    def ListEscalations(self, caller: Caller, request: pb.ListEscalationsRequest):
        validate.enum_field(pb.EscalationState, request.state, "state")
        state = EscalationState(request.state) if request.state else None
        found = self.escalations.list(None if caller.admin else caller.tenant, state)
        chunk, token = page(found, _order, "ListEscalations", request.page_size,
                            request.page_token)
        return pb.ListEscalationsResponse(escalations=[escalation_to_pb(e) for e in chunk],
                                          next_page_token=token)

    @syscall
    def GetEscalation(self, caller: Caller, request: pb.GetEscalationRequest):
        found = self.escalations.get(_tenant(caller), check_id(request.id))
        return pb.GetEscalationResponse(escalation=escalation_to_pb(found))

    @syscall
    async def ResolveEscalation(self, caller: Caller, request: pb.ResolveEscalationRequest):
        check_id(request.id)
        validate.enum_field(pb.EscalationDecision, request.decision, "decision")
        if not request.decision:
            raise InvalidArgument("decision: approve, reject or reply")
        done = await self.escalations.resolve(_tenant(caller), request.id,
                                              Decision(request.decision), request.text,
                                              who(caller))
        return pb.ResolveEscalationResponse(escalation=escalation_to_pb(done))

    @syscall
    async def WaitEscalation(self, caller: Caller, request: pb.WaitEscalationRequest):
        check_id(request.id)
        timeout = validate.duration_field(request, "timeout", MAX_WAIT_S)
        found = await self.escalations.wait(_tenant(caller), request.id, timeout)
        return pb.WaitEscalationResponse(escalation=escalation_to_pb(found),
                                         resolved=found.resolved)


def _tenant(caller: Caller) -> str | None:
    return None if caller.admin else caller.tenant


def _order(e: Escalation) -> str:
    return f"{e.created_at:020.6f}/{e.id}"  # sorts as the book lists them: by time, then id


def _page_size(value: int) -> int:
    validate.integer(value, "page_size", 0, MAX_LIST)
    return value or DEFAULT_PAGE_SIZE


def _check_document(document: str, filename: str, required: bool) -> None:
    if required and not document.strip():
        raise InvalidArgument(f"document: the policy{f' {filename}' if filename else ''} "
                              "is empty")
    if len(document.encode()) > MAX_POLICY_BYTES:
        raise InvalidArgument(f"document: a policy is at most {MAX_POLICY_BYTES // 1024} KiB")
    if len(filename) > MAX_FILENAME:
        raise InvalidArgument(f"filename: at most {MAX_FILENAME} characters")


# An audit record's check outcomes are stored as names ("allow", "redact", ...).
_OUTCOMES = {name.removeprefix("VERDICT_OUTCOME_").lower(): number
             for name, number in pb.VerdictOutcome.items()}


def record_to_pb(r: dict) -> pb.AuditRecord:
    """A stored record on the wire; a field the writer left out or None reads as unset."""
    def text(d: dict, k: str) -> str:
        return str(d.get(k) or "")

    def num(d: dict, k: str, kind=float):
        try:
            return kind(d.get(k) or 0)
        except (TypeError, ValueError):
            return kind(0)
    def outcome(d: dict) -> int:
        return _OUTCOMES.get(text(d, "outcome"), pb.VERDICT_OUTCOME_UNSPECIFIED)
    checks = [pb.CheckResult(check=text(c, "check"), score=num(c, "score"),
                             threshold=num(c, "threshold"), outcome=outcome(c),
                             reason=text(c, "reason"), system=num(c, "system", int),
                             elapsed_ms=num(c, "elapsed_ms"), target=text(c, "target"))
              for c in r.get("checks") or () if isinstance(c, dict)]
    return pb.AuditRecord(
        seq=r["seq"], time=timestamp(num(r, "time")), kind=text(r, "kind"),
        tenant=text(r, "tenant"), pid=num(r, "pid", int), model=text(r, "model"),
        policy_version=num(r, "policy_version", int) or num(r, "version", int), checks=checks,
        verdict=text(r, "verdict"), reasons=[str(x) for x in r.get("reasons") or ()],
        tokens_in=num(r, "tokens_in", int), tokens_out=num(r, "tokens_out", int),
        cost=num(r, "cost"), prompt_sha256=text(r, "prompt_sha256"),
        answer_sha256=text(r, "answer_sha256"), prompt_text=text(r, "prompt_text"),
        answer_text=text(r, "answer_text"),
        attributes={k: str(v) for k, v in r.items() if k not in _RECORD_FIELDS},
        hash=text(r, "hash"), prev_hash=text(r, "prev_hash"))


def escalation_to_pb(e: Escalation) -> pb.Escalation:
    return pb.Escalation(
        id=e.id, tenant=e.tenant, pid=e.pid, question=e.question,
        outcome=str(e.verdict.get("outcome", "")),
        reasons=[str(x) for x in e.verdict.get("reasons") or ()],
        escalation_rule=str(e.verdict.get("escalation_rule", "")),
        holding_reply=e.holding_reply, state=int(e.state), text=e.text,
        resolved_by=e.resolved_by, create_time=timestamp(e.created_at),
        resolve_time=timestamp(e.resolved_at), audit_seq=e.audit_seq)

