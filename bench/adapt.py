"""`python -m bench adapt [--data-dir DIR] [--quick] [--train N] [--eval N] [--epochs E]`: distil
the support tenant's task into SmolLM2-135M with a LoRA adapter and score it against the
un-adapted small and large models, in one run.

The Bitext support requests (`personas/support/tickets_intent_dev.jsonl.gz`, 27 intents), with
duplicated requests dropped, are split by intent into a training part and a disjoint held-back
part. The adapter learns to answer "intent: <intent>" on the first line, then the reply (cut to
its first tokens, which keeps training on 2 cores short). The base and large models get the
same zero-shot system prompt: the intents, the format and one example of it that is not from
the data; the adapted model gets a one-line prompt, as it is served. Every answer is begun
with "intent:" for the model, which holds the zero-shot models to the format. Reported per model:
intent accuracy, ROUGE-L of the reply (after the intent line) to the reference response,
generation tokens/s and the registry's cost per token; then the training time and the
adapter's size."""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, cleanup, report
from services.model.adapt import (AdaptConfig, EvalResult, Exchange, evaluate, intent_prompt,
                                  intent_target, split, train_adapter)
from services.model.local import converted_dir
from services.model.registry import ModelRegistry
from vfmos_runtime.paths import cache_root

DEFAULT_DATA = REPO.parent / "shared" / "data"
TICKETS = Path("personas") / "support" / "tickets_intent_dev.jsonl.gz"
SMALL, LARGE = "smollm2-135m", "gemma3-270m"
SEED = 20261212
HELD_BACK = 0.3
ROLE = "a customer support assistant for an online shop"
# The format's one example: written here, not taken from the data.
EXAMPLE = ("Where is my parcel? I ordered it a week ago.", "track_order",
           "I'd be glad to help you find out where your order is. Could you share your order "
           "number so I can check its status for you?")
# Short: the adapter knows the task, and every token of it is paid in training and serving.
ADAPTED_PROMPT = "You are an online shop's support assistant: state the intent, then reply."
# Reply tokens trained on: the answers scored are the intent line and a few dozen tokens, and
# each longer target costs training time (540 exchanges, 2 epochs: about 10 min on 2 cores).
REPLY_TOKENS = 32
# Every model's answer starts with this, so a zero-shot model is held to the format and
# scored on the intent it picks (without it both base models mostly ignore the format).
ANSWER_PREFIX = "intent:"


def load_tickets(data_dir: Path) -> list[Exchange]:
    """The requests with their intent and reference response; a request seen before is dropped
    (a copy on each side of the split would be a leak)."""
    seen, out = set(), []
    with gzip.open(Path(data_dir) / TICKETS, "rt") as fh:
        for line in fh:
            row = json.loads(line)
            key = " ".join(row["instruction"].lower().split())
            if key not in seen:
                seen.add(key)
                out.append(Exchange(row["instruction"], row["response"], row["intent"]))
    return out


