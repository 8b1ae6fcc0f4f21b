"""Syscall fuzzer: hypothesis-generated requests for every KernelService method, against real
daemons, counting INTERNAL, UNKNOWN, hung calls and crashes, then checking planted data.

What is sent, each case as one of two identities (the local admin over the Unix socket, a
token tenant "mallory" over TCP) or with forged credentials:
  * a well-formed request message built from the method's proto descriptor, field by field
    from its type: extreme and random ints, NaN/inf/extreme floats, empty, unicode, control
    and huge strings, random bytes, known and unknown enum numbers, set and unset nested
    messages (Timestamp/Duration extremes come from their int fields), maps and repeated
    fields; a `pid` is sometimes one of the caller's own live processes or another tenant's,
    so requests reach past the lookup. Ask is read to its end (or cancelled after k pieces);
  * a mutant: a valid request of the method (VALID) with one or two fields replaced by
    generated ones, so requests get past the first validation to the deeper code;
  * a garbage frame: bytes that do not parse as the request type;
  * for Ingest, a malformed client stream: 0..4 parts, each a message or garbage, the header
    anywhere or nowhere, half-closed or cancelled by the client after k parts.
Daemons: vfmd (`--listen` on loopback for the token tenant), vfm-datad and `bench.fake_modeld`
registered as vfm-modeld (fast; the real model is too slow for a fuzzer). Before the fuzz a
third tenant, "keeper", plants a process, memory entries and a collection with a document;
mallory's pids include keeper's, the admin's never do (an admin may legitimately change them).
Afterwards keeper's data must read back unchanged and every daemon must still be running.

A call that runs past `--deadline` seconds (DEADLINE_EXCEEDED) counts as hung. Each INTERNAL is
looked up in the daemons' logs by its error id, so the report names the exception and where it
was raised; failures are deduplicated by (method, status, exception or details).

    python -m bench fuzz [--count 10000] [--seed 0] [--deadline 10]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from bench.common import cleanup, report, spawn_daemon, stop, temp_state_dir, wait_until
from libvfm import Client, Quota, VfmError
from libvfm.types import MemoryEntry
from vfmos_runtime.credentials import fetch_ticket
from vfmos_runtime.protocol import MAX_MESSAGE_BYTES, TICKET_HEADER
from vfmos.kernel.v1 import kernel_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["KernelService"]
METHODS = [m.name for m in SERVICE.methods]
STREAMING_IN = {m.name for m in SERVICE.methods if m.client_streaming}
STREAMING_OUT = {m.name for m in SERVICE.methods if m.server_streaming}
IDENTITIES = ("admin", "mallory", "forged")
DEFAULT_DEADLINE_S = 10.0
POOL_SLOTS = 8         # live pids an identity's pool keeps (the newest spawns and forks)
MAX_DEPTH = 3          # nested messages deeper than this stay unset
PLAYGROUND_COLLECTION = "fuzz"
KEEPER_COLLECTION = "keeper-kb"

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1),
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


# --- generation ----------------------------------------------------------------------------

def _ints(lo: int, hi: int) -> st.SearchStrategy:
    edges = [v for v in (*_EDGE_INTS, lo, hi, lo + 1, hi - 1) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def _strings() -> st.SearchStrategy:
    huge = st.builds(lambda ch, n: ch * n, st.sampled_from("aé日 \x00"), st.sampled_from(_HUGE_LENGTHS))
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
    from google.protobuf import message_factory
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
    from google.protobuf import message_factory
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
    "SpawnProcess": {"spec": {"name": "fz", "priority": 20, "collections": [PLAYGROUND_COLLECTION]}},
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
    "DeleteSource": {"collection": PLAYGROUND_COLLECTION, "source": "tides.txt"},
    "Search": {"collection": PLAYGROUND_COLLECTION, "query": "low water", "k": 3},
    "GetUsage": {}, "SetTenantWeight": {"tenant": "mallory", "weight": 2.0},
    "Ping": {"payload": b"ping"}, "WhoAmI": {}, "ListServices": {},
    "RegisterService": {"name": "vfm-trustd", "address": "unix:///tmp/vfm-fuzz-nowhere.sock",
                        "pid": 1},
    "CreateToken": {"tenant": "fz-tenant", "label": "fuzz"},
    "RevokeToken": {"token_id": "0" * 16}, "ListTokens": {"page_size": 1},
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


# --- sending -------------------------------------------------------------------------------

CLIENT_OPTIONS = [("grpc.max_send_message_length", 64 * 2**20),  # let the daemon refuse
                  ("grpc.max_receive_message_length", 64 * 2**20)]


@dataclass
class Outcome:
    code: str               # a grpc.StatusCode name, or "CANCELLED_BY_CLIENT"
    details: str = ""
    stream_done: bool = True  # an Ask stream that ended OK sent its `done` last
    reply: bytes = b""


class Target:
    """Where and as whom cases are sent: channels, credentials, and each identity's pids."""

    def __init__(self, kernel_sock: Path, tcp: str, mallory_token: str,
                 foreign_pids: list[int], protected_pids: set[int],
                 deadline_s: float = DEFAULT_DEADLINE_S):
        self.kernel_sock, self.deadline_s = kernel_sock, deadline_s
        self.unix = grpc.insecure_channel(f"unix:{kernel_sock}", options=CLIENT_OPTIONS)
        self.tcp = grpc.insecure_channel(tcp, options=CLIENT_OPTIONS)
        self.mallory_token = mallory_token
        self.ticket = fetch_ticket(kernel_sock)
        self.own: dict[str, list[int]] = {"admin": [], "mallory": []}
        self.foreign = {"admin": [], "mallory": list(foreign_pids)}
        self.protected = protected_pids  # pids the admin must not name (keeper's)

    def close(self) -> None:
        self.unix.close()
        self.tcp.close()

    def route(self, case: Case) -> tuple[grpc.Channel, tuple]:
        if case.identity == "admin":
            return self.unix, ((TICKET_HEADER, self.ticket),)
        if case.identity == "mallory":
            return self.tcp, (("authorization", f"Bearer {self.mallory_token}"),)
        if case.credential.startswith("vfm_") or len(case.credential) % 2:
            return self.tcp, (("authorization", f"Bearer {case.credential}"),)
        return self.unix, ((TICKET_HEADER, case.credential),)

    def resolver(self, identity: str):
        pool_of = "admin" if identity == "forged" else identity

        def resolve(value):
            if isinstance(value, PoolPid):
                choices = self.own[pool_of][-POOL_SLOTS:] + self.foreign[pool_of]
                return choices[value.index % len(choices)] if choices else value.index
            if pool_of == "admin" and value in self.protected:
                return -value - 1  # never the keeper's pid: an admin may change it
            return value
        return resolve

    def learn(self, case: Case, outcome: Outcome) -> None:
        """A process spawned or forked by the fuzz joins its owner's pool; a killed one leaves
        every pool (so pool pids keep reaching live processes)."""
        if outcome.code != "OK" or case.method not in _REPLIES:
            return
        pid = _REPLIES[case.method].FromString(outcome.reply).process.pid
        if case.method == "KillProcess":
            for pids in (*self.own.values(), *self.foreign.values()):
                while pid in pids:
                    pids.remove(pid)
        elif case.identity in self.own:
            self.own[case.identity].append(pid)


