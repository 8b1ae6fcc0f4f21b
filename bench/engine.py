"""`python -m bench engine`: the local engines on the packaged SmolLM2 GGUF, same prompts, same
machine, same run: (a) llama.cpp used directly through its low-level API (the anchor: what a
CPU user would pick instead), (b) today's PyTorch engine (the GGUF dequantized to fp32), (c)
the llama.cpp engine of vfm-modeld, both in process and through vfmd.

Figures: single-stream decode tokens/s (64 new tokens, greedy), 8-way aggregate tokens/s
(8 different prompts decoded together: llama.cpp with one sequence id each), prefill time of
256- and 1,000-token prompts (time to first token in the engine, prefix reuse off), and the
first token and decode rate through the whole stack (vfmctl's path: libvfm → vfmd →
vfm-modeld)."""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import time
from pathlib import Path

import numpy as np
import uvloop

from bench.common import report
from bench.stackutil import Stack, story_prompts
from libvfm import AsyncClient

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NEW_TOKENS = 64
SUMMARISE = "Summarise this text in one sentence:\n"


def _entry_and_gguf():
    from services.model.local import gguf_file
    from services.model.registry import ModelRegistry
    from vfmos_runtime.paths import cache_root

    entry = ModelRegistry.load().get("")
    return entry, gguf_file(entry, cache_root())


def long_text(data_dir: Path) -> str:
    """Plain English to cut prompts from: the support KB's FAQ answers (any text would do)."""
    path = data_dir / "personas" / "support" / "kb_docs.jsonl.gz"
    if not path.exists():
        return " ".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog."
                        for i in range(400))
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    return " ".join(f"{r['question']} {r['answer']}" for r in rows if r.get("doc_type") == "faq")


class Prompts:
    """Chat prompts as token ids, from the model's own tokenizer and template."""

    def __init__(self, tokenizer, text: str):
        self.tokenizer = tokenizer
        self.words = tokenizer.encode(text, add_special_tokens=False)

    def chat(self, content: str) -> list[int]:
        return list(self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True,
            return_dict=True)["input_ids"])

    def of_length(self, n: int, offset: int = 0) -> list[int]:
        """A question about a passage, `n` tokens in all."""
        head = self.chat(SUMMARISE)
        body = self.words[offset:offset + max(1, n - len(head))]
        ids = self.chat(SUMMARISE + self.tokenizer.decode(body))
        return ids[:n - 5] + ids[-5:] if len(ids) > n else ids


# ---- (a) llama.cpp directly ----------------------------------------------------------------
class LlamaDirect:
    """llama.cpp as a user of its API would drive it: one context, greedy, a sequence id per
    stream, its default batch sizes."""

    def __init__(self, path: Path, threads: int):
        from services.model.llama_engine import llama_cpp, model_params

        lib = self.lib = llama_cpp()
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(str(path).encode(),
                                                    model_params(lib))
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_seq_max = 8 * 2048, 8  # 2,048 tokens a sequence
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, params)
        self.n_batch = lib.llama_n_batch(self.ctx)
        self.mem = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.vocab = lib.llama_model_get_vocab(self.model)

    def _decode(self, parts: list[tuple[int, int, list[int]]]) -> None:
        """parts: (sequence, first position, tokens); logits on each part's last token."""
        b, n = self.batch, 0
        for seq, start, tokens in parts:
            for k, token in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0] = token, start + k, 1, seq
                b.logits[n] = int(k == len(tokens) - 1)
                n += 1
        b.n_tokens = n
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i),
                                       shape=(self.n_vocab,))
        return int(logits.argmax())

    def prefill(self, ids: list[int], seq: int = 0) -> int:
        for at in range(0, len(ids), self.n_batch):
            self._decode([(seq, at, ids[at:at + self.n_batch])])
        return self._argmax(-1)

    def greedy(self, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float]:
        """Each prompt its own sequence, decoded together; (tokens per prompt, decode s)."""
        self.lib.llama_memory_clear(self.mem, True)
        nexts = [self.prefill(ids, seq) for seq, ids in enumerate(prompts)]
        out = [[t] for t in nexts]
        live = [not self.lib.llama_vocab_is_eog(self.vocab, t) for t in nexts]
        started = time.perf_counter()
        for step in range(new - 1):
            rows = [s for s in range(len(prompts)) if live[s]]
            if not rows:
                break
            self._decode([(s, len(prompts[s]) + step, [out[s][-1]]) for s in rows])
            for i, s in enumerate(rows):
                token = self._argmax(i)
                out[s].append(token)
                live[s] = not self.lib.llama_vocab_is_eog(self.vocab, token)
        return out, time.perf_counter() - started

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


