"""Batching bench: 8 FM processes asking at once through the stack, vs the same asks one at a
time (the fifo baseline) and vs raw batched transformers `generate` on the same prompts; then
the PyTorch engine in process serving a LoRA adapter against the same batch without one."""

from __future__ import annotations

import argparse
import asyncio
import time

import torch
import uvloop

from bench.common import report
from bench.stackutil import Stack, load_direct, story_prompts
from libvfm import AsyncClient


async def _through_stack(socket, prompts: list[str], tokens: int, concurrent: bool) -> tuple[int, float]:
    client = AsyncClient(socket, timeout=600)
    pids = [(await client.spawn(f"b{i}")).pid for i in range(len(prompts))]
    await client.ask(pids[0], "Hi.", max_new_tokens=2)  # warm-up
    start = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*(client.ask(pid, p, max_new_tokens=tokens)
                                         for pid, p in zip(pids, prompts)))
    else:
        results = [await client.ask(pid, p, max_new_tokens=tokens)
                   for pid, p in zip(pids, prompts)]
    elapsed = time.perf_counter() - start
    await client.close()
    return sum(r.usage.tokens_out for r in results), elapsed


@torch.inference_mode()
def _raw_batch(prompts: list[str], tokens: int) -> tuple[int, float]:
    model, tokenizer = load_direct()
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                           add_generation_prompt=True, tokenize=False)
             for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.generate(**tokenizer(texts[:1], return_tensors="pt"), max_new_tokens=2)  # warm-up
    start = time.perf_counter()
    out = model.generate(**batch, max_new_tokens=tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    elapsed = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1]:]
    eos = set(model.generation_config.eos_token_id if isinstance(
        model.generation_config.eos_token_id, list) else [model.generation_config.eos_token_id])
    produced = 0
    for row in new.tolist():
        for token in row:
            if token in eos:
                break
            produced += 1
    return produced, elapsed


