"""`python -m bench cascade`: answer knowledge-seeking support tickets through the real stack
(vfmd --trust on, vfm-datad with the KB ingested, vfm-modeld, vfm-trustd) three ways in the
same run: always the small model, always the large one, and the cascade (small first,
escalated on low confidence or a failed grounding check). For each: ROUGE-L of the answer to
the ticket's reference reply (the quality the goal is about: the grounding check drives the
cascade, so it cannot also judge it), the grounded-answer rate (the trust agent's grounding
check against the ticket's gold KB snippets, run in this process), tokens and cost per ticket.

Data: DIR/personas/support/kb_docs.jsonl.gz and tickets_kb_dev.jsonl.gz (DSTC11 track 5);
only tickets that need the KB (target true, with a reference response) are asked."""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from bench.common import report
from bench.stackutil import DaemonStack
from libvfm import AsyncClient, RoutePolicy, VfmError
from services.model.adapt import rouge_l

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL, LARGE = "smollm2-135m", "gemma3-270m"
COLLECTION = "kb"
SYSTEM = ("You are the customer service agent of a Cambridge booking service for hotels and "
          "restaurants. Reply to the customer's last message in one or two sentences, using "
          "only the facts below. Do not repeat the conversation.")
CONCURRENCY = 8


@dataclass
class Ticket:
    id: str
    prompt: str
    question: str
    reference: str
    gold: list[str]


@dataclass
class Outcome:
    answers: list[str] = field(default_factory=list)
    rouge: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    escalated: int = 0
    confidence: list[float] = field(default_factory=list)
    seconds: float = 0.0
    grounded: list[bool] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def mean(self, name: str) -> float:
        values = getattr(self, name)
        return sum(values) / len(values) if values else 0.0


