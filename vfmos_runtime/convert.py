"""Shared FM-process messages to dataclasses and back, and the wire's enum and time rules."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from vfmos.kernel.v1 import kernel_pb2 as pb
from vfmos_runtime.errors import InvalidArgument
from vfmos_runtime.types import Counters, ProcessSpec, Quota, RoutePolicy, TokenLimits, Usage
from vfmos_runtime.validate import unix_seconds

# Other names the data service has always accepted for a document kind.
DOCUMENT_KIND_ALIASES = {"txt": "text", "md": "markdown", "htm": "html", "tsv": "csv",
                         "jsonl": "json", "ndjson": "json", "plain": "text"}


# --- enums: the wire says FINISH_REASON_STOP, Python callers have always seen "stop" -----

def _prefix(enum) -> str:
    return enum.DESCRIPTOR.values_by_number[0].name[:-len("UNSPECIFIED")]


def enum_str(enum, value: int, lower: bool = True) -> str:
    """The string callers see for an enum value: "stop", "local-torch", "READY"; "" for 0."""
    if not value:
        return ""
    try:
        name = enum.Name(value)[len(_prefix(enum)):]
    except ValueError:
        return ""  # a value newer than this code
    return name.lower().replace("_", "-") if lower else name


def enum_value(enum, text: str, what: str = "") -> int:
    """The enum value for a string written either way ("stop", "STOP", "local-torch"); 0 for "".
    An unknown one is InvalidArgument naming `what` (default: the enum's name)."""
    if not text:
        return 0
    try:
        return enum.Value(_prefix(enum) + text.upper().replace("-", "_"))
    except ValueError:
        names = [enum_str(enum, v.number) for v in enum.DESCRIPTOR.values if v.number]
        raise InvalidArgument(f"unknown {what or enum.DESCRIPTOR.name} {text!r}; use one of "
                              f"{', '.join(names)}") from None


def document_kind_to_pb(kind: str) -> int:
    """A document kind as vfmctl and libvfm callers write it ("md", ".pdf", "text")."""
    name = (kind or "").strip().lower().lstrip(".")
    return enum_value(pb.DocumentKind, DOCUMENT_KIND_ALIASES.get(name, name), "document kind")


# --- times: unix seconds in Python, Timestamp/Duration on the wire; 0 <-> unset ---------

def timestamp(seconds_: float, field: str = "time") -> Timestamp | None:
    """A Timestamp for unix seconds, or None (field left unset) for 0; a time no part could
    read (NaN, infinite, negative, past the year 3000) is InvalidArgument naming `field`."""
    if not unix_seconds(seconds_, field):
        return None
    ts = Timestamp()
    whole = int(seconds_ // 1)
    ts.seconds, ts.nanos = whole, min(int(round((seconds_ - whole) * 1e9)), 999_999_999)
    return ts


def seconds(msg, field: str) -> float:
    """Unix seconds of a Timestamp field (or seconds of a Duration field); 0 when unset."""
    if not msg.HasField(field):
        return 0.0
    value = getattr(msg, field)
    return value.seconds + value.nanos / 1e9


def duration(seconds_: float, field: str = "duration") -> Duration | None:
    """A Duration for seconds, or None (field left unset) for 0."""
    if not seconds_:
        return None
    if seconds_ != seconds_ or abs(seconds_) > 315_576_000_000:  # NaN, or beyond Duration
        raise InvalidArgument(f"{field} is not a usable duration: {seconds_} s")
    d = Duration()
    d.FromNanoseconds(int(round(seconds_ * 1e9)))
    return d


# --- messages ------------------------------------------------------------------------


def quota_to_pb(quota: Quota) -> pb.Quota:
    return pb.Quota(max_tokens=quota.max_tokens, tokens_per_minute=quota.tokens_per_minute,
                    max_concurrent=quota.max_concurrent,
                    max_resident_pages=quota.max_resident_pages, cost_budget=quota.cost_budget)


def quota_from_pb(msg: pb.Quota) -> Quota:
    return Quota(msg.max_tokens, msg.tokens_per_minute, msg.max_concurrent,
                 msg.max_resident_pages, msg.cost_budget)


def token_limits_to_pb(limits: TokenLimits) -> pb.TokenLimits:
    return pb.TokenLimits(max_tokens=limits.max_tokens, cost_budget=limits.cost_budget,
                          requests_per_minute=limits.requests_per_minute,
                          max_concurrent=limits.max_concurrent)


def token_limits_from_pb(msg: pb.TokenLimits) -> TokenLimits:
    return TokenLimits(msg.max_tokens, msg.cost_budget, msg.requests_per_minute,
                       msg.max_concurrent)


def route_to_pb(route: RoutePolicy) -> pb.RoutePolicy:
    return pb.RoutePolicy(quality=route.quality, max_cost_per_ask=route.max_cost_per_ask,
                          ttft_slo_ms=route.ttft_slo_ms, allowed_models=route.allowed_models,
                          cascade_confidence=route.cascade_confidence,
                          cascade_rate=route.cascade_rate)


def route_from_pb(msg: pb.RoutePolicy) -> RoutePolicy:
    return RoutePolicy(msg.quality, msg.max_cost_per_ask, msg.ttft_slo_ms,
                       list(msg.allowed_models), msg.cascade_confidence, msg.cascade_rate)


def spec_to_pb(spec: ProcessSpec) -> pb.ProcessSpec:
    return pb.ProcessSpec(name=spec.name, priority=spec.priority, model=spec.model,
                          context_budget=spec.context_budget, quota=quota_to_pb(spec.quota),
                          system_prompt=spec.system_prompt, collections=spec.collections,
                          route=route_to_pb(spec.route))


def counters_from_pb(c: pb.Counters) -> Counters:
    return Counters(c.tokens_in, c.tokens_out, c.cost, c.asks, c.page_faults, c.page_hits,
                    c.queue_ms, c.ttft_ms, c.decode_ms, c.preemptions)


def counters_to_pb(c: Counters) -> pb.Counters:
    return pb.Counters(tokens_in=c.tokens_in, tokens_out=c.tokens_out, cost=c.cost, asks=c.asks,
                       page_faults=c.page_faults, page_hits=c.page_hits, queue_ms=c.queue_ms,
                       ttft_ms=c.ttft_ms, decode_ms=c.decode_ms, preemptions=c.preemptions)


def usage_from_pb(msg: pb.Usage) -> Usage:
    return Usage(msg.tokens_in, msg.tokens_out, msg.cost, msg.queue_ms, msg.ttft_ms,
                 msg.total_ms, msg.model, msg.decode_ms, msg.preemptions, msg.ask_id,
                 msg.route_reason, msg.escalated_from, msg.confidence)


def usage_to_pb(u: Usage) -> pb.Usage:
    return pb.Usage(tokens_in=u.tokens_in, tokens_out=u.tokens_out, cost=u.cost,
                    queue_ms=u.queue_ms, ttft_ms=u.ttft_ms, total_ms=u.total_ms, model=u.model,
                    decode_ms=u.decode_ms, preemptions=u.preemptions, ask_id=u.ask_id,
                    route_reason=u.route_reason, escalated_from=u.escalated_from,
                    confidence=u.confidence)
