"""vfmctl commands of models and adapters: `model list`, `model adapt`, `model jobs`."""

from __future__ import annotations

import time
from typing import Callable

from libvfm.errors import InvalidArgument


def _list(models) -> None:
    print(f"{'model':<24} {'backend':<12} {'engine':<10} {'price/1k':>9} {'loaded':<6}  adapter")
    for m in models:
        adapter = ""
        if m.base:
            adapter = (f"{m.status} on {m.base} for {m.tenant}: ROUGE-L {m.quality:.3f} "
                       f"(base {m.base_quality:.3f}) on held-back exchanges")
        default = " (default)" if m.is_default else ""
        engine = m.engine or ("-" if m.backend == "openai" else "(on load)")
        print(f"{m.name + default:<24} {m.backend:<12} {engine:<10} {m.cost_per_1k_tokens:>9.4g} "
              f"{'yes' if m.loaded else 'no':<6}  {adapter}")


def _jobs(jobs) -> None:
    if not jobs:
        print("no adapter jobs")
        return
    print(f"{'job':<13} {'adapter':<20} {'state':<8} {'done':>5}  detail")
    for j in jobs:
        if j.state == "done":
            detail = (f"{'promoted' if j.promoted else 'candidate'}: ROUGE-L "
                      f"{j.adapted_quality:.3f} vs base {j.base_quality:.3f} on {j.held_back} "
                      f"held-back; {j.train_exchanges} trained in {j.train_seconds:.0f} s")
        elif j.state == "failed":
            detail = j.error
        else:
            detail = j.message
        print(f"{j.id:<13} {j.name:<20} {j.state:<8} {j.progress:>5.0%}  {detail}")


def cmd_model(args, client_for: Callable, show: Callable, say: Callable) -> int:
    with client_for(args) as client:
        if args.model_cmd == "list":
            show(args, client.models(), _list)
        elif args.model_cmd == "jobs":
            show(args, client.model_jobs(), _jobs)
        else:
            if not args.from_tenant_log:
                raise InvalidArgument("say where the exchanges come from: --from-tenant-log "
                                      "(the only source so far)")
            job = client.adapt(args.name, base=args.base, teacher=args.teacher,
                               system_prompt=args.system_prompt, quick=args.quick)
            if not args.wait:
                show(args, job, lambda j: print(
                    f"job {j.id} {j.state}: follow it with `vfmctl model jobs`"))
                return 0
            while job.state in ("queued", "running"):
                say(f"[{job.state} {job.progress:.0%}: {job.message}]")
                time.sleep(2)
                job = next(j for j in client.model_jobs() if j.id == job.id)
            show(args, job, lambda j: _jobs([j]))
            return 0 if job.state == "done" else 1
    return 0


def add_commands(add, client_for: Callable, show: Callable, say: Callable,
                 common: Callable) -> None:
    p = add("model", lambda a: cmd_model(a, client_for, show, say),
            "physical models and your tenant's adapters")
    sub = p.add_subparsers(dest="model_cmd", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="models a process may name, the engine serving "
                             "each (llama.cpp or torch, once loaded) and each adapter's "
                             "measured quality on held-back exchanges")
    jobs = sub.add_parser("jobs", help="adapter jobs and their progress, newest first")
    a = sub.add_parser("adapt", help="train a LoRA adapter (in the background) from your "
                       "tenant's logged exchanges that the teacher answered and trust allowed; "
                       "it is promoted only if it beats its base on held-back exchanges")
    a.add_argument("name", help="the adapter's model name")
    a.add_argument("--from-tenant-log", action="store_true",
                   help="learn from the tenant's audit log (needs audit.store_text: true in "
                        "the tenant's trust policy)")
    a.add_argument("--base", default="", help="the model to adapt (default: smollm2-135m)")
    a.add_argument("--teacher", default="", help="whose answers to learn (default: gemma3-270m)")
    a.add_argument("--system-prompt", default="",
                   help="the system prompt the adapter is trained under (spawn with the same)")
    a.add_argument("--quick", action="store_true", help="one epoch: a first look")
    a.add_argument("--wait", action="store_true", help="follow the job until it ends")
    for action in (listing, jobs, a):
        common(action)
