"""Kernel protobuf messages of policies, audit records and escalations to libvfm dataclasses."""

from __future__ import annotations

import json

from libvfm.convert import check_from_pb, verdict_from_pb
from libvfm.types import (AuditRecord, AuditVerification, Escalation, Policy, PolicyApplied,
                          PolicyTest)
from vfmos_runtime.convert import enum_str, seconds
from vfmos.kernel.v1 import kernel_pb2 as pb

DECISIONS = ("approve", "reject", "reply")


def _json(text: str) -> dict:
    return json.loads(text) if text else {}


def applied_from_pb(m: pb.ApplyPolicyResponse) -> PolicyApplied:
    return PolicyApplied(m.version, _json(m.effective_json), m.document_sha256, m.audit_seq)


def policy_from_pb(m: pb.GetPolicyResponse) -> Policy:
    return Policy(_json(m.effective_json), m.version, m.origin, m.document)


def policy_test_from_pb(m: pb.TestPolicyResponse) -> PolicyTest:
    return PolicyTest(verdict_from_pb(m.input),
                      verdict_from_pb(m.output) if m.HasField("output") else None)


def record_from_pb(r: pb.AuditRecord) -> AuditRecord:
    return AuditRecord(
        seq=r.seq, time=seconds(r, "time"), kind=r.kind, tenant=r.tenant, pid=r.pid,
        verdict=r.verdict, model=r.model, policy_version=r.policy_version,
        checks=[check_from_pb(c) for c in r.checks], reasons=list(r.reasons),
        tokens_in=r.tokens_in, tokens_out=r.tokens_out, cost=r.cost,
        prompt_sha256=r.prompt_sha256, answer_sha256=r.answer_sha256,
        prompt_text=r.prompt_text, answer_text=r.answer_text, attributes=dict(r.attributes),
        hash=r.hash, prev_hash=r.prev_hash)


def verification_from_pb(m: pb.VerifyAuditResponse) -> AuditVerification:
    return AuditVerification(m.ok, m.first_bad_seq, m.reason, m.records, m.head_seq)


def escalation_from_pb(e: pb.Escalation) -> Escalation:
    return Escalation(
        id=e.id, tenant=e.tenant, pid=e.pid, question=e.question,
        state=enum_str(pb.EscalationState, e.state), holding_reply=e.holding_reply,
        outcome=e.outcome, reasons=list(e.reasons), escalation_rule=e.escalation_rule,
        text=e.text, resolved_by=e.resolved_by, created_at=seconds(e, "create_time"),
        resolved_at=seconds(e, "resolve_time"), audit_seq=e.audit_seq)