def _read(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def kb_documents(docs: list[dict]) -> dict[str, str]:
    """One Markdown document per hotel or restaurant: its FAQs and reviews, each under a
    heading that names the place (a chunk then says whose facts it holds)."""
    parts: dict[str, list[str]] = defaultdict(list)
    for d in docs:
        name = d["entity_name"].title()
        head = f"# {name} ({d['domain']})"
        if not parts[head]:
            parts[head].append(head)
        if d["doc_type"] == "faq":
            parts[head].append(f"## {name}: {d['question']}\n{d['answer']}")
        else:
            review = " ".join(s["text"] for s in d.get("sentences") or [])
            parts[head].append(f"## {name}, a guest's review\n{review}")
    return {head.lstrip("# "): "\n\n".join(lines) for head, lines in parts.items()}


def gold_texts(docs: list[dict]) -> dict[str, str]:
    """The KB's text by key (`hotel/20/faq/3`, `hotel/20/review/9/4` for a review sentence)."""
    out = {}
    for d in docs:
        if d["doc_type"] == "faq":
            out[d["key"]] = f"{d['question']} {d['answer']}"
        else:
            sentences = {s["sent_id"]: s["text"] for s in d.get("sentences") or []}
            out[d["key"]] = " ".join(sentences.values())
            for n, sentence in sentences.items():
                out[f"{d['key']}/{n}"] = sentence
    return out


def load_tickets(data_dir: Path, limit: int, kb: dict[str, str],
                 skip: int = 0) -> list[Ticket]:
    rows = _read(data_dir / "personas" / "support" / "tickets_kb_dev.jsonl.gz")
    rows = sorted((r for r in rows if r.get("target") and r.get("response")),
                  key=lambda r: r["id"])
    tickets = []
    for r in rows[skip:skip + limit]:
        # The last exchange names the place asked about; more of the dialogue only made the
        # small models continue it instead of answering.
        turns = [f"{'Customer' if t['speaker'] == 'U' else 'Agent'}: {t['text']}"
                 for t in r["context"][-2:]]
        prompt = "\n".join([*turns, f"Customer: {r['question']}"])
        gold = [kb[k] for k in r.get("knowledge_keys", []) if kb.get(k)]
        tickets.append(Ticket(r["id"], prompt, r["question"], r["response"], gold))
    return tickets


async def ingest(client: AsyncClient, documents: dict[str, str]) -> int:
    await client.collection_create(COLLECTION, "hotel and restaurant FAQs and reviews")
    chunks = 0
    for n, (name, text) in enumerate(documents.items()):
        done = await client.ingest(COLLECTION, f"kb/{name}.md", text.encode(), kind="markdown")
        chunks += done.chunks
        if n % 25 == 0:
            print(f"  ingested {n + 1}/{len(documents)} places ({chunks} chunks)", flush=True)
    return chunks


async def run_config(client: AsyncClient, tickets: list[Ticket], model: str,
                     route: RoutePolicy | None, budget: int, max_new: int) -> Outcome:
    """Each ticket in a fresh process (no ticket sees another's exchange), 8 at a time."""
    n = len(tickets)
    out = Outcome(answers=[""] * n, tokens=[0] * n, cost=[0.0] * n, confidence=[0.0] * n)
    gate = asyncio.Semaphore(CONCURRENCY)
    started = time.perf_counter()

    async def one(i: int, t: Ticket) -> None:
        async with gate:
            pid = (await client.spawn(f"ticket-{t.id}", model=model, context_budget=budget,
                                      system_prompt=SYSTEM, collections=[COLLECTION],
                                      route=route)).pid
            try:
                result = await client.ask(pid, t.prompt, max_new_tokens=max_new)
            except VfmError as err:  # counted as a failed ticket (no answer), the run goes on
                out.failed.append(f"{t.id}: {err.message}")
                return
            finally:
                await client.kill(pid)
        u = result.usage
        out.answers[i], out.confidence[i] = result.text, u.confidence
        out.tokens[i], out.cost[i] = u.tokens_in + u.tokens_out, u.cost
        out.escalated += bool(u.escalated_from)
    await asyncio.gather(*(one(i, t) for i, t in enumerate(tickets)))
    out.seconds = time.perf_counter() - started
    out.rouge = [rouge_l(a, t.reference) for a, t in zip(out.answers, tickets)]
    return out


def judge_grounding(outcomes: dict[str, Outcome], tickets: list[Ticket]) -> None:
    """The trust agent's grounding check on each answer against the ticket's gold snippets."""
    from services.trust.grounding import GroundingCheck
    from vfmos_runtime.embed import load_embedder

    embedder = load_embedder()
    check = GroundingCheck(embedder.embed)
    threshold = check.combiner.threshold
    for outcome in outcomes.values():
        outcome.grounded = [check.check(a, t.gold, t.question).score < threshold
                            for a, t in zip(outcome.answers, tickets)]


def measure(args) -> tuple[dict[str, Outcome], int, float]:
    data_dir = Path(args.data_dir)
    docs = _read(data_dir / "personas" / "support" / "kb_docs.jsonl.gz")
    tickets = load_tickets(data_dir, args.tickets, gold_texts(docs))
    # Tickets after the measured ones, asked first through the cascade and not scored: a
    # calibrated cascade learns what its first model's usual confidence is on them.
    warmup = load_tickets(data_dir, args.warmup, gold_texts(docs), skip=args.tickets) \
        if args.rate else []
    # Started outside the event loop: the stack polls the kernel with the sync client.
    stack = DaemonStack({"vfm-datad": ["services.data.main", "--summary-pages", "0"],
                         "vfm-modeld": ["services.model.main"],
                         "vfm-trustd": ["services.trust.main"]},
                        kernel_args=("--trust", "on"), ready_timeout_s=600)
    try:
        outcomes, ingest_s = asyncio.run(_ask_all(stack, docs, tickets, warmup, args))
    finally:
        stack.close()
    judge_grounding(outcomes, tickets)
    return outcomes, len(tickets), ingest_s


async def _ask_all(stack: DaemonStack, docs: list[dict], tickets: list[Ticket],
                   warmup: list[Ticket], args) -> tuple[dict[str, Outcome], float]:
    client = AsyncClient(stack.sock, timeout=600)
    try:
        began = time.perf_counter()
        chunks = await ingest(client, kb_documents(docs))
        ingest_s = time.perf_counter() - began
        print(f"KB: {chunks} chunks in {ingest_s:.0f} s; {len(tickets)} tickets", flush=True)
        cascade = RoutePolicy(quality=0.0, allowed_models=[SMALL, LARGE],
                              cascade_confidence=args.confidence, cascade_rate=args.rate)
        if warmup:
            began = time.perf_counter()
            await run_config(client, warmup, "auto", cascade, args.budget, args.max_new_tokens)
            print(f"  calibration: {len(warmup)} other tickets through the cascade in "
                  f"{time.perf_counter() - began:.0f} s", flush=True)
        outcomes = {}
        for name, model, route in ((f"always {SMALL}", SMALL, None),
                                   (f"always {LARGE}", LARGE, None),
                                   ("cascade", "auto", cascade)):
            outcomes[name] = await run_config(client, tickets, model, route, args.budget,
                                              args.max_new_tokens)
            done = outcomes[name]
            print(f"  {name}: {done.seconds:.0f} s" + (f"; {len(done.failed)} failed, first: "
                                                      f"{done.failed[0]}" if done.failed else ""),
                  flush=True)
    finally:
        await client.close()
    return outcomes, ingest_s


def confidence_curve(small: Outcome, large: Outcome) -> list[tuple]:
    """What escalating on the small model's confidence alone would give, from the two
    always-runs (the small answer's cost is paid either way), beside escalating the same
    share of tickets at random (the straight line between the two)."""
    n = len(small.rouge)
    order = sorted(range(n), key=lambda i: small.confidence[i])
    rows = []
    for share in (0.0, 0.1, 0.2, 0.3, 0.5):
        k = round(share * n)
        up = set(order[:k])
        quality = sum(large.rouge[i] if i in up else small.rouge[i] for i in range(n)) / n
        cost = sum(small.cost[i] + (large.cost[i] if i in up else 0.0) for i in range(n)) / n
        random = small.mean("rouge") + k / n * (large.mean("rouge") - small.mean("rouge"))
        below = f"{small.confidence[order[k]]:.2f}" if k < n else "-"
        rows.append((f"{k}/{n}", below, f"{quality / large.mean('rouge'):.3f}",
                     f"{random / large.mean('rouge'):.3f}", f"{cost / large.mean('cost'):.3f}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench cascade", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA),
                   help="a directory laid out as ../shared/data (default: that)")
    p.add_argument("--quick", action="store_true", help="12 tickets")
    p.add_argument("--tickets", type=int, default=0, help="tickets to ask (default 32)")
    p.add_argument("--rate", type=float, default=0.08,
                   help="a calibrated cascade escalating about this share of answers, the "
                   "least sure (default 0.08: with the small model at about half the large "
                   "one's price, what the 60%% cost goal leaves); 0 = a fixed --confidence")
    p.add_argument("--confidence", type=float, default=0.0,
                   help="escalate below this confidence (with --rate: only before the "
                   "calibration has 16 answers; default 0)")
    p.add_argument("--warmup", type=int, default=16,
                   help="other tickets asked through the cascade first, unscored, to "
                   "calibrate it (default 16)")
    p.add_argument("--budget", type=int, default=384, help="working-set tokens (default 384)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    args.tickets = args.tickets or (12 if args.quick else 32)
    uvloop.install()
    outcomes, n, ingest_s = measure(args)
    large = outcomes[f"always {LARGE}"]
    rows = [(name, f"{o.mean('rouge'):.3f}", f"{o.mean('grounded'):.0%}",
             f"{o.mean('tokens'):.0f}", f"{o.mean('cost'):.3g}", f"{o.escalated}/{n}",
             f"{o.seconds:.0f}") for name, o in outcomes.items()]
    c = outcomes["cascade"]
    figures = {
        "cascade_quality_ratio": round(c.mean("rouge") / large.mean("rouge"), 3)
        if large.mean("rouge") else 0.0,
        "cascade_cost_ratio": round(c.mean("cost") / large.mean("cost"), 3)
        if large.mean("cost") else 0.0,
        "escalation_rate": round(c.escalated / n, 3) if n else 0.0, "tickets": n,
        "failed": sum(len(o.failed) for o in outcomes.values()),
        "confidence": args.confidence, "rate": args.rate,
        "warmup": args.warmup if args.rate else 0, "ingest_s": round(ingest_s, 1),
        **{f"{key}_rouge_l": round(o.mean("rouge"), 3) for key, o in
           zip(("small", "large", "cascade"), outcomes.values())},
        **{f"{key}_grounded": round(o.mean("grounded"), 3) for key, o in
           zip(("small", "large", "cascade"), outcomes.values())}}
    small = outcomes[f"always {SMALL}"]
    if large.mean("rouge") and large.mean("cost"):
        report("Escalating on the small model's confidence alone (from the two always-runs)",
               confidence_curve(small, large), ("escalated", "below conf", "quality ratio",
                                                "random's", "cost ratio"), None)
    report(f"Support tickets through the stack ({n} tickets needing the KB; ROUGE-L to the "
           "reference reply, grounding by the trust check on the gold snippets)", rows,
           ("config", "ROUGE-L", "grounded", "tokens/ticket", "cost/ticket", "escalated", "s"),
           figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