def subset(exchanges: list[Exchange], n: int, seed: int) -> list[Exchange]:
    """About n of them, stratified by intent (split's rounding per intent)."""
    if n >= len(exchanges):
        return exchanges
    return split(exchanges, n / len(exchanges), seed)[1]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench adapt",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                        help=f"folder holding {TICKETS} (default {DEFAULT_DATA})")
    parser.add_argument("--quick", action="store_true", help="train on a small slice, score fewer")
    parser.add_argument("--train", type=int, default=0,
                        help="training exchanges (default 540; quick 135)")
    parser.add_argument("--eval", type=int, default=0,
                        help="held-back exchanges (default 216; quick 54)")
    parser.add_argument("--epochs", type=int, default=0, help="epochs (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=0,
                        help="tokens generated per answer (default 32; quick 24)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    args.train = args.train or (135 if args.quick else 540)
    args.eval = args.eval or (54 if args.quick else 216)
    args.epochs = args.epochs or 2
    args.max_new_tokens = args.max_new_tokens or (24 if args.quick else 32)
    return args


def on_progress(every: float):
    """A progress callback that prints a line to stderr at each `every` of the job."""
    state = {"next": every}

    def show(fraction: float, message: str) -> None:
        if fraction + 1e-9 >= state["next"]:
            print(f"  train {fraction:4.0%}  {message}", file=sys.stderr, flush=True)
            state["next"] = fraction + every
    return show


def score(held: list[Exchange], intents: list[str],
          models: list[tuple[str, Path, Path | None, str]], max_new_tokens: int,
          threads: int) -> dict[str, EvalResult]:
    """Each (row name, model dir, adapter or None, system prompt) on the held-back exchanges."""
    runs = {}
    for name, model_dir, adapter, prompt in models:
        started = time.monotonic()
        runs[name] = evaluate(model_dir, adapter, held, prompt, intents, max_new_tokens,
                              threads=threads, assistant_prefix=ANSWER_PREFIX)
        print(f"  scored {name} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    tickets = load_tickets(args.data_dir)
    intents = sorted({t.label for t in tickets})
    pool, held = split(tickets, HELD_BACK, SEED)
    train = [Exchange(t.prompt, intent_target(t.label, t.reply), t.label)
             for t in subset(pool, args.train, SEED + 1)]
    held = subset(held, args.eval, SEED + 2)
    registry, cache = ModelRegistry.load(), cache_root()
    small, large = registry.get(SMALL), registry.get(LARGE)
    small_dir, large_dir = converted_dir(small, cache), converted_dir(large, cache)
    config = AdaptConfig(epochs=args.epochs, max_tokens=REPLY_TOKENS, seed=SEED,
                         threads=args.threads, system_prompt=ADAPTED_PROMPT)
    print(f"adapt: {len(train)} training and {len(held)} held-back exchanges, {len(intents)} "
          f"intents, {config.epochs} epochs", file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix="vfmadapt", dir="/tmp"))
    try:
        trained = train_adapter(small_dir, train, work / "adapter", config, on_progress(0.1))
        print(f"  trained in {trained.seconds / 60:.1f} min, loss {trained.epoch_losses}",
              file=sys.stderr, flush=True)
        zero_shot = intent_prompt(ROLE, intents, EXAMPLE)
        models = [(f"{SMALL} (base)", small_dir, None, zero_shot),
                  (f"{LARGE} (base)", large_dir, None, zero_shot),
                  (f"{SMALL} + LoRA", small_dir, work / "adapter", ADAPTED_PROMPT)]
        runs = score(held, intents, models, args.max_new_tokens, args.threads)
    finally:
        cleanup(work)
    costs = [small.cost_per_1k_tokens, large.cost_per_1k_tokens, small.cost_per_1k_tokens]
    rows = [(name, f"{r.intent_acc:.3f}", f"{r.rouge_l:.3f}", f"{r.tokens_per_s:.1f}",
             f"{cost / 1000:.2e}") for (name, r), cost in zip(runs.items(), costs)]
    base, big, adapted = runs.values()
    figures = {
        "base_intent_acc": round(base.intent_acc, 4), "large_intent_acc": round(big.intent_acc, 4),
        "adapted_intent_acc": round(adapted.intent_acc, 4),
        "base_rouge_l": round(base.rouge_l, 4), "large_rouge_l": round(big.rouge_l, 4),
        "adapted_rouge_l": round(adapted.rouge_l, 4),
        "train_minutes": round(trained.seconds / 60, 2),
        "adapter_mb": round(trained.adapter_bytes / 2**20, 2),
        "train_examples": len(train), "eval_examples": len(held),
    }
    report(f"adapt: held-back support requests ({len(held)}; answers cut at "
           f"{args.max_new_tokens} tokens); trained on {len(train)} in "
           f"{figures['train_minutes']} min, adapter {figures['adapter_mb']} MB",
           rows, ("model", "intent acc", "ROUGE-L", "tokens/s", "cost/token"), figures)
    return 0
