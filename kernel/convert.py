"""Conversions between the kernel's domain objects and the kernel protos."""

from __future__ import annotations

import dataclasses
import operator

from kernel.ports import Verdict
from kernel.process import DEFAULT_PRIORITY, ProcRecord
from vfmos_runtime.convert import (counters_to_pb, enum_value, quota_from_pb, route_from_pb,
                                   spec_to_pb, timestamp)
from vfmos_runtime.types import Counters, ProcessSpec
from vfmos.kernel.v1 import kernel_pb2 as pb


def spec_from_pb(msg: pb.ProcessSpec) -> ProcessSpec:
    priority = msg.priority if msg.HasField("priority") else DEFAULT_PRIORITY
    return ProcessSpec(name=msg.name, priority=priority, model=msg.model,
                       context_budget=msg.context_budget, quota=quota_from_pb(msg.quota),
                       system_prompt=msg.system_prompt, collections=list(msg.collections),
                       route=route_from_pb(msg.route))


_COUNTERS = operator.attrgetter(*(f.name for f in dataclasses.fields(Counters)))


class ProcessViews:
    """`process_to_pb`, remembered per pid until the record changes: a listing of many
    processes converts only those that changed (a conversion is ~30 us of the event loop;
    a `vfmctl ps` of 80 processes took 3 ms). The key is everything the message shows; a
    spec is compared by identity, as the table replaces a spec and never edits one."""

    def __init__(self, limit: int = 4096):
        self._views: dict[int, tuple[tuple, ProcessSpec, pb.Process]] = {}
        self._limit = limit

    def get(self, record: ProcRecord, running: int) -> pb.Process:
        key = (record.tenant, record.state, record.updated_at, record.created_at, running,
               _COUNTERS(record.counters))
        view = self._views.get(record.pid)
        if view is not None and view[0] == key and view[1] is record.spec:
            return view[2]
        if len(self._views) >= self._limit:
            self._views.clear()  # ended processes leave; the live ones come back on use
        msg = process_to_pb(record, running)
        self._views[record.pid] = (key, record.spec, msg)
        return msg


def process_to_pb(record: ProcRecord, running: int) -> pb.Process:
    return pb.Process(
        pid=record.pid, tenant=record.tenant, state=int(record.state),
        spec=spec_to_pb(record.spec), counters=counters_to_pb(record.counters),
        create_time=timestamp(record.created_at), update_time=timestamp(record.updated_at),
        running=running)


def verdict_to_pb(v: Verdict) -> pb.Verdict:
    """An Ask's verdict as its client sees it (the answer carries any redacted text)."""
    return pb.Verdict(
        outcome=enum_value(pb.VerdictOutcome, v.outcome), reasons=v.reasons, system=v.system,
        elapsed_ms=v.elapsed_ms, policy_version=v.policy_version, level=v.level,
        escalation_rule=v.escalation_rule, unverified=v.unverified,
        dropped_items=v.dropped_items, revisions=v.revisions,
        checks=[pb.CheckResult(
            check=c.check, score=c.score, threshold=c.threshold,
            outcome=enum_value(pb.VerdictOutcome, c.outcome), reason=c.reason,
            system=c.system, elapsed_ms=c.elapsed_ms, target=c.target,
            spans=[pb.VerdictSpan(start=s.start, end=s.end, label=s.label,
                                  replacement=s.replacement) for s in c.spans])
            for c in v.checks])