# ---- (b), (c) the engines of vfm-modeld, in process ---------------------------------------
class Served:
    """A local model in this process as vfm-modeld serves it (engine "torch" or
    "llama.cpp"), driven through the backend's generate()."""

    def __init__(self, engine: str, threads: int, max_batch: int):
        from services.model.local import LocalBackend
        from vfmos_runtime.paths import cache_root

        entry, _ = _entry_and_gguf()
        self.backend = LocalBackend(entry, cache_root(), threads, max_batch,
                                    prefix_cache_mb=0, engine=engine)
        self.backend.start()
        asyncio.run(self.backend.wait_loaded())
        self.engine = self.backend.engine_name

    async def _one(self, ids: list[int], new: int) -> tuple[float, float, int]:
        """(first token s, decode s after it, tokens)."""
        from services.model.types import GenParams
        from services.model.batch import Job

        loop, out = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(ids, GenParams(max_new_tokens=new),
                  lambda item: loop.call_soon_threadsafe(out.put_nowait, item))
        started = time.perf_counter()
        self.backend._jobs.put(job)
        first, tokens = 0.0, 0
        while True:
            piece = await out.get()
            if isinstance(piece, Exception):
                raise piece
            if piece.tokens and not first:
                first = time.perf_counter()
            tokens += piece.tokens
            if piece.done:
                return first - started, time.perf_counter() - first, tokens

    def run(self, prompts: list[list[int]], new: int) -> list[tuple[float, float, int]]:
        async def together():
            return await asyncio.gather(*(self._one(p, new) for p in prompts))
        return asyncio.run(together())

    def close(self) -> None:
        self.backend.stop()


def measure_direct(name: str, prompts8: list[list[int]], long: dict[int, list[int]],
                   make, runs: int) -> dict:
    """Single-stream decode (after its first token), 8-way aggregate (whole run incl.
    prefill, as the user waits for it), and prefill times, best of `runs`."""
    subject = make()
    try:
        subject.run([prompts8[0][:8]], 2)  # warm-up
        single = []
        for _ in range(runs):
            (first, decode, tokens), = subject.run([prompts8[0]], NEW_TOKENS)
            single.append((tokens - 1) / decode)
        batch8 = []
        for _ in range(runs):
            started = time.perf_counter()
            done = subject.run(prompts8, NEW_TOKENS)
            batch8.append(sum(r[2] for r in done) / (time.perf_counter() - started))
        prefill = {n: min(subject.run([ids], 1)[0][0] for _ in range(runs))
                   for n, ids in long.items()}
    finally:
        subject.close()
    figures = {"single": max(single), "batch8": max(batch8),
               **{f"prefill_{n}": prefill[n] for n in long}}
    return figures


class _LlamaAsSubject:
    """LlamaDirect with the Served interface: run(prompts, new) -> [(first, decode, n)]."""

    def __init__(self, path: Path, threads: int):
        self.llama = LlamaDirect(path, threads)

    def run(self, prompts: list[list[int]], new: int):
        lib = self.llama.lib
        lib.llama_memory_clear(self.llama.mem, True)
        started = time.perf_counter()
        if len(prompts) == 1:
            self.llama.prefill(prompts[0])
            first = time.perf_counter() - started
            if new == 1:
                return [(first, 0.0, 1)]
            out, decode = self.llama.greedy(prompts, new)
            return [(first, decode, len(out[0]))]
        out, decode = self.llama.greedy(prompts, new)
        first = time.perf_counter() - started - decode
        return [(first, decode, len(o)) for o in out]

    def close(self) -> None:
        self.llama.close()


async def _through_stack(socket: Path, prompt: str, long_prompt: str, runs: int) -> dict:
    """Streamed Asks through vfmd, each in a fresh process (no history, no reused prefix):
    the decode rate after the first token, and the first token of a 1,000-token prompt."""
    from libvfm import AskResult

    client = AsyncClient(socket, timeout=600)

    async def ask(n: int, text: str, new: int) -> tuple[float, float, int]:
        pid = (await client.spawn(f"engine-bench-{n}", context_budget=4096)).pid
        started, first, tokens = time.perf_counter(), 0.0, 0
        try:
            async for item in client.ask_stream(pid, text, max_new_tokens=new):
                if isinstance(item, AskResult):
                    tokens = item.usage.tokens_out
                elif item and not first:
                    first = time.perf_counter()
        finally:
            await client.kill(pid)
        return first - started, time.perf_counter() - first, tokens

    try:
        await ask(0, "Hi.", 2)  # warm-up
        rates, firsts = [], []
        for i in range(runs):
            _, decode, tokens = await ask(2 * i + 1, prompt, NEW_TOKENS)
            rates.append((tokens - 1) / decode)
            firsts.append((await ask(2 * i + 2, long_prompt, 1))[0])
        return {"stack_single": max(rates), "stack_ttft_1000": min(firsts)}
    finally:
        await client.close()


def through_stack(engine: str, prompt: str, long_prompt: str, runs: int) -> dict:
    stack = Stack(modeld_args=("--engine", engine, "--no-prefix-cache"))
    try:
        return asyncio.run(_through_stack(stack.socket, prompt, long_prompt, runs))
    finally:
        stack.close()


