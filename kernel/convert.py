"""Conversions between the kernel's domain objects and the kernel protos."""

from __future__ import annotations

from kernel.process import DEFAULT_PRIORITY, ProcRecord
from vfmos_runtime.convert import counters_to_pb, quota_from_pb, spec_to_pb, timestamp
from vfmos_runtime.types import ProcessSpec
from vfmos.kernel.v1 import kernel_pb2 as pb


def spec_from_pb(msg: pb.ProcessSpec) -> ProcessSpec:
    priority = msg.priority if msg.HasField("priority") else DEFAULT_PRIORITY
    return ProcessSpec(name=msg.name, priority=priority, model=msg.model,
                       context_budget=msg.context_budget, quota=quota_from_pb(msg.quota),
                       system_prompt=msg.system_prompt, collections=list(msg.collections))


def process_to_pb(record: ProcRecord, running: int) -> pb.Process:
    return pb.Process(
        pid=record.pid, tenant=record.tenant, state=int(record.state),
        spec=spec_to_pb(record.spec), counters=counters_to_pb(record.counters),
        create_time=timestamp(record.created_at), update_time=timestamp(record.updated_at),
        running=running)
