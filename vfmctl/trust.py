"""vfmctl commands of trust: policies, the audit trail and human escalations."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

from rich.markup import escape
from rich.table import Table

from libvfm.errors import InvalidArgument
from libvfm.types import AuditRecord, Escalation, Verdict
from vfmctl import output
from vfmctl.knowledge import parse_time

MAX_POLICY_BYTES = 256 * 1024
_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
ESCALATION_STATES = ("open", "approved", "rejected", "replied")


def parse_since(text: str) -> float:
    """A time as ISO 8601 (no zone = local time), or an age: 30m, 2h, 7d ago."""
    ago = _AGO.fullmatch(text.strip())
    if ago:
        return time.time() - float(ago.group(1)) * _UNIT_S[ago.group(2)]
    try:
        return parse_time(text)
    except InvalidArgument:
        raise InvalidArgument(f"bad --since {text!r}: use ISO 8601 (2026-05-08T13:56) or an "
                              "age (30m, 2h, 7d)") from None


def read_policy(path: str) -> str:
    """The document of a policy file; a missing, oversized or non-UTF-8 one is bad input."""
    file = Path(path)
    if not file.is_file():
        raise InvalidArgument(f"no such policy file: {path}")
    if file.stat().st_size > MAX_POLICY_BYTES:
        raise InvalidArgument(f"{path}: a policy is at most {MAX_POLICY_BYTES // 1024} KiB")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") \
            from None


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S") if seconds else "-"


def _clip(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


# policies
def cmd_policy(args, client_for: Callable, pid_of: Callable) -> int:
    with client_for(args) as client:
        pid = pid_of(client, args.pid) if args.pid else 0
        if args.policy_cmd == "apply":
            done = client.apply_policy(read_policy(args.file), pid=pid,
                                       filename=Path(args.file).name)
            if args.output == "json":
                output.print_json(done)
            else:
                scope = f"process {pid}" if pid else "your tenant"
                output.say(f"policy version {done.version} applied to {scope} (sha256 "
                           f"{done.document_sha256[:12]}, audit record {done.audit_seq})")
        elif args.policy_cmd == "show":
            policy = client.get_policy(pid)
            if args.output == "json":
                output.print_json(policy)
            else:
                output.say(f"effective policy: {policy.origin}"
                           f"{f' version {policy.version}' if policy.version else ''}")
                print(json.dumps(policy.effective, indent=2, sort_keys=True))
        else:  # test
            result = client.test_policy(args.text, pid=pid, output_text=args.output_text,
                                        document=read_policy(args.file) if args.file else "",
                                        filename=Path(args.file).name if args.file else "")
            if args.output == "json":
                output.print_json(result)
            else:
                _verdict_table("input", result.input)
                if result.output is not None:
                    _verdict_table("output", result.output)
    return 0


def _verdict_table(what: str, verdict: Verdict) -> None:
    table = Table(box=None, pad_edge=False, title_justify="left",
                  title=f"{what}: {verdict.outcome or '-'} (system {verdict.system}, "
                        f"{verdict.elapsed_ms:.1f} ms{f', level {verdict.level}' if verdict.level else ''})")
    for col in ("CHECK", "TARGET", "SCORE", "THRESHOLD", "OUTCOME", "REASON"):
        table.add_column(col, justify="right" if col in ("SCORE", "THRESHOLD") else "left")
    for c in verdict.checks:
        table.add_row(c.check, c.target or "-", f"{c.score:.3f}", f"{c.threshold:.3f}",
                      c.outcome or "-", escape(_clip(c.reason)) or "-")
    console = output.console()
    console.print(table)
    for reason in verdict.reasons:
        console.print(f"  reason: {escape(reason)}")
    if verdict.escalation_rule:
        console.print(f"  escalation rule: {escape(verdict.escalation_rule)}")
    if verdict.redacted_text:
        console.print(f"  released as: {escape(verdict.redacted_text)}")
    if verdict.holding_reply:
        console.print(f"  holding reply: {escape(verdict.holding_reply)}")


# the audit trail
def cmd_audit(args, client_for: Callable, pid_of: Callable) -> int:
    with client_for(args) as client:
        if args.subject == "verify":
            result = client.verify_audit()
            if args.output == "json":
                output.print_json(result)
            elif result.ok:
                print(f"audit chain ok{f': {result.records} records' if result.records else ''}")
            else:
                print(f"audit chain BROKEN at record {result.first_bad_seq}"
                      f"{f': {result.reason}' if result.reason else ''}")
            return 0 if result.ok else 1
        pid = pid_of(client, args.subject) if args.subject else 0
        records = client.audit(pid, since=parse_since(args.since) if args.since else 0.0,
                               verdict=args.verdict, kind=args.kind)
    if args.output == "json":
        output.print_json(records)
    else:
        _audit_table(records)
    return 0


def _audit_table(records: list[AuditRecord]) -> None:
    table = Table(box=None, pad_edge=False)
    for col in ("SEQ", "TIME", "KIND", "TENANT", "PID", "VERDICT", "POLICY", "TOKENS", "DETAIL"):
        table.add_column(col, justify="right" if col in ("SEQ", "PID", "TOKENS") else "left")
    for r in records:
        if r.kind == "ask":
            detail = "; ".join(r.reasons) or r.model
        else:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(r.attributes.items())
                               if k not in ("document_sha256", "text"))
        table.add_row(str(r.seq), _when(r.time), r.kind, r.tenant, str(r.pid or "-"),
                      r.verdict or "-", str(r.policy_version or "-"),
                      str(r.tokens_in + r.tokens_out) if r.kind == "ask" else "-",
                      escape(_clip(detail)))
    output.console().print(table)


# escalations
def cmd_escalations(args, client_for: Callable) -> int:
    action = args.escalation_cmd or "list"
    with client_for(args) as client:
        if action == "list":
            found = client.escalations(getattr(args, "state", ""))  # unset without "list"
            output.print_json(found) if args.output == "json" else _escalation_table(found)
            return 0
        if action == "show":
            found = client.escalation(args.id)
        else:
            decision, text = _decision(args)
            found = client.resolve_escalation(args.id, decision, text)
    if args.output == "json":
        output.print_json(found)
    elif action == "show":
        _escalation_detail(found)
    else:
        output.say(f"escalation {found.id}: {found.state} (audit record {found.audit_seq})")
    return 0


def _decision(args) -> tuple[str, str]:
    if args.reply is not None:
        return "reply", args.reply
    return ("approve" if args.approve else "reject"), args.note


def _escalation_table(found: list[Escalation]) -> None:
    table = Table(box=None, pad_edge=False)
    for col in ("ID", "STATE", "TENANT", "PID", "OPENED", "WHY", "QUESTION"):
        table.add_column(col, justify="right" if col == "PID" else "left")
    for e in found:
        why = e.escalation_rule or "; ".join(e.reasons) or e.outcome
        table.add_row(e.id, e.state, e.tenant, str(e.pid), _when(e.created_at),
                      escape(_clip(why, 40)), escape(_clip(e.question, 50)))
    output.console().print(table)


def _escalation_detail(e: Escalation) -> None:
    rows = [("id", e.id), ("state", e.state), ("tenant", e.tenant), ("pid", e.pid),
            ("opened", _when(e.created_at)), ("question", e.question),
            ("outcome", e.outcome or "-"), ("rule", e.escalation_rule or "-"),
            ("reasons", "; ".join(e.reasons) or "-"), ("holding reply", e.holding_reply or "-")]
    if e.resolved:
        rows += [("resolved", f"{_when(e.resolved_at)} by {e.resolved_by}"),
                 ("text", e.text or "-"), ("audit record", e.audit_seq)]
    console = output.console()
    for name, value in rows:
        console.print(f"{name + ':':<15} {escape(str(value))}")


def add_commands(add: Callable, client_for: Callable, pid_of: Callable,
                 common: Callable) -> None:
    """Register the commands on vfmctl's parser (as vfmctl.knowledge.add_commands)."""
    p = add("policy", lambda a: cmd_policy(a, client_for, pid_of),
            "set, show or try your tenant's trust policy (or one process's)")
    sub = p.add_subparsers(dest="policy_cmd", metavar="ACTION", required=True)
    apply = sub.add_parser("apply", help="set the policy from a YAML or JSON file (a new "
                           "version; refused with the line and the reason when bad)")
    apply.add_argument("file", help="the policy file, e.g. policy.yaml")
    show = sub.add_parser("show", help="print the effective policy and where it comes from")
    test = sub.add_parser("test", help="run a policy's checks on a text without asking a "
                          "model: every score and the verdict")
    test.add_argument("file", nargs="?", default="",
                      help="the policy file (default: the effective policy)")
    test.add_argument("--text", required=True, help="the question to screen")
    test.add_argument("--output-text", default="", help="an answer to check as well")
    for action in (apply, show, test):
        action.add_argument("--pid", default="", help="a process's own policy (pid or name; "
                            "default: the tenant's)")
        common(action)

    p = add("audit", lambda a: cmd_audit(a, client_for, pid_of),
            "list audit records (yours; every tenant's for an admin), or 'audit verify' to "
            "check the chain (exit 1 when a record was tampered with)")
    # not "target": that is the connection option --target (a remote kernel)
    p.add_argument("subject", nargs="?", default="", metavar="PID|verify",
                   help="only this process's records (pid or name), or 'verify'")
    p.add_argument("--since", help="records from this time on: ISO 8601, or an age (2h, 7d)")
    p.add_argument("--verdict", default="", help="only records with this verdict "
                   "(allow, redact, refuse, escalate, ...)")
    p.add_argument("--kind", default="", choices=("ask", "policy", "escalation", "audit"),
                   help="only records of this kind")

    p = add("escalations", lambda a: cmd_escalations(a, client_for),
            "what needs a human: list, show or resolve escalated asks")
    p.set_defaults(escalation_cmd=None)
    sub = p.add_subparsers(dest="escalation_cmd", metavar="ACTION")
    listing = sub.add_parser("list", help="list escalations (the default action)")
    listing.add_argument("--state", default="", choices=ESCALATION_STATES,
                         help="only escalations in this state")
    show = sub.add_parser("show", help="show one escalation")
    show.add_argument("id", help="the escalation's id (12 hex digits, as listed)")
    resolve = sub.add_parser("resolve", help="decide an open escalation (audited; the "
                             "waiting client hears it)")
    resolve.add_argument("id", help="the escalation's id (12 hex digits, as listed)")
    choice = resolve.add_mutually_exclusive_group(required=True)
    choice.add_argument("--approve", action="store_true", help="let the held answer go out")
    choice.add_argument("--reject", action="store_true", help="refuse it")
    choice.add_argument("--reply", metavar="TEXT", help="answer in its place with TEXT")
    resolve.add_argument("--note", default="", help="a note kept with an approve or reject")
    for action in (listing, show, resolve):
        common(action)

