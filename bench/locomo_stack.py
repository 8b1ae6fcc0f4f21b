"""`python -m bench locomo`: LoCoMo evidence recall of working sets built by the real stack.

For each conversation: spawn an FM process, remember every turn through libvfm (speaker,
text and photo caption, session date, dia_id as metadata), then for each category 1-4
question ask the kernel for the working set at the budget (`Context`, paged in as an Ask
does) and check whether the question's evidence turns are in it. The recency window and
plain dense top-k are measured in the same run on the same turns and token counts.
`--offline` runs only the in-process ranking (bench/locomo.py), for quick method work."""

from __future__ import annotations

import argparse
import os
import time

import uvloop

from bench.common import cleanup, percentile, report, spawn_daemon, stop, temp_state_dir, \
    wait_until
from bench.stackutil import services_serving
from bench.locomo import (DEFAULT_DATA, Baselines, Conversation, Report, build_entries,
                          embed_cached, evaluate, load_conversations, score, scored_questions)
from libvfm import AsyncClient
from libvfm.types import MemoryEntry

BATCH = 100


class DataStack:
    """vfmd + vfm-datad in a temp dir (no model service: working sets need none)."""

    def __init__(self):
        self.state = temp_state_dir()
        os.chmod(self.state, 0o755)
        self.socket = self.state / "vfmd.sock"
        self.kernel = spawn_daemon(["-m", "kernel.main", "--state-dir", str(self.state),
                                    "--log-level", "WARNING"], self.state / "vfmd.log")
        self.datad = spawn_daemon(["-m", "services.data.main", "--state-dir", str(self.state),
                                   "--kernel-socket", str(self.socket), "--summary-pages", "0",
                                   "--log-level", "WARNING"], self.state / "datad.log")
        wait_until(lambda: services_serving(self.socket, ("vfm-datad",)), 300, "vfm-datad to serve")

    def close(self) -> None:
        stop(self.datad)
        stop(self.kernel)
        cleanup(self.state)


async def _conversation(client: AsyncClient, conv: Conversation, budget: int,
                        report_: Report, pagein_ms: list[float], remember_s: list[float]) -> None:
    pid = (await client.spawn(f"locomo-{conv.sample_id}", context_budget=budget)).pid
    started = time.perf_counter()
    entries = [MemoryEntry(text=t["text"], speaker=t["speaker"],
                           time=t["time"].timestamp() if t["time"] else 0.0,
                           meta={"dia_id": t["dia_id"]}) for t in conv.turns]
    for start in range(0, len(entries), BATCH):
        await client.remember(pid, entries[start:start + BATCH])
    remember_s.append(time.perf_counter() - started)
    now = conv.now.timestamp() if conv.now else 0.0
    for q in scored_questions(conv):
        started = time.perf_counter()
        ws = await client.context(pid, q.question, now=now, touch=True)
        pagein_ms.append((time.perf_counter() - started) * 1000)
        ids = [i.meta["dia_id"] for i in ws.items if "dia_id" in i.meta]
        report_.add("vfmos", q.category, score(ids, q.evidence), ws.used, pagein_ms[-1])


def _baselines(conversations: list[Conversation], budget: int, report_: Report) -> None:
    """Recency window and plain dense top-k on the same turns, packed the same way."""
    from transformers import AutoTokenizer

    from bench.locomo import TOKENIZER_DIR
    from vfmos_runtime.embed import load_embedder

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    embedder = load_embedder()
    for conv in conversations:
        entries = build_entries(conv, tokenizer)
        base = Baselines(entries, embed_cached(embedder, [e.text for e in entries]))
        qvs = embed_cached(embedder, [q.question for q in scored_questions(conv)])
        evaluate(conv, entries, {"recency": base.recency, "dense": base.dense}, report_,
                 budget, qvs)


def run(conversations: list[Conversation], budget: int) -> tuple[Report, dict]:
    report_, pagein, remember_s = Report(), [], []
    stack = DataStack()
    try:
        async def go():
            async with AsyncClient(stack.socket, timeout=120) as client:
                for conv in conversations:
                    await _conversation(client, conv, budget, report_, pagein, remember_s)
        uvloop.run(go())
    finally:
        stack.close()
    _baselines(conversations, budget, report_)
    turns = sum(len(c.turns) for c in conversations)
    extra = {"pagein_p50_ms": round(percentile(pagein, 50), 2),
             "pagein_p95_ms": round(percentile(pagein, 95), 2),
             "remember_turns_per_s": round(turns / max(sum(remember_s), 1e-9), 1),
             "turns_mean": round(turns / max(len(conversations), 1), 1)}
    return report_, extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench locomo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a LoCoMo-format JSON file")
    parser.add_argument("--budget", type=int, default=1024, help="working-set tokens")
    parser.add_argument("--quick", action="store_true", help="the first 2 conversations only")
    parser.add_argument("--offline", action="store_true",
                        help="rank in this process only (no daemons): bench/locomo.py")
    args = parser.parse_args(argv)
    if args.offline:
        from bench import locomo

        return locomo.main([a for a in (argv or []) if a != "--offline"])
    conversations = load_conversations(args.data)[: 2 if args.quick else None]
    report_, extra = run(conversations, args.budget)
    figures = report_.figures("vfmos", {"recency": "recency", "dense": "dense"})
    figures.update(extra)
    report(f"LoCoMo evidence recall at {args.budget} tokens through vfmd + vfm-datad, "
           f"categories 1-4 ({len(conversations)} conversations, "
           f"{extra['turns_mean']:.0f} turns each on average)", report_.rows(), Report.HEADER,
           figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
