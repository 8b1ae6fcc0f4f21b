"""Request generation for the syscall fuzzer (bench/fuzz.py): hypothesis strategies built from
the kernel.v1 descriptors, a valid request per method to mutate, garbage frames, and cases."""

from __future__ import annotations

import math
from dataclasses import dataclass

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

from vfmos_runtime.protocol import MAX_MESSAGE_BYTES
from vfmos.kernel.v1 import kernel_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["KernelService"]
METHODS = [m.name for m in SERVICE.methods]
STREAMING_IN = {m.name for m in SERVICE.methods if m.client_streaming}
STREAMING_OUT = {m.name for m in SERVICE.methods if m.server_streaming}
IDENTITIES = ("admin", "mallory", "forged")
POOL_SLOTS = 8         # live pids an identity's pool keeps (the newest spawns and forks)
MAX_DEPTH = 3          # nested messages deeper than this stay unset
PLAYGROUND_COLLECTION = "fuzz"
KEEPER_COLLECTION = "keeper-kb"

_I32, _I64 = (-2**31, 2**31 - 1), (-2**63, 2**63 - 1)
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: _I32, FieldDescriptor.TYPE_SINT32: _I32,
    FieldDescriptor.TYPE_SFIXED32: _I32, FieldDescriptor.TYPE_INT64: _I64,
    FieldDescriptor.TYPE_SINT64: _I64, FieldDescriptor.TYPE_SFIXED64: _I64,
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# Boundaries the kernel documents (priorities, token limits, quotas, budgets, time ranges).
_EDGE_INTS = (0, 1, -1, 2, 16, 17, 39, 40, 100, 1000, 1001, 4096, 4097, 10_000, 10_001,
              1_048_576, 1_048_577, 10**9, 10**9 + 1, 10**15, 10**15 + 1, 3600, 3601,
              -62_135_596_800, -62_135_596_801, 253_402_300_799, 253_402_300_800,
              999_999_999, 1_000_000_000)
_EDGE_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.01, 0.009, 5.0, 5.0001, 1000.0, 1000.5, 1e15, 1e308,
                -1e308, 5e-324, math.nan, math.inf, -math.inf)
_EDGE_STRINGS = ("", " ", "\t\n", "\x00", "a", "ü", "日本語", "🙂" * 3, "\u202e", "a" * 64,
                 "a" * 65, "-leading", "../../etc/passwd", "vfm-modeld", "vfm-datad",
                 "vfm-trustd", "unix:///tmp/nowhere.sock", "127.0.0.1:1", "root", "mallory",
                 "keeper", PLAYGROUND_COLLECTION, KEEPER_COLLECTION, "doc.txt", "last month",
                 "in May 2023", "Bearer x", "%s%n{}", "null")
# Lengths just inside and past the documented string limits (64 KiB, 256 KiB) and past the
# 4 MiB message limit.
_HUGE_LENGTHS = (65_536, 65_537, 262_144, 262_145, MAX_MESSAGE_BYTES + 1)
_EDGE_BYTES = (b"", b"\x00", b"hello world. " * 40, b"# Title\n\nSome *markdown* text.\n",
               b"<html><body><p>hi</p></body></html>", b"%PDF-1.4\n%\xe2\xe3\n1 0 obj\n",
               b"a,b\n1,2\n3,4\n", b'{"a": 1, "b": [1, 2]}\n', b"\xff\xfe\xfd", b"\x00" * 512)


@dataclass(frozen=True)
class PoolPid:
    """A pid chosen when the case is sent: slot `index` of the caller's live-pid pool."""

    index: int


def _ints(lo: int, hi: int) -> st.SearchStrategy:
    edges = [v for v in (*_EDGE_INTS, lo, hi, lo + 1, hi - 1) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def _strings() -> st.SearchStrategy:
    huge = st.builds(lambda ch, n: ch * n, st.sampled_from("aé日 \x00"),
                     st.sampled_from(_HUGE_LENGTHS))
    weird = st.text(st.characters(codec="utf-8"), max_size=24)  # any code point but surrogates
    names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}", fullmatch=True)
    # one_of picks a branch evenly: repeating the cheap ones keeps huge strings rare (1 in 8)
    return st.one_of(st.sampled_from(_EDGE_STRINGS), weird, names, st.text(max_size=8),
                     st.sampled_from(_EDGE_STRINGS), weird, names, huge)


def _bytes() -> st.SearchStrategy:
    huge = st.builds(lambda n: b"x" * n, st.sampled_from(_HUGE_LENGTHS))
    return st.one_of(st.sampled_from(_EDGE_BYTES), st.binary(max_size=64),
                     st.sampled_from(_EDGE_BYTES), st.binary(max_size=64), huge)


def _floats(width: int) -> st.SearchStrategy:
    return st.one_of(st.sampled_from(_EDGE_FLOATS), st.floats(width=width))


def _pids() -> st.SearchStrategy:
    pool = st.builds(PoolPid, st.integers(0, POOL_SLOTS - 1))
    return st.one_of(pool, pool, _ints(-2**63, 2**63 - 1))


