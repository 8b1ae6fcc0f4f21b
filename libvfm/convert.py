"""Kernel protobuf messages to libvfm dataclasses and back."""

from __future__ import annotations

import json

from libvfm.types import (AskResult, CheckResult, Collection, ContextItem, DaemonStatus,
                          Degradation, Identity, MemoryEntry, ModelJob, Process, ProcessSpec,
                          SearchHit,
                          SystemUsage, TenantUsage, TokenInfo, Verdict, WorkingSet)
# The client also encodes quotas and specs and decodes usage: the shared conversions.
from vfmos_runtime.convert import counters_from_pb, enum_str, quota_from_pb, seconds
from vfmos_runtime.convert import document_kind_to_pb as document_kind_to_pb
from vfmos_runtime.convert import duration as duration
from vfmos_runtime.convert import quota_to_pb as quota_to_pb
from vfmos_runtime.convert import route_from_pb
from vfmos_runtime.convert import spec_to_pb as spec_to_pb
from vfmos_runtime.convert import timestamp as timestamp
from vfmos_runtime.convert import token_limits_from_pb
from vfmos_runtime.convert import token_limits_to_pb as token_limits_to_pb
from vfmos_runtime.convert import usage_from_pb as usage_from_pb
from vfmos.kernel.v1 import kernel_pb2 as pb


def ask_result_from_pb(text: str, done: pb.AskDone) -> AskResult:
    return AskResult(text, enum_str(pb.FinishReason, done.finish_reason),
                     usage_from_pb(done.usage),
                     [Degradation(enum_str(pb.DegradationKind, d.kind), d.reason)
                      for d in done.degraded],
                     verdict_from_pb(done.verdict, done.escalation_id)
                     if done.HasField("verdict") else None,
                     json.loads(done.tool_calls_json) if done.tool_calls_json else [])


def verdict_from_pb(v: pb.Verdict, escalation_id: str = "") -> Verdict:
    return Verdict(
        outcome=enum_str(pb.VerdictOutcome, v.outcome), system=v.system,
        elapsed_ms=v.elapsed_ms, reasons=list(v.reasons), escalation_id=escalation_id,
        policy_version=v.policy_version, level=v.level, unverified=v.unverified,
        dropped_items=list(v.dropped_items), revisions=v.revisions,
        escalation_rule=v.escalation_rule, redacted_text=v.redacted_text,
        holding_reply=v.holding_reply, checks=[check_from_pb(c) for c in v.checks])


def check_from_pb(c: pb.CheckResult) -> CheckResult:
    return CheckResult(check=c.check, score=c.score, threshold=c.threshold,
                       outcome=enum_str(pb.VerdictOutcome, c.outcome), reason=c.reason,
                       system=c.system, elapsed_ms=c.elapsed_ms, target=c.target,
                       spans=[(s.start, s.end, s.label) for s in c.spans])


def process_from_pb(msg: pb.Process) -> Process:
    s, q, c = msg.spec, msg.spec.quota, msg.counters
    return Process(
        pid=msg.pid, tenant=msg.tenant, state=enum_str(pb.ProcState, msg.state, lower=False),
        spec=ProcessSpec(name=s.name, priority=s.priority, model=s.model,
                         context_budget=s.context_budget, system_prompt=s.system_prompt,
                         collections=list(s.collections),
                         quota=quota_from_pb(q), route=route_from_pb(s.route)),
        counters=counters_from_pb(c),
        created_at=seconds(msg, "create_time"), updated_at=seconds(msg, "update_time"),
        running=msg.running)


def system_usage_from_pb(msg: pb.GetUsageResponse) -> SystemUsage:
    return SystemUsage(enum_str(pb.SchedulingPolicy, msg.policy), msg.capacity, msg.running,
                       msg.queued, [
        TenantUsage(t.tenant, t.weight, t.processes, t.running, t.queued,
                    counters_from_pb(t.counters)) for t in msg.tenants])


def identity_from_pb(msg: pb.Identity) -> Identity:
    return Identity(msg.tenant, msg.uid, msg.admin, enum_str(pb.Transport, msg.transport))


def daemon_from_pb(msg: pb.DaemonStatus) -> DaemonStatus:
    return DaemonStatus(msg.name, msg.address, msg.pid,
                        enum_str(pb.ServiceHealth, msg.health, lower=False), msg.rss_mb,
                        msg.cpu_percent, seconds(msg, "uptime"), seconds(msg, "last_seen_time"))


def token_from_pb(msg: pb.TokenInfo) -> TokenInfo:
    return TokenInfo(msg.token_id, msg.tenant, msg.admin, msg.label, seconds(msg, "create_time"),
                     token_limits_from_pb(msg.limits), msg.tokens_used, msg.cost_spent)


def entry_to_pb(e: MemoryEntry) -> pb.MemoryEntry:
    return pb.MemoryEntry(speaker=e.speaker, text=e.text, time=timestamp(e.time, "entry time"),
                          meta=e.meta, pinned=e.pinned)


def entry_from_pb(m: pb.MemoryEntry) -> MemoryEntry:
    return MemoryEntry(text=m.text, speaker=m.speaker, time=seconds(m, "time"), meta=dict(m.meta),
                       pinned=m.pinned, seq=m.seq, tokens=m.tokens, page=m.page, line=m.line)


def working_set_from_pb(m: pb.WorkingSet) -> WorkingSet:
    items = [ContextItem(kind=enum_str(pb.ContextItemKind, i.kind), text=i.text, tokens=i.tokens,
                         source_ids=list(i.source_ids), meta=dict(i.meta), score=i.score,
                         page=i.page, speaker=i.speaker, time=seconds(i, "time"))
             for i in m.items]
    return WorkingSet(pid=m.pid, budget=m.budget, used=m.used, items=items,
                      page_faults=m.page_faults, page_hits=m.page_hits,
                      resident_pages=m.resident_pages, pages=m.pages, pagein_ms=m.pagein_ms)


def collection_from_pb(m: pb.Collection) -> Collection:
    return Collection(m.name, m.description, m.chunks, m.sources, seconds(m, "create_time"))


def hit_from_pb(m: pb.SearchHit) -> SearchHit:
    return SearchHit(chunk_id=m.chunk_id, score=m.score, text=m.text, source=m.source,
                     title=m.title, position=m.position, meta=dict(m.meta),
                     collection=m.collection)


def model_job_from_pb(j: pb.ModelJob) -> ModelJob:
    return ModelJob(j.id, j.tenant, j.name, j.base, j.teacher, enum_str(pb.ModelJobState, j.state),
                    j.progress, j.message, j.train_exchanges, j.held_back, j.base_quality,
                    j.adapted_quality, j.promoted, seconds(j, "started_time"),
                    seconds(j, "finished_time"), j.error, j.train_seconds, j.adapter_bytes)