_REPLIES = {"SpawnProcess": pb.SpawnProcessResponse, "ForkProcess": pb.ForkProcessResponse,
            "KillProcess": pb.KillProcessResponse}


def _payloads(target: Target, case: Case) -> list[bytes]:
    desc = SERVICE.methods_by_name[case.method].input_type
    resolve = target.resolver(case.identity)
    parts = case.body if case.kind == "stream" else [case.body]
    return [p if isinstance(p, bytes) else _build_resolved(desc, p, resolve).SerializeToString()
            for p in parts]


def _build_resolved(desc: Descriptor, draft: dict, resolve):
    draft = {k: (resolve(v) if k == "pid" and isinstance(v, (int, PoolPid)) else v)
             for k, v in draft.items()}
    return build(desc, draft, resolve)


def _error(exc: grpc.RpcError) -> Outcome:
    code = exc.code()
    return Outcome(code.name if code else "UNKNOWN", exc.details() or "")


def _unary(channel, path, payload: bytes, metadata, deadline: float) -> Outcome:
    try:
        reply = channel.unary_unary(path)(payload, metadata=metadata, timeout=deadline)
        return Outcome("OK", reply=reply)
    except grpc.RpcError as exc:
        return _error(exc)


def _server_stream(channel, path, payload: bytes, metadata, deadline: float,
                   cancel_after: int) -> Outcome:
    call = channel.unary_stream(path)(payload, metadata=metadata, timeout=deadline)
    last, pieces = None, 0
    try:
        for last in call:
            pieces += 1
            if pieces == cancel_after:
                call.cancel()
                return Outcome("CANCELLED_BY_CLIENT")
    except grpc.RpcError as exc:
        if cancel_after >= 0 and exc.code() == grpc.StatusCode.CANCELLED and pieces >= cancel_after:
            return Outcome("CANCELLED_BY_CLIENT")
        return _error(exc)
    done = last is not None and pb.AskResponse.FromString(last).HasField("done")
    return Outcome("OK", stream_done=done)


