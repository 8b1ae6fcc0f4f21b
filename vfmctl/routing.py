"""vfmctl commands of the router: spawn's routing options, `route explain` and `feedback`."""

from __future__ import annotations

import argparse
from typing import Callable

from libvfm.errors import InvalidArgument
from libvfm.types import RoutePolicy

AUTO = "auto"


def add_spawn_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("routing (with --model auto)")
    g.add_argument("--quality", type=float, default=None, metavar="Q",
                   help="share 0..1 of the best allowed model's predicted quality an answer must "
                        "be predicted to reach; the cheapest such model answers (default 0.9)")
    g.add_argument("--max-cost-per-ask", type=float, default=0.0, metavar="X",
                   help="the most one Ask may cost (0 = no limit); --cost-budget, the process's "
                        "total, also caps each route at what is left of it")
    g.add_argument("--ttft-slo-ms", type=float, default=0.0, metavar="N",
                   help="only models predicted to give the first token within N ms")
    g.add_argument("--allow-models", default="", metavar="A,B",
                   help="the models the router may pick (default: every one it can predict)")
    g.add_argument("--cascade", type=float, default=0.0, metavar="CONF",
                   help="answer with the cheapest allowed model first (unseen) and escalate to "
                        "the router's choice when its confidence (geometric mean of token "
                        "probabilities, 0..1) is below CONF or a trust check fails it; both "
                        "answers are charged (default: no cascade)")
    g.add_argument("--cascade-rate", type=float, default=0.0, metavar="R",
                   help="a calibrated cascade: escalate about this share (0..0.5) of the "
                        "cheapest model's answers, the least sure of its recent ones for the "
                        "tenant by confidence and grounding (before 16 answers, --cascade "
                        "alone decides); bounds the extra cost to about R")


def policy_from_args(args) -> RoutePolicy:
    allowed = [m.strip() for m in args.allow_models.split(",") if m.strip()]
    routed = (args.quality is not None or args.max_cost_per_ask or args.ttft_slo_ms or allowed
              or args.cascade or args.cascade_rate)
    if args.model != AUTO:
        if routed:
            raise InvalidArgument("--quality, --max-cost-per-ask, --ttft-slo-ms, "
                                  "--allow-models and --cascade need --model auto")
        return RoutePolicy()
    quality = args.quality
    if quality is None:
        # A cost budget alone asks for the best model within it; otherwise 90% of the best.
        quality = 0.0 if (args.cost_budget or args.max_cost_per_ask) else 0.9
    return RoutePolicy(quality=quality, max_cost_per_ask=args.max_cost_per_ask,
                       ttft_slo_ms=args.ttft_slo_ms, allowed_models=allowed,
                       cascade_confidence=args.cascade, cascade_rate=args.cascade_rate)


def cmd_route(args, client_for: Callable, pid_of: Callable, show: Callable) -> int:
    with client_for(args) as client:
        found = client.explain_route(pid_of(client, args.pid), args.prompt)

    def table(e) -> None:
        print(f"{'model':<24} {'head':<7} {'quality':>7} {'cost':>10} {'ttft ms':>8}  note")
        for c in e.candidates:
            mark = "*" if c.model == e.model else " "
            print(f"{mark}{c.model:<23} {c.head:<7} {c.quality:>7.3f} {c.cost:>10.4g} "
                  f"{c.ttft_ms:>8.0f}  {c.note}")
        print(f"-> {e.model}: {e.reason}")
    show(args, found, table)
    return 0


def cmd_feedback(args, client_for: Callable, show: Callable) -> int:
    with client_for(args) as client:
        result = client.feedback(args.ask_id, args.rating == "up", args.note)
    show(args, result, lambda r: print(
        f"recorded (audit seq {r.audit_seq})" + (
            f"; the router holds {r.tenant_feedback} judgements of your tenant's answers"
            f"{', its correction is in use' if r.correction_active else ''}"
            if r.routed else "; the Ask was not routed, so no router learns from it")))
    return 0


def add_commands(add, client_for: Callable, pid_of: Callable, show: Callable,
                 common: Callable) -> None:
    p = add("route", lambda a: cmd_route(a, client_for, pid_of, show),
            "the router's view of a question (processes spawned with --model auto)")
    sub = p.add_subparsers(dest="route_cmd", metavar="ACTION", required=True)
    e = sub.add_parser("explain", help="each allowed model's predicted quality, cost and first "
                       "token, and the model an Ask would get; nothing is asked")
    e.add_argument("pid", help="pid (or process name)")
    e.add_argument("prompt")
    common(e)

    p = add("feedback", lambda a: cmd_feedback(a, client_for, show),
            "judge an answer by its ask id (printed after each answer): audited, and a routed "
            "Ask teaches your tenant's router")
    p.add_argument("ask_id")
    p.add_argument("rating", choices=("up", "down"))
    p.add_argument("--note", default="", help="why (kept in the audit record)")