def _scalar(f: FieldDescriptor) -> st.SearchStrategy:
    if f.name == "pid" and f.type == FieldDescriptor.TYPE_INT64:
        return _pids()
    if f.type in _INT_RANGES:
        return _ints(*_INT_RANGES[f.type])
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return _floats(64 if f.type == FieldDescriptor.TYPE_DOUBLE else 32)
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type == FieldDescriptor.TYPE_STRING:
        return _strings()
    if f.type == FieldDescriptor.TYPE_BYTES:
        return _bytes()
    if f.type == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), st.sampled_from(known), _ints(-2**31, 2**31 - 1))
    raise TypeError(f"no strategy for field {f.full_name} of type {f.type}")


def _field(f: FieldDescriptor, depth: int) -> st.SearchStrategy | None:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        value_strategy = _field(value, depth + 1)
        if value_strategy is None:
            return None
        return st.dictionaries(_scalar(key), value_strategy, max_size=3)
    if f.message_type is not None:
        if depth >= MAX_DEPTH:
            return None
        one = message_drafts(f.message_type, depth + 1)
    else:
        one = _scalar(f)
    if f.is_repeated:
        # a few, or one repeated past the documented counts (16 collections)
        return st.one_of(st.lists(one, max_size=3),
                         st.builds(lambda x, n: [x] * n, one, st.sampled_from((16, 17))))
    return one


_DRAFTS: dict[str, st.SearchStrategy] = {}