def _client_stream(channel, path, parts: list[bytes], metadata, deadline: float,
                   cancel_after: int) -> Outcome:
    call = channel.stream_unary(path)
    if cancel_after < 0:
        try:
            return Outcome("OK", reply=call(iter(parts), metadata=metadata, timeout=deadline))
        except grpc.RpcError as exc:
            return _error(exc)
    release = threading.Event()

    def held_open():  # the first parts, then the stream stays open until the cancel
        yield from parts[:cancel_after]
        release.wait(deadline)

    future = call.future(held_open(), metadata=metadata, timeout=deadline)
    time.sleep(0.2)  # lets the parts reach the kernel before the client gives up
    cancelled = future.cancel()
    release.set()
    if cancelled:
        return Outcome("CANCELLED_BY_CLIENT")
    try:
        return Outcome("OK", reply=future.result())
    except grpc.RpcError as exc:
        return _error(exc)


def send(target: Target, case: Case) -> Outcome:
    """Send one case and wait for its status (at most the target's deadline)."""
    channel, metadata = target.route(case)
    path = f"/{SERVICE.full_name}/{case.method}"
    payloads = _payloads(target, case)
    if case.method in STREAMING_IN:
        return _client_stream(channel, path, payloads, metadata, target.deadline_s,
                              case.cancel_after)
    if case.method in STREAMING_OUT:
        return _server_stream(channel, path, payloads[0], metadata, target.deadline_s,
                              case.cancel_after)
    return _unary(channel, path, payloads[0], metadata, target.deadline_s)


# --- counting and explaining -----------------------------------------------------------------

FAILURE_CODES = {"INTERNAL": "internal", "UNKNOWN": "unknown", "DEADLINE_EXCEEDED": "hung"}


@dataclass
class Failure:
    case: Case
    outcome: Outcome


