"""Shared messages of the FM-process vocabulary (quota, spec, counters, usage) to dataclasses and back."""

from __future__ import annotations

from vfmos.kernel.v1 import kernel_pb2 as pb
from vfmos_runtime.types import Counters, ProcessSpec, Quota, Usage


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
