"""Kernel protobuf messages to libvfm dataclasses and back."""

from __future__ import annotations

from libvfm.types import (Collection, ContextItem, Counters, DaemonStatus, Identity,
                          MemoryEntry, Process, ProcessSpec, Quota, SearchHit, SystemUsage,
                          TenantUsage, TokenInfo, Usage, WorkingSet)
from vfmos.data.v1 import data_pb2 as dpb
from vfmos.kernel.v1 import kernel_pb2 as pb


def quota_to_pb(quota: Quota) -> pb.Quota:
    return pb.Quota(max_tokens=quota.max_tokens, tokens_per_minute=quota.tokens_per_minute,
                    max_concurrent=quota.max_concurrent,
                    max_resident_pages=quota.max_resident_pages, cost_budget=quota.cost_budget)


def quota_from_pb(msg: pb.Quota) -> Quota:
    return Quota(msg.max_tokens, msg.tokens_per_minute, msg.max_concurrent,
                 msg.max_resident_pages, msg.cost_budget)


def spec_to_pb(spec: ProcessSpec) -> pb.ProcessSpec:
    return pb.ProcessSpec(name=spec.name, priority=spec.priority, model=spec.model,
                          context_budget=spec.context_budget, quota=quota_to_pb(spec.quota),
                          system_prompt=spec.system_prompt, collections=spec.collections)


def process_from_pb(msg: pb.Process) -> Process:
    s, q, c = msg.spec, msg.spec.quota, msg.counters
    return Process(
        pid=msg.pid, tenant=msg.tenant, state=pb.ProcState.Name(msg.state),
        spec=ProcessSpec(name=s.name, priority=s.priority, model=s.model,
                         context_budget=s.context_budget, system_prompt=s.system_prompt,
                         collections=list(s.collections),
                         quota=quota_from_pb(q)),
        counters=counters_from_pb(c),
        created_at=msg.created_at, updated_at=msg.updated_at, running=msg.running)


def counters_from_pb(c: pb.Counters) -> Counters:
    return Counters(c.tokens_in, c.tokens_out, c.cost, c.asks, c.page_faults, c.page_hits,
                    c.queue_ms, c.ttft_ms, c.decode_ms, c.preemptions)


def counters_to_pb(c: Counters) -> pb.Counters:
    return pb.Counters(tokens_in=c.tokens_in, tokens_out=c.tokens_out, cost=c.cost, asks=c.asks,
                       page_faults=c.page_faults, page_hits=c.page_hits, queue_ms=c.queue_ms,
                       ttft_ms=c.ttft_ms, decode_ms=c.decode_ms, preemptions=c.preemptions)


def usage_from_pb(msg: pb.Usage) -> Usage:
    return Usage(msg.tokens_in, msg.tokens_out, msg.cost, msg.queue_ms, msg.ttft_ms,
                 msg.total_ms, msg.model, msg.decode_ms, msg.preemptions)


def usage_to_pb(u: Usage) -> pb.Usage:
    return pb.Usage(tokens_in=u.tokens_in, tokens_out=u.tokens_out, cost=u.cost,
                    queue_ms=u.queue_ms, ttft_ms=u.ttft_ms, total_ms=u.total_ms, model=u.model,
                    decode_ms=u.decode_ms, preemptions=u.preemptions)


def system_usage_from_pb(msg: pb.UsageResponse) -> SystemUsage:
    return SystemUsage(msg.policy, msg.capacity, msg.running, msg.queued, [
        TenantUsage(t.tenant, t.weight, t.processes, t.running, t.queued,
                    counters_from_pb(t.counters)) for t in msg.tenants])


def identity_from_pb(msg: pb.Identity) -> Identity:
    return Identity(msg.tenant, msg.uid, msg.admin, msg.transport)


def daemon_from_pb(msg: pb.DaemonStatus) -> DaemonStatus:
    return DaemonStatus(msg.name, msg.address, msg.pid, msg.health, msg.rss_mb,
                        msg.cpu_percent, msg.uptime_s, msg.last_seen)


def token_from_pb(msg: pb.TokenInfo) -> TokenInfo:
    return TokenInfo(msg.token_id, msg.tenant, msg.admin, msg.label, msg.created_at)


def entry_to_pb(e: MemoryEntry) -> dpb.MemoryEntry:
    return dpb.MemoryEntry(speaker=e.speaker, text=e.text, time=e.time, meta=e.meta,
                           pinned=e.pinned)


def entry_from_pb(m: dpb.MemoryEntry) -> MemoryEntry:
    return MemoryEntry(text=m.text, speaker=m.speaker, time=m.time, meta=dict(m.meta),
                       pinned=m.pinned, seq=m.seq, tokens=m.tokens, page=m.page, line=m.line)


def working_set_from_pb(m: pb.WorkingSet) -> WorkingSet:
    items = [ContextItem(kind=i.kind, text=i.text, tokens=i.tokens,
                         source_ids=list(i.source_ids), meta=dict(i.meta), score=i.score,
                         page=i.page, speaker=i.speaker, time=i.time) for i in m.items]
    return WorkingSet(pid=m.pid, budget=m.budget, used=m.used, items=items,
                      page_faults=m.page_faults, page_hits=m.page_hits,
                      resident_pages=m.resident_pages, pages=m.pages, pagein_ms=m.pagein_ms)


def collection_from_pb(m: dpb.Collection) -> Collection:
    return Collection(m.name, m.description, m.chunks, m.sources, m.created_at)


def hit_from_pb(m: dpb.Hit) -> SearchHit:
    return SearchHit(chunk_id=m.chunk_id, score=m.score, text=m.text, source=m.source,
                     title=m.title, position=m.position, meta=dict(m.meta),
                     collection=m.collection)