@dataclass
class Tally:
    requests: int = 0
    codes: Counter = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    # not goals, reported: OK Ask streams without `done`, error messages over the trailer limit
    anomalies: list[Failure] = field(default_factory=list)
    stopped: bool = False  # a daemon died: the remaining cases were not sent
    skipped: int = 0       # cases of a shape that had hung too often (see fuzz)
    hung_shapes: Counter = field(default_factory=Counter)

    def add(self, case: Case, outcome: Outcome) -> None:
        self.requests += 1
        self.codes[outcome.code] += 1
        if outcome.code in FAILURE_CODES:
            self.failures.append(Failure(case, outcome))
        elif case.method in STREAMING_OUT and outcome.code == "OK" and not outcome.stream_done:
            self.anomalies.append(Failure(case, Outcome("OK_WITHOUT_DONE")))
        elif outcome.code == "RESOURCE_EXHAUSTED" and "metadata size" in outcome.details:
            # the daemon's error message (echoing the input?) outgrew gRPC's trailer limit, so
            # the caller got this instead of the error the daemon meant
            self.anomalies.append(Failure(case, Outcome("ERROR_TOO_LARGE", outcome.details)))

    def count(self, kind: str) -> int:
        return sum(FAILURE_CODES[f.outcome.code] == kind for f in self.failures)


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def explain(details: str, logs: list[str]) -> str:
    """For an INTERNAL with an error id: the exception and its innermost frame, from the log."""
    found = re.search(r"error id ([0-9a-f]+)", details)
    if not found:
        return ""
    for text in logs:
        lines = text.splitlines()
        at = next((i for i, line in enumerate(lines) if f"error id {found.group(1)}" in line), None)
        if at is None:
            continue
        trace = []
        for line in lines[at + 1:]:
            if _LOG_LINE.match(line):
                break
            trace.append(line)
        frames = [m for line in trace if (m := _FRAME.search(line))]
        error = next((line for line in reversed(trace) if line.strip()), "")
        where = ""
        if frames:
            path, line_no, fn = frames[-1].groups()
            where = f" at {os.path.relpath(path, REPO_ROOT)}:{line_no} in {fn}"
        return f"{error.strip()}{where}"
    return ""


REPO_ROOT = Path(__file__).resolve().parents[1]


def _shape(details: str) -> str:
    """Details with what differs between two calls of one defect blanked out: numbers, error
    ids and the request type's name."""
    details = re.sub(r"error id [0-9a-f]+", "error id ?", details)
    details = re.sub(r"'vfmos\.kernel\.v1\.\w+'", "'<request type>'", details)
    return re.sub(r"\d+", "#", details)[:160]


def _shape_of(case: Case) -> tuple[str, bool, bool]:
    """How a hang is told apart: the method, whether a part was a garbage frame, and whether
    the client cancelled."""
    parts = case.body if case.kind == "stream" else [case.body]
    return case.method, any(isinstance(p, bytes) for p in parts), case.cancel_after >= 0


def distinct(failures: list[Failure], logs: list[str]) -> list[dict]:
    """Failures grouped by cause: (status, the exception and where it was raised) for an
    INTERNAL found in a log, (status, details' shape) otherwise; a hang by (method, whether
    a part was a garbage frame, whether the client cancelled).
    Each group lists its methods and keeps its first example."""
    groups: dict[tuple, dict] = {}
    for failure in failures:
        case, outcome = failure.case, failure.outcome
        cause = explain(outcome.details, logs) if outcome.code == "INTERNAL" else ""
        if outcome.code == "DEADLINE_EXCEEDED":
            key = (outcome.code, *_shape_of(case))
        elif cause:
            key = (outcome.code, re.sub(r"^(\w[\w.]*):.*? at ", r"\1 at ", cause))
        else:
            key = (outcome.code, _shape(outcome.details))
        if key not in groups:
            groups[key] = {"status": outcome.code, "methods": [], "count": 0,
                           "method": case.method, "identity": case.identity, "kind": case.kind,
                           "cancel_after": case.cancel_after, "details": outcome.details[:300],
                           "cause": cause, "request": render(case.body)}
        group = groups[key]
        group["count"] += 1
        if case.method not in group["methods"]:
            group["methods"].append(case.method)
    return sorted(groups.values(), key=lambda g: (g["status"], g["method"], -g["count"]))


