"""`python -m services.model.adapt_job SPEC.json`: one adapter job in its own process: split the
exchanges, score the base on the held-back part, train the LoRA, score the adapted model;
progress and then the result go to stdout as JSON lines (vfm-modeld reads them)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from services.model.adapt import AdaptConfig, Exchange, evaluate, split, train_adapter

QUICK_EPOCHS = 1
EVAL_TOKENS = 64        # of each held-back reply (quick: 24, a first look)
QUICK_EVAL_TOKENS = 24


def say(**event) -> None:
    print(json.dumps(event), flush=True)


def run(spec: dict, threads: int) -> dict:
    exchanges = [Exchange(e["prompt"], e["reply"]) for e in spec["exchanges"]]
    train, held = split(exchanges, spec["held_back"], seed=0)
    if not train or not held:
        return {"error": f"{len(exchanges)} exchanges cannot be split into a training and a "
                         "held-back part"}
    config = AdaptConfig(threads=threads, system_prompt=spec["system_prompt"],
                         **({"epochs": QUICK_EPOCHS} if spec["quick"] else {}))
    config = dataclasses.replace(config, **spec.get("overrides", {}))
    base_dir, out = Path(spec["base_dir"]), Path(spec["out_dir"])
    tokens = QUICK_EVAL_TOKENS if spec["quick"] else EVAL_TOKENS
    say(progress=0.02, message=f"scoring the base on {len(held)} held-back exchanges")
    base = evaluate(base_dir, None, held, spec["system_prompt"], max_new_tokens=tokens,
                    threads=threads)
    trained = train_adapter(base_dir, train, out, config,
                            lambda share, text: say(progress=0.05 + 0.85 * share, message=text))
    say(progress=0.92, message="scoring the adapted model on the held-back exchanges")
    adapted = evaluate(base_dir, out, held, spec["system_prompt"], max_new_tokens=tokens,
                       threads=threads)
    return {"base_quality": base.rouge_l, "adapted_quality": adapted.rouge_l,
            "train_exchanges": len(train), "held_back": len(held),
            "train_seconds": trained.seconds, "adapter_bytes": trained.adapter_bytes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.model.adapt_job", description=__doc__)
    p.add_argument("spec", type=Path)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    try:
        result = run(json.loads(args.spec.read_text()), args.threads)
    except Exception as exc:  # reported as the job's error, in one line
        result = {"error": f"{type(exc).__name__}: {exc}"}
    say(**result)
    return 0 if not result.get("error") else 1


if __name__ == "__main__":
    sys.exit(main())
