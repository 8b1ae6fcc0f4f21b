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
  * a mutant: a valid request of the method (fuzzgen.VALID) with one or two fields replaced by
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
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.descriptor import Descriptor
from hypothesis import HealthCheck, Phase, given, seed, settings

from bench.common import report, wait_until
from bench.stackutil import DaemonStack
from bench.fuzzgen import (KEEPER_COLLECTION, PLAYGROUND_COLLECTION, POOL_SLOTS, SERVICE,
                           STREAMING_IN, STREAMING_OUT, Case, PoolPid, build, cases, render)
from libvfm import Client, Quota
from libvfm.types import MemoryEntry
from vfmos_runtime.credentials import fetch_ticket
from vfmos_runtime.protocol import TICKET_HEADER
from vfmos.kernel.v1 import kernel_pb2 as pb

DEFAULT_DEADLINE_S = 10.0


# --- sending -------------------------------------------------------------------------------

CLIENT_OPTIONS = [("grpc.max_send_message_length", 64 * 2**20),  # let the daemon refuse
                  ("grpc.max_receive_message_length", 64 * 2**20)]


@dataclass
class Outcome:
    code: str               # a grpc.StatusCode name, or "CANCELLED_BY_CLIENT"
    details: str = ""
    stream_done: bool = True  # an Ask stream that ended OK sent its `done` last
    reply: bytes = b""
    seconds: float = 0.0      # how long the call took


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
                if choices:
                    return choices[value.index % len(choices)]
                value = value.index  # an empty pool: the slot number, which may be keeper's
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


def _bidi_stream(channel, path, parts: list[bytes], metadata, deadline: float,
                 cancel_after: int) -> Outcome:
    """Parts in, progress out (IngestWithProgress): a cancel stops reading after that many
    answers, the parts having all been sent."""
    call = channel.stream_stream(path)(iter(parts), metadata=metadata, timeout=deadline)
    last, answers = None, 0
    try:
        for last in call:
            answers += 1
            if answers == cancel_after:
                call.cancel()
                return Outcome("CANCELLED_BY_CLIENT")
    except grpc.RpcError as exc:
        if (cancel_after >= 0 and exc.code() == grpc.StatusCode.CANCELLED
                and answers >= cancel_after):
            return Outcome("CANCELLED_BY_CLIENT")
        return _error(exc)
    done = last is not None and pb.IngestWithProgressResponse.FromString(last).HasField("result")
    return Outcome("OK", stream_done=done)


def send(target: Target, case: Case) -> Outcome:
    """Send one case and wait for its status (at most the target's deadline)."""
    channel, metadata = target.route(case)
    path = f"/{SERVICE.full_name}/{case.method}"
    payloads = _payloads(target, case)
    started = time.monotonic()
    if case.method in STREAMING_IN and case.method in STREAMING_OUT:
        outcome = _bidi_stream(channel, path, payloads, metadata, target.deadline_s,
                               case.cancel_after)
    elif case.method in STREAMING_IN:
        outcome = _client_stream(channel, path, payloads, metadata, target.deadline_s,
                                 case.cancel_after)
    elif case.method in STREAMING_OUT:
        outcome = _server_stream(channel, path, payloads[0], metadata, target.deadline_s,
                                 case.cancel_after)
    else:
        outcome = _unary(channel, path, payloads[0], metadata, target.deadline_s)
    outcome.seconds = time.monotonic() - started
    return outcome


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
    slowest: tuple[float, str] = (0.0, "")  # the longest call that did not hang, its method

    def add(self, case: Case, outcome: Outcome) -> None:
        self.requests += 1
        if outcome.code != "DEADLINE_EXCEEDED" and outcome.seconds > self.slowest[0]:
            self.slowest = (outcome.seconds, case.method)
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


class FuzzStack(DaemonStack):
    """vfmd (Unix socket and loopback TCP), vfm-datad and the fake vfm-modeld in a temp dir."""

    def __init__(self):
        super().__init__({
            "vfm-datad": ["services.data.main", "--summary-pages", "0"],
            "vfm-modeld": ["bench.fake_modeld", "--max-batch", "8"],
        }, kernel_args=("--health-interval", "0.5"), ready_timeout_s=READY_TIMEOUT_S)


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
                "stopped_early": t.stopped, "skipped": t.skipped,
                "slowest_call_s": round(t.slowest[0], 2), "slowest_method": t.slowest[1]}

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
                          "code": outcome.code, "details": outcome.details[:300],
                          "seconds": round(outcome.seconds, 3)}) + "\n")


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