def fuzz(target: Target, count: int, seed_value: int = 0, alive=lambda: True,
         trace=None, hangs_per_shape: int = 0) -> Tally:
    """Send `count` generated cases (a fixed seed: the same cases every run) and tally them.
    Stops early if `alive()` says a daemon has died (checked every 50 cases). Each hung call
    costs a whole deadline: with `hangs_per_shape` > 0, once that many calls of one shape
    (method, a garbage part or not, cancelled or not) have hung, later cases of that shape
    are skipped (counted, not sent). `trace(case, outcome)` hears every call."""
    tally = Tally()

    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)
    @seed(seed_value)
    @given(case=cases())
    def one(case: Case) -> None:
        if tally.stopped or (tally.requests % 50 == 0 and not alive()):
            tally.stopped = True
            return
        shape = _shape_of(case)
        if hangs_per_shape and tally.hung_shapes[shape] >= hangs_per_shape:
            tally.skipped += 1
            return
        outcome = send(target, case)
        tally.add(case, outcome)
        if outcome.code == "DEADLINE_EXCEEDED":
            tally.hung_shapes[shape] += 1
        target.learn(case, outcome)
        if trace is not None:
            trace(case, outcome)

    one()
    return tally


# --- the daemons, planted data and the run -----------------------------------------------------

KEEPER_ENTRIES = [("keeper", "The lighthouse lamp is cleaned every Sunday.", 1_683_500_000.0),
                  ("visitor", "We saw seals from the lighthouse gallery.", 1_683_600_000.0),
                  ("keeper", "Fog horn tests happen at noon on Mondays.", 1_683_700_000.0)]
KEEPER_DOC = (b"# Lighthouse log\n\nThe lamp turns once every ten seconds.\n\n"
              b"## Supplies\n\nOil, wicks and a spare lens are kept in the store room.\n")
READY_TIMEOUT_S = 300


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving(sock: Path, names: tuple[str, ...]) -> bool:
    try:
        with Client(sock, timeout=2) as client:
            up = {d.name for d in client.services() if d.health == "SERVING"}
        return set(names) <= up
    except VfmError:
        return False


class FuzzStack:
    """vfmd (Unix socket and loopback TCP), vfm-datad and the fake vfm-modeld in a temp dir."""

    SERVICES = ("vfm-datad", "vfm-modeld")

    def __init__(self):
        self.state = temp_state_dir()
        os.chmod(self.state, 0o755)
        self.sock = self.state / "vfmd.sock"
        self.tcp = f"127.0.0.1:{_free_port()}"
        self.procs = {"vfmd": spawn_daemon(
            ["-m", "kernel.main", "--state-dir", str(self.state), "--listen", self.tcp,
             "--health-interval", "0.5"], self.state / "vfmd.log")}
        try:
            wait_until(lambda: self._pings() or not self.alive(), READY_TIMEOUT_S, "vfmd to serve")
            self.procs["vfm-datad"] = spawn_daemon(
                ["-m", "services.data.main", "--state-dir", str(self.state),
                 "--kernel-socket", str(self.sock), "--summary-pages", "0"],
                self.state / "vfm-datad.log")
            self.procs["vfm-modeld"] = spawn_daemon(
                ["-m", "bench.fake_modeld", "--socket", str(self.state / "fake-modeld.sock"),
                 "--kernel-socket", str(self.sock), "--max-batch", "8"],
                self.state / "vfm-modeld.log")
            wait_until(lambda: self.serving() or not self.alive(), READY_TIMEOUT_S,
                       "vfm-datad and the fake vfm-modeld to serve")
            if not self.alive():
                raise RuntimeError(f"a daemon exited while starting:\n{self.logs_tail()}")
        except BaseException:
            self.close()
            raise

    def _pings(self) -> bool:
        try:
            with Client(self.sock, timeout=2) as client:
                client.ping()
            return True
        except VfmError:
            return False

    def serving(self) -> bool:
        return _serving(self.sock, self.SERVICES)

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is not None]

    def alive(self) -> bool:
        return not self.dead()

    def logs(self) -> list[str]:
        return [(self.state / f"{name}.log").read_text(errors="replace") for name in self.procs]

    def logs_tail(self, lines: int = 20) -> str:
        return "\n".join(f"--- {name} ---\n" + "\n".join(text.splitlines()[-lines:])
                         for name, text in zip(self.procs, self.logs()))

    def close(self) -> None:
        for name in reversed(list(self.procs)):
            stop(self.procs[name])
        cleanup(self.state)