def _library_batch(prompts: list[str], tokens: int) -> tuple[int, float]:
    """transformers' own continuous batching (paged attention), after one warm-up run.
    Not under inference_mode: its worker thread updates tensors in place."""
    import torch as _torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from services.model.local import converted_dir
    from vfmos_runtime.paths import cache_root
    from services.model.registry import ModelRegistry

    path = converted_dir(ModelRegistry.load().get(""), cache_root())
    _, tokenizer = load_direct()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch.float32,
                                                 attn_implementation="paged|sdpa").eval()
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                         add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"] for p in prompts]
    config = GenerationConfig(max_new_tokens=tokens, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    model.generate_batch(inputs=ids, generation_config=config)  # warm-up: it is much slower
    start = time.perf_counter()
    out = model.generate_batch(inputs=ids, generation_config=config)
    produced = sum(len(r.generated_tokens) for r in out.values())
    if not produced:
        raise RuntimeError("generate_batch produced nothing (see its log above)")
    return produced, time.perf_counter() - start


SYSTEM_PROMPT = (
    "You are a research assistant running as a process of an operating system for foundation "
    "models. You answer questions from other programs. Follow these rules. Answer in plain "
    "English without markup. State facts you are sure of and say so when you are not. Prefer "
    "short paragraphs. When a question is ambiguous, answer the most likely reading and name "
    "the other. Never invent citations, numbers, names or dates. When asked for code, give a "
    "complete function with a one-line explanation. Keep units explicit and use the metric "
    "system. If a question asks for a list, give at most seven items, most important first. "
    "If a question is outside your knowledge, say what you would need to answer it. Do not "
    "repeat the question. Do not apologise. Do not mention these rules. The current project "
    "is a survey of coastal lighthouses, their keepers, and the ships they guided, written "
    "for a museum audience of curious adults and older children.")


def _prefix_saving(prompts: list[str]) -> dict[str, float]:
    """Prefill time per ask for asks sharing a long system prompt, with and without prefix
    reuse, one at a time and arriving together (in process: prefill is engine-internal)."""
    from vfmos_runtime.paths import cache_root
    from services.model.registry import ModelRegistry
    from services.model.service import ModelService
    from services.model.types import GenParams

    async def ask(service, system: str, prompt: str) -> int:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        pieces = [p async for p in service.generate("", messages, GenParams(max_new_tokens=1))]
        return pieces[-1].prompt_tokens

    async def measure(reuse: bool) -> tuple[float, float, int]:
        service = ModelService(ModelRegistry.load(), cache_root(), max_batch=len(prompts),
                               prefix_cache_mb=256 if reuse else 0)
        try:
            await ask(service, SYSTEM_PROMPT, "Hi.")  # load, warm up, and see the prompt once
            stats = service.backend("").engine.stats
            spent = stats.prefill_seconds
            for prompt in prompts:
                prompt_tokens = await ask(service, SYSTEM_PROMPT, prompt)
            alone = (stats.prefill_seconds - spent) / len(prompts)
            spent = stats.prefill_seconds
            # A system prompt the cache has not seen: computed once for the arrivals.
            await asyncio.gather(*(ask(service, "Today: " + SYSTEM_PROMPT, p) for p in prompts))
            together = (stats.prefill_seconds - spent) / len(prompts)
            return alone, together, prompt_tokens
        finally:
            service.stop()

    (alone, together, n), (alone0, together0, _) = (uvloop.run(measure(r)) for r in (True, False))
    print(f"prefill per ask, {len(prompts)} asks with one system prompt ({n} prompt tokens), "
          "without / with prefix reuse:")
    print(f"  one at a time: {alone0 * 1000:.0f} / {alone * 1000:.0f} ms")
    print(f"  together:      {together0 * 1000:.0f} / {together * 1000:.0f} ms")
    return {"prefill_ms_no_reuse": round(alone0 * 1000, 1),
            "prefill_ms_prefix_reuse": round(alone * 1000, 1),
            "prefill_ms_together_no_reuse": round(together0 * 1000, 1),
            "prefill_ms_together_prefix_reuse": round(together * 1000, 1),
            "prefix_saving": round(1 - alone / alone0, 3)}


def _adapter_runs(prompts: list[str], tokens: int) -> list[tuple[str, tuple[int, float]]]:
    """The PyTorch engine serving a LoRA adapter (a randomly initialised rank-16 one on every
    linear layer: its values do not change the cost). Adapters are grouped, not mixed: each
    is merged into its own copy of the base and runs its own engine, so a batch of one
    adapter costs what the base costs, and rows of two models share the cores, not a batch."""
    import tempfile
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    from services.model.adapters import AdapterRecord
    from services.model.local import converted_dir
    from services.model.registry import ModelRegistry
    from services.model.service import ModelService
    from services.model.types import GenParams
    from vfmos_runtime.paths import cache_root

    registry = ModelRegistry.load()
    base = registry.get("")
    base_dir = converted_dir(base, cache_root())
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_direct()
        lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj"])
        get_peft_model(model, lora).save_pretrained(tmp)
        del model
        registry.add(AdapterRecord("bench-adapter", "bench", base.name, tmp, False, 0, 0)
                     .entry(base, Path(base_dir)))

        async def batch(models: list[str]) -> tuple[int, float]:
            async def one(model: str, prompt: str) -> int:
                chat = [{"role": "user", "content": prompt}]
                pieces = [p async for p in service.generate(
                    model, chat, GenParams(max_new_tokens=tokens), tenant="bench")]
                return pieces[-1].completion_tokens
            start = time.perf_counter()
            made = await asyncio.gather(*(one(m, p) for m, p in zip(models, prompts)))
            return sum(made), time.perf_counter() - start

        async def measure() -> list[tuple[str, tuple[int, float]]]:
            n = len(prompts)
            for name in (base.name, "bench-adapter"):  # load and warm up both engines
                await batch([name] * 2)
            return [(f"engine, batch of {n}, no adapter", await batch([base.name] * n)),
                    (f"engine, batch of {n}, one adapter", await batch(["bench-adapter"] * n)),
                    (f"engine, {n // 2} base + {n - n // 2} adapter at once",
                     await batch([base.name] * (n // 2) + ["bench-adapter"] * (n - n // 2)))]

        # Adapters are served by the PyTorch engine: the base on the same engine is the
        # baseline that says what an adapter costs.
        service = ModelService(registry, cache_root(), max_batch=len(prompts), engine="torch")
        try:
            return uvloop.run(measure())
        finally:
            service.stop()


def _median(runs: list[tuple[int, float]]) -> tuple[int, float]:
    """The run with the median rate: one 5-second sample is at the mercy of the machine."""
    return sorted(runs, key=lambda r: r[0] / r[1])[len(runs) // 2]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench batching", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer new tokens")
    parser.add_argument("--tokens", type=int, default=0, help="new tokens per ask (default 64)")
    parser.add_argument("--procs", type=int, default=8, help="FM processes asking at once")
    parser.add_argument("--reps", type=int, default=0,
                        help="repetitions of the batched runs (median; default 3, quick 1)")
    parser.add_argument("--no-adapter", action="store_true",
                        help="skip the rows of the engine serving a LoRA adapter")
    parser.add_argument("--no-library", action="store_true",
                        help="skip transformers' own continuous batching (generate_batch)")
    args = parser.parse_args(argv)
    tokens = args.tokens or (32 if args.quick else 64)
    reps = args.reps or (1 if args.quick else 3)
    prompts = story_prompts(args.procs)
    stack = Stack()
    try:
        batched = _median([uvloop.run(_through_stack(stack.socket, prompts, tokens, True))
                           for _ in range(reps)])
        sequential = uvloop.run(_through_stack(stack.socket, prompts, tokens, concurrent=False))
    finally:
        stack.close()  # the raw baseline must not share the cores with the daemons
    raw = _median([_raw_batch(prompts, tokens) for _ in range(reps)])
    runs = [("stack, 8 at once", batched), ("stack, one at a time", sequential),
            ("raw generate, batch of 8", raw)]
    if not args.no_library:
        runs.append(("transformers generate_batch", _library_batch(prompts, tokens)))
    saving = _prefix_saving(prompts)
    adapter = [] if args.no_adapter else _adapter_runs(prompts, tokens)
    runs += adapter
    rate = {name: n / t for name, (n, t) in runs}
    ours = rate["stack, 8 at once"]
    figures = {"ratio_vs_sequential": round(ours / rate["stack, one at a time"], 3),
               "ratio_vs_raw_batch": round(ours / rate["raw generate, batch of 8"], 3),
               "tokens_per_s": round(ours, 1),
               "sequential_tokens_per_s": round(rate["stack, one at a time"], 1),
               "raw_batch_tokens_per_s": round(rate["raw generate, batch of 8"], 1)}
    if "transformers generate_batch" in rate:
        figures["library_cb_tokens_per_s"] = round(rate["transformers generate_batch"], 1)
    figures.update(saving)
    if adapter:
        (_, plain), (_, adapted), (_, mixed) = adapter
        figures["adapter_tokens_per_s"] = round(adapted[0] / adapted[1], 1)
        figures["adapter_ratio_vs_no_adapter"] = round(
            (adapted[0] / adapted[1]) / (plain[0] / plain[1]), 3)
        figures["mixed_ratio_vs_no_adapter"] = round(
            (mixed[0] / mixed[1]) / (plain[0] / plain[1]), 3)
    rows = [(name, n, f"{t:.2f}", f"{n / t:.1f}") for name, (n, t) in runs]
    report(f"batching: {args.procs} FM processes, {tokens} new tokens each, SmolLM2 (the "
           "stack and prefix rows on vfm-modeld's default llama.cpp engine; raw generate and "
           f"the adapter rows on PyTorch fp32), median of {reps}",
           rows, ("run", "tokens", "seconds", "tokens/s"), figures)
    return 0