SUBJECTS = {"llama.cpp": "llama.cpp direct", "torch": "PyTorch engine",
            "new": "llama.cpp engine"}


def _subject(name: str, threads: int):
    if name == "llama.cpp":
        return lambda: _LlamaAsSubject(_entry_and_gguf()[1], threads)
    return lambda: Served("llama.cpp" if name == "new" else "torch", threads, 8)


def _measure_in_child(name: str, args, threads: int, runs: int) -> dict:
    """Each engine in a process of its own, as vfm-modeld runs one: in one process, the
    threads one engine leaves spinning slow the next one down."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "bench.engine", "--measure", name, "--threads",
               str(threads), "--runs", str(runs), "--data-dir", args.data_dir]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"measuring {name} failed:\n{done.stderr[-3000:]}")
    print(f"  {SUBJECTS[name]}: " + ", ".join(f"{k} {v:.3g}" for k, v in
                                               json.loads(lines[-1]).items()), flush=True)
    return json.loads(lines[-1])


def _setup(args):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    entry, path = _entry_and_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    prompts = Prompts(tokenizer, long_text(Path(args.data_dir)))
    stories = story_prompts(8)
    prompts8 = [prompts.chat(s) for s in stories]
    long = {n: prompts.of_length(n, offset=n) for n in (256, 1000)}
    return path, tokenizer, stories, prompts8, long


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one run of each figure, no stack")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA),
                   help="a directory laid out as ../shared/data (text for the long prompts)")
    p.add_argument("--threads", type=int, default=0, help="threads (default: all cores)")
    p.add_argument("--runs", type=int, default=0, help="runs of each figure (default 3)")
    p.add_argument("--measure", choices=tuple(SUBJECTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    uvloop.install()
    threads = args.threads or len(os.sched_getaffinity(0))
    runs = args.runs or (1 if args.quick else 3)
    path, tokenizer, stories, prompts8, long = _setup(args)
    if args.measure:  # the child: one engine, figures as JSON
        print(json.dumps(measure_direct(args.measure, prompts8, long,
                                        _subject(args.measure, threads), runs)))
        return 0
    print(f"{path.name}, {threads} threads; prompts of {[len(x) for x in long.values()]} "
          f"tokens; {runs} run(s) each", flush=True)
    # Rounds of one run each, the engines in turn: the machine's speed drifts (on a shared
    # host by tens of percent over minutes), and each figure is the best of its rounds.
    rounds = [{name: _measure_in_child(name, args, threads, 1) for name in SUBJECTS}
              for _ in range(runs)]
    results = {name: {key: (min if key.startswith("prefill") else max)(
        r[name][key] for r in rounds) for key in rounds[0][name]} for name in SUBJECTS}
    stack = {}
    if not args.quick:
        long_prompt = tokenizer.decode(long[1000], skip_special_tokens=True)
        for engine in ("torch", "llama.cpp"):
            stack[engine] = through_stack(engine, stories[0], long_prompt, runs)
            print(f"  stack ({engine}): {stack[engine]}", flush=True)
    a, b, c = results["llama.cpp"], results["torch"], results["new"]
    rows = [(name, f"{r['single']:.1f}", f"{r['batch8']:.1f}", f"{r['prefill_256']:.2f}",
             f"{r['prefill_1000']:.2f}",
             f"{stack[key]['stack_single']:.1f}" if key in stack else "-",
             f"{stack[key]['stack_ttft_1000']:.2f}" if key in stack else "-")
            for name, key, r in (("(a) llama.cpp direct", "", a),
                                 ("(b) PyTorch engine (today)", "torch", b),
                                 ("(c) llama.cpp engine", "llama.cpp", c))]
    figures = {
        "single_ratio_vs_llamacpp": round(c["single"] / a["single"], 3),
        "batch8_ratio_vs_best": round(c["batch8"] / max(a["batch8"], b["batch8"]), 3),
        "ttft_1000_ratio_vs_today": round(c["prefill_1000"] / b["prefill_1000"], 3),
        "stack_single_tokens_per_s": round(stack["llama.cpp"]["stack_single"], 1)
        if stack else None,
        "stack_ttft_1000_ratio_vs_today": round(
            stack["llama.cpp"]["stack_ttft_1000"] / stack["torch"]["stack_ttft_1000"], 3)
        if stack else None,
        **{f"{k}_{n}": round(v, 3) for k, r in results.items() for n, v in r.items()},
        "threads": threads, "runs": runs}
    report(f"Local engines on {path.name} ({threads} threads, {NEW_TOKENS} new tokens, "
           "greedy; tokens/s, prefill = first token in the engine, s)", rows,
           ("engine", "single tok/s", "8-way tok/s", "prefill 256", "prefill 1000",
            "stack tok/s", "stack TTFT 1000"), figures)
    print("goals: single_ratio_vs_llamacpp >= 0.9, batch8_ratio_vs_best >= 1.0, "
          "ttft_1000_ratio_vs_today <= 1.0", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