@dataclass
class Planted:
    """What the tenants hold before the fuzz."""

    keeper_pid: int
    keeper_view: dict
    playground: dict[str, list[int]]  # identity -> its own pids


def keeper_view(keeper: Client, pid: int) -> dict:
    """Everything keeper can read back of its planted data, in a comparable form."""
    proc = keeper.get(pid)
    return {
        "process": (proc.pid, proc.tenant, proc.state, proc.spec, proc.counters),
        "processes": sorted(p.pid for p in keeper.ps(all=True)),
        "memory": sorted((h.entry.seq, h.entry.speaker, h.entry.text, h.entry.time, h.entry.pinned)
                         for h in keeper.recall(pid, "lighthouse fog seals", k=50)),
        "knowledge": sorted((h.chunk_id, h.source, h.text)
                            for h in keeper.search(KEEPER_COLLECTION, "lighthouse lamp", k=50)),
        "collections": sorted((c.name, c.chunks, c.sources) for c in keeper.collections()),
    }


def plant(admin: Client, mallory: Client, keeper: Client) -> Planted:
    pid = keeper.spawn("keeper-bot", priority=7, quota=Quota(max_tokens=12_345),
                       system_prompt="Answer as the lighthouse keeper.").pid
    keeper.remember(pid, [MemoryEntry(text=t, speaker=s, time=at) for s, t, at in KEEPER_ENTRIES])
    keeper.collection_create(KEEPER_COLLECTION, "the keeper's notes")
    keeper.ingest(KEEPER_COLLECTION, "log.md", KEEPER_DOC)
    playground = {}
    for name, client in (("admin", admin), ("mallory", mallory)):
        pids = [client.spawn(f"{name}-{i}", collections=[PLAYGROUND_COLLECTION] if i else []).pid
                for i in range(3)]
        client.remember(pids[0], [MemoryEntry(text=t, speaker=s, time=at)
                                  for s, t, at in KEEPER_ENTRIES])
        client.collection_create(PLAYGROUND_COLLECTION)
        client.ingest(PLAYGROUND_COLLECTION, "doc.txt", b"Tides rise twice a day. " * 20)
        playground[name] = pids
    return Planted(pid, keeper_view(keeper, pid), playground)


@dataclass
class FuzzResult:
    tally: Tally
    crashed: list[str]
    data_intact: bool
    data_diff: str
    failures: list[dict]
    anomalies: list[dict]

    def figures(self) -> dict:
        t = self.tally
        return {"requests": t.requests, "internal": t.count("internal"),
                "unknown": t.count("unknown"), "hung": t.count("hung"),
                "crashes": len(self.crashed), "data_intact": self.data_intact,
                "distinct_failures": len(self.failures), "anomalies": len(t.anomalies),
                "stopped_early": t.stopped, "skipped": t.skipped}

    def describe(self) -> str:
        """Every distinct failure, one block each: what to check a fix against."""
        out = [f"{k}={v}" for k, v in self.figures().items()]
        if self.crashed:
            out.append(f"daemons not running afterwards: {', '.join(self.crashed)}")
        if not self.data_intact:
            out.append(f"keeper's data changed: {self.data_diff}")
        out.extend(_group_text(group) for group in (*self.failures, *self.anomalies))
        return "\n".join(out)


def _group_text(group: dict) -> str:
    how = f"{group['identity']}, {group['kind']}"
    if group["cancel_after"] >= 0:
        how += f", cancelled by the client after {group['cancel_after']}"
    text = (f"- {group['status']} x{group['count']} in {', '.join(sorted(group['methods']))}\n"
            f"    first: {group['method']} ({how})\n    request: {group['request']}\n"
            f"    details: {group['details']}")
    return text + (f"\n    cause: {group['cause']}" if group["cause"] else "")


