"""Stack bench: one FM process streaming through libvfm → vfmd → vfm-modeld vs the same model
called directly with transformers in this process (same prompt, same number of tokens)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import uvloop

from bench.common import report
from bench.stackutil import Stack, load_direct, story_prompts
from libvfm import AsyncClient
from libvfm.types import AskResult


async def _stack_run(socket, pid: int, prompt: str, tokens: int) -> tuple[int, float, float]:
    """(tokens, seconds, time to first token in ms) measured at the client."""
    client = AsyncClient(socket, timeout=600)
    start = time.perf_counter()
    first = None
    result = None
    async for item in client.ask_stream(pid, prompt, max_new_tokens=tokens):
        if isinstance(item, AskResult):
            result = item
        elif first is None:
            first = time.perf_counter()
    elapsed = time.perf_counter() - start
    await client.close()
    return result.usage.tokens_out, elapsed, (first - start) * 1000


@torch.inference_mode()
def _direct_run(model, tokenizer, prompt: str, tokens: int) -> tuple[int, float, float]:
    """Greedy decoding with a KV cache, exactly `tokens` new tokens, timed the same way."""
    from transformers import DynamicCache

    start = time.perf_counter()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=True, return_tensors="pt")["input_ids"]
    cache = DynamicCache()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    first = None
    for step in range(tokens):
        token = out.logits[0, -1].argmax()
        tokenizer.decode([int(token)])  # the text a caller would see
        if first is None:
            first = time.perf_counter()
        if step + 1 < tokens:
            out = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
    return tokens, time.perf_counter() - start, (first - start) * 1000


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench stack", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=0)
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    prompts = story_prompts(reps)  # a new question each time, as users ask
    runs = {}
    for label, flags in (("stack", ("--no-prefix-cache",)), ("stack, prefix reuse", ())):
        stack = Stack(modeld_args=flags)
        try:
            async def prepare():
                client = AsyncClient(stack.socket)
                pid = (await client.spawn("bench")).pid
                await client.ask(pid, "Hello there.", max_new_tokens=4)  # warm-up
                await client.close()
                return pid
            pid = uvloop.run(prepare())
            runs[label] = [uvloop.run(_stack_run(stack.socket, pid, p, args.tokens))
                           for p in prompts]
        finally:
            stack.close()  # the direct baseline must not share the cores with the daemons
    n = min(t for t, _, _ in runs["stack"])  # the same token count (an answer may end early)
    model, tokenizer = load_direct()
    _direct_run(model, tokenizer, "Hello there.", 4)  # warm-up
    runs["direct"] = [_direct_run(model, tokenizer, p, n) for p in prompts]
    tps = {k: statistics.median(t / s for t, s, _ in v) for k, v in runs.items()}
    ttft = {k: statistics.median(f for _, _, f in v) for k, v in runs.items()}
    figures = {"tps_ratio": round(tps["stack"] / tps["direct"], 3),
               "ttft_overhead_ms": round(ttft["stack"] - ttft["direct"], 1),
               "prefix_reuse_ttft_saving_ms": round(ttft["stack"] - ttft["stack, prefix reuse"], 1),
               "stack_tps": round(tps["stack"], 1), "direct_tps": round(tps["direct"], 1),
               "stack_ttft_ms": round(ttft["stack"], 1), "direct_ttft_ms": round(ttft["direct"], 1)}
    rows = [(k, f"{tps[k]:.1f}", f"{ttft[k]:.0f}") for k in runs]
    report(f"stack: one FM process, {n} new tokens, median of {reps} questions", rows,
           ("path", "tokens/s", "first token ms"), figures)
    return 0