def message_drafts(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy:
    """Drafts of a message: dicts of the fields that are set (any subset, oneofs included;
    the last member of a oneof set wins), with nested messages as dicts too."""
    key = f"{descriptor.full_name}@{depth}"
    if key not in _DRAFTS:
        fields = {f.name: s for f in descriptor.fields if (s := _field(f, depth)) is not None}
        _DRAFTS[key] = st.fixed_dictionaries({}, optional=fields)
    return _DRAFTS[key]


def build(descriptor: Descriptor, draft: dict, resolve) -> object:
    """The protobuf message a draft describes; `resolve(PoolPid)` picks a live pid."""
    msg = message_factory.GetMessageClass(descriptor)()
    for name, value in draft.items():
        f = descriptor.fields_by_name[name]
        if isinstance(value, PoolPid):
            value = resolve(value)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            getattr(msg, name).update(value)
        elif f.message_type is not None and f.is_repeated:
            getattr(msg, name).extend(build(f.message_type, v, resolve) for v in value)
        elif f.message_type is not None:
            getattr(msg, name).CopyFrom(build(f.message_type, value, resolve))
        elif f.is_repeated:
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return msg


def _unparseable(descriptor: Descriptor, data: bytes) -> bytes:
    """`data` if it fails to parse as the message, else `data` with a truncated tag after it."""
    try:
        message_factory.GetMessageClass(descriptor)().ParseFromString(data)
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError or others for garbage
        return data
    return data + b"\x80"


@dataclass(frozen=True)
class Case:
    """One fuzz call: who sends what to which method."""

    method: str
    identity: str          # one of IDENTITIES
    kind: str              # "message", "mutant", "garbage" or "stream" (Ingest's parts)
    body: object           # a draft dict, garbage bytes, or a list of drafts/bytes (stream)
    cancel_after: int = -1  # a stream cancelled by the client after this many parts/pieces
    credential: str = ""   # what a forged caller presents


_OWN = PoolPid(0)
_TIDES = "Tides rise twice a day and the harbour empties at low water."
# A valid request per method: a "mutant" case is one of these with one or two of its fields
# replaced by generated values, so requests get past validation to the deeper code (random
# drafts almost always have some field the kernel refuses first).
VALID: dict[str, dict] = {
    "SpawnProcess": {"spec": {"name": "fz", "priority": 20,
                              "collections": [PLAYGROUND_COLLECTION]}},
    "ListProcesses": {"all": True, "page_size": 2},
    "GetProcess": {"pid": _OWN}, "KillProcess": {"pid": PoolPid(3)},
    "SuspendProcess": {"pid": PoolPid(1)}, "ResumeProcess": {"pid": PoolPid(1)},
    "SetProcessQuota": {"pid": _OWN, "quota": {"max_tokens": 1_000_000, "max_concurrent": 4}},
    "SetProcessPriority": {"pid": _OWN, "priority": 30},
    "ForkProcess": {"pid": _OWN, "name": "fz-child"},
    "Ask": {"pid": _OWN, "prompt": "When is low water?", "max_new_tokens": 8},
    "GetWorkingSet": {"pid": _OWN, "question": "when is low water", "budget": 512, "touch": True},
    "Remember": {"pid": _OWN, "entries": [{"speaker": "user", "text": _TIDES,
                                           "time": {"seconds": 1_683_500_000}}]},
    "Recall": {"pid": _OWN, "query": "low water", "k": 5},
    "CreateCollection": {"name": "fz-kb", "description": "made by the fuzzer"},
    "ListCollections": {"page_size": 1}, "DeleteCollection": {"name": "fz-kb"},
    "Ingest": {"collection": PLAYGROUND_COLLECTION, "source": "tides.txt", "kind": 1,
               "mtime": {"seconds": 1_683_500_000}, "meta": {"lang": "en"},
               "data": _TIDES.encode()},
    "IngestWithProgress": {"part": {
        "collection": PLAYGROUND_COLLECTION, "source": "tides.txt", "kind": 1,
        "mtime": {"seconds": 1_683_500_000}, "data": _TIDES.encode()}},
    "DeleteSource": {"collection": PLAYGROUND_COLLECTION, "source": "tides.txt"},
    "Search": {"collection": PLAYGROUND_COLLECTION, "query": "low water", "k": 3},
    "Embed": {"texts": ["low water", "high tide"]},
    "GetUsage": {}, "SetTenantWeight": {"tenant": "mallory", "weight": 2.0},
    "Ping": {"payload": b"ping"}, "WhoAmI": {}, "ListServices": {},
    "RegisterService": {"name": "vfm-trustd", "address": "unix:///tmp/vfm-fuzz-nowhere.sock",
                        "pid": 1},
    "CreateToken": {"tenant": "fz-tenant", "label": "fuzz"},
    "RevokeToken": {"token_id": "0" * 16}, "ListTokens": {"page_size": 1},
    "ApplyPolicy": {"pid": _OWN, "document": "level: standard\n", "filename": "policy.yaml"},
    "GetPolicy": {"pid": _OWN},
    "TestPolicy": {"document": "level: fast\n", "text": "When is low water?"},
    "ListAudit": {"pid": _OWN, "page_size": 2}, "VerifyAudit": {},
    "ListEscalations": {"state": 1, "page_size": 2},
    "GetEscalation": {"id": "0" * 12},
    "ResolveEscalation": {"id": "0" * 12, "decision": 3, "text": "fuzzed reply"},
    "WaitEscalation": {"id": "0" * 12, "timeout": {"nanos": 1_000_000}},
    "ExplainRoute": {"pid": _OWN, "question": "When is low water?"},
    "SendFeedback": {"ask_id": "0" * 24, "rating": 1, "note": "fuzzed"},
    "ListModels": {},
    "AdaptModel": {"name": "fuzzed-adapter", "teacher": "gemma3-270m", "quick": True},
    "ListModelJobs": {},
}


def _mutants(method: str, draft: st.SearchStrategy) -> st.SearchStrategy:
    valid = VALID[method]

    def mutate(generated: dict, keep: int) -> dict:
        return {**valid, **dict(list(generated.items())[:keep])}
    return st.builds(mutate, draft, st.integers(0, 2))


def _method_cases(method: str) -> st.SearchStrategy:
    desc = SERVICE.methods_by_name[method].input_type
    draft = message_drafts(desc)
    mutant = _mutants(method, draft)
    garbage = st.binary(min_size=1, max_size=48).map(lambda b: _unparseable(desc, b))
    cancel = st.one_of(st.just(-1), st.just(-1), st.integers(0, 3))
    no_cancel = st.just(-1)
    kinds = [st.tuples(st.just("message"), draft, cancel if method in STREAMING_OUT else no_cancel),
             st.tuples(st.just("mutant"), mutant, cancel if method in STREAMING_OUT else no_cancel),
             st.tuples(st.just("mutant"), mutant, no_cancel),
             st.tuples(st.just("garbage"), garbage, no_cancel)]
    if method in STREAMING_IN:
        part = st.one_of(draft, mutant, mutant, garbage)
        kinds.append(st.tuples(st.just("stream"), st.lists(part, max_size=4), cancel))
        kinds.append(st.tuples(st.just("stream"), st.lists(part, max_size=4), no_cancel))
    return st.tuples(st.just(method), st.one_of(kinds))


def cases() -> st.SearchStrategy:
    """Every method equally often, as any identity (forged ones rarely: one call in six)."""
    identity = st.sampled_from(("admin", "admin", "mallory", "mallory", "admin", "forged"))
    credential = st.one_of(st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
                           st.just("vfm_" + "0" * 40), st.just(""))
    return st.builds(lambda m, who, cred: Case(m[0], who, m[1][0], m[1][1], m[1][2], cred),
                     st.one_of([_method_cases(m) for m in METHODS]), identity, credential)


def render(body, limit: int = 60) -> str:
    """A short, readable form of a draft (long strings and bytes abbreviated)."""
    if isinstance(body, PoolPid):
        return f"<pool pid {body.index}>"
    if isinstance(body, dict):
        return "{" + ", ".join(f"{k}: {render(v, limit)}" for k, v in body.items()) + "}"
    if isinstance(body, list):
        if len(body) > 3 and all(x == body[0] for x in body):
            return f"[{render(body[0], limit)}] * {len(body)}"
        return "[" + ", ".join(render(v, limit) for v in body) + "]"
    if isinstance(body, (str, bytes)) and len(body) > limit:
        return f"{body[:20]!r}...({len(body)} {'chars' if isinstance(body, str) else 'bytes'})"
    return repr(body)