def _diff(before: dict, after: dict) -> str:
    return "; ".join(f"{k}: {before[k]!r} -> {after.get(k)!r}" for k in before
                     if before[k] != after.get(k))


def run(stack: FuzzStack, count: int, seed_value: int = 0,
        deadline_s: float = DEFAULT_DEADLINE_S, trace=None,
        hangs_per_shape: int = 0) -> FuzzResult:
    """Plant data, fuzz, then check the daemons and the planted data."""
    with Client(stack.sock, timeout=30) as admin:
        mallory_token, _ = admin.token_create("mallory")
        keeper_token, _ = admin.token_create("keeper")
    admin = Client(stack.sock, timeout=30)
    mallory = Client(target=stack.tcp, token=mallory_token, timeout=30)
    keeper = Client(target=stack.tcp, token=keeper_token, timeout=30)
    target = None
    try:
        planted = plant(admin, mallory, keeper)
        target = Target(stack.sock, stack.tcp, mallory_token,
                        foreign_pids=[planted.keeper_pid, *planted.playground["admin"]],
                        protected_pids={planted.keeper_pid}, deadline_s=deadline_s)
        for name, pids in planted.playground.items():
            target.own[name].extend(pids)
        tally = fuzz(target, count, seed_value, alive=stack.alive, trace=trace,
                     hangs_per_shape=hangs_per_shape)
        crashed = stack.dead()
        intact, diff = False, "not checked: a daemon died"
        if not crashed:
            # the fuzz may have registered services at bogus addresses: wait for their heartbeats
            wait_until(stack.serving, 60, "the services to serve again")
            after = keeper_view(keeper, planted.keeper_pid)
            intact, diff = after == planted.keeper_view, _diff(planted.keeper_view, after)
    finally:
        for client in (admin, mallory, keeper):
            client.close()
        if target is not None:
            target.close()
    logs = stack.logs()
    return FuzzResult(tally, crashed, intact, diff, distinct(tally.failures, logs),
                      distinct(tally.anomalies, logs))


def _trace(out, case: Case, outcome: Outcome) -> None:
    out.write(json.dumps({"method": case.method, "identity": case.identity, "kind": case.kind,
                          "cancel_after": case.cancel_after, "request": render(case.body),
                          "code": outcome.code, "details": outcome.details[:300]}) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="cases to send (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help="seconds after which a call counts as hung (default 10)")
    parser.add_argument("--hangs-per-shape", type=int, default=0,
                        help="skip a shape of case after this many of its calls hung "
                        "(default 0: never skip)")
    parser.add_argument("--quick", action="store_true", help="200 cases")
    parser.add_argument("--trace", type=Path, help="write every case and its status here "
                        "(JSON lines)")
    args = parser.parse_args(argv)
    count = 200 if args.quick else args.count
    stack = FuzzStack()
    started = time.monotonic()
    out = open(args.trace, "w") if args.trace else None
    try:
        result = run(stack, count, args.seed, args.deadline,
                     trace=(lambda c, o: _trace(out, c, o)) if out else None,
                     hangs_per_shape=args.hangs_per_shape)
    finally:
        stack.close()
        if out:
            out.close()
    figures = result.figures()
    figures.update(seconds=round(time.monotonic() - started, 1), seed=args.seed,
                   codes=dict(result.tally.codes), failures=result.failures)
    rows = [(g["status"], g["count"], len(g["methods"]), g["method"],
             (g["cause"] or g["details"])[:90]) for g in (*result.failures, *result.anomalies)]
    print(result.describe())
    report(f"syscall fuzz: {result.tally.requests} requests, seed {args.seed}", rows,
           ("status", "count", "methods", "first in", "cause or details"), figures)
    return 0
