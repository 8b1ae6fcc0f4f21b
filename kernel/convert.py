"""Conversions between the kernel's domain objects and the kernel protos."""

from __future__ import annotations

from kernel.process import DEFAULT_PRIORITY, ProcRecord
from libvfm.types import ProcessSpec, Quota
from vfmos.kernel.v1 import kernel_pb2 as pb


def quota_from_pb(msg: pb.Quota) -> Quota:
    return Quota(max_tokens=msg.max_tokens, tokens_per_minute=msg.tokens_per_minute,
                 max_concurrent=msg.max_concurrent, max_resident_pages=msg.max_resident_pages,
                 cost_budget=msg.cost_budget)


def quota_to_pb(quota: Quota) -> pb.Quota:
    return pb.Quota(max_tokens=quota.max_tokens, tokens_per_minute=quota.tokens_per_minute,
                    max_concurrent=quota.max_concurrent,
                    max_resident_pages=quota.max_resident_pages, cost_budget=quota.cost_budget)


def spec_from_pb(msg: pb.ProcessSpec) -> ProcessSpec:
    priority = msg.priority if msg.HasField("priority") else DEFAULT_PRIORITY
    return ProcessSpec(name=msg.name, priority=priority, model=msg.model,
                       context_budget=msg.context_budget,
                       quota=quota_from_pb(msg.quota), system_prompt=msg.system_prompt)


def process_to_pb(record: ProcRecord, running: int) -> pb.Process:
    spec, counters = record.spec, record.counters
    return pb.Process(
        pid=record.pid, tenant=record.tenant, state=int(record.state),
        spec=pb.ProcessSpec(name=spec.name, priority=spec.priority, model=spec.model,
                            context_budget=spec.context_budget, quota=quota_to_pb(spec.quota),
                            system_prompt=spec.system_prompt),
        counters=pb.Counters(tokens_in=counters.tokens_in, tokens_out=counters.tokens_out,
                             cost=counters.cost, asks=counters.asks,
                             page_faults=counters.page_faults, page_hits=counters.page_hits),
        created_at=record.created_at, updated_at=record.updated_at, running=running)
