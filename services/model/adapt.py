"""Distil a task into a small model with a LoRA adapter, and score models on held-back exchanges."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from services.model.local import ensure_chat_template

Progress = Callable[[float, str], None]
IGNORE = -100  # the label cross-entropy skips: prompt and padding positions
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
META_FILE = "vfmos_adapter.json"  # beside peft's files: how the adapter was trained


@dataclass(frozen=True)
class Exchange:
    """One logged request and the reply the model should give; `label` is the task's class
    (the intent), when the task has one."""

    prompt: str
    reply: str
    label: str = ""


@dataclass(frozen=True)
class AdaptConfig:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    epochs: int = 2
    lr: float = 1e-3
    max_tokens: int = 64        # reply tokens kept: a longer target costs time, teaches little
    batch_size: int = 8
    seed: int = 0
    threads: int = 0            # 0: every core this process may run on
    target_modules: tuple[str, ...] = LLAMA_LINEAR
    # LoRA on the top N layers only (0: all): backward stops there, so a step costs about a
    # third less, but on the support task the top 15 of 30 classified 52% against 69%.
    top_layers: int = 0
    warmup_fraction: float = 0.1
    system_prompt: str = ""     # the adapter is trained, and must be served, under this one


@dataclass(frozen=True)
class TrainResult:
    steps: int
    seconds: float
    adapter_bytes: int
    final_loss: float                    # mean over the last epoch
    epoch_losses: tuple[float, ...]


@dataclass(frozen=True)
class EvalResult:
    rouge_l: float                       # mean ROUGE-L F1 of the replies to the references
    intent_acc: float | None             # None when the exchanges carry no labels
    tokens_per_s: float
    generated_tokens: int
    seconds: float
    outputs: tuple[str, ...]


# ---- pure pieces ------------------------------------------------------------------------------

def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence of two token lists (one row of the table kept)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (β = 1) on lowercase word tokens; 0 when either side has none."""
    cand, ref = words(candidate), words(reference)
    if not cand or not ref:
        return 0.0
    common = lcs_length(cand, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(cand), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def intent_target(intent: str, reply: str) -> str:
    """The reply a model trained for a labelled task gives: the label line first, so a short
    generation already answers the classification."""
    return f"intent: {intent}\n{reply}"


def intent_prompt(role: str, labels: list[str] | tuple[str, ...],
                  example: tuple[str, str, str]) -> str:
    """The zero-shot system prompt of a labelled task: the allowed labels, the answer's format
    and one example of it, (message, label, reply), that the caller writes (not from the data)."""
    message, label, reply = example
    return (f"You are {role}. Classify the customer's message into exactly one of these intents: "
            f"{', '.join(labels)}.\n"
            "Answer in this format: the first line is \"intent: <one intent from the list>\", "
            "then your reply to the customer.\n"
            f"Example: the customer writes \"{message}\" and you answer:\n"
            f"{intent_target(label, reply)}")


def _normal(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def parse_intent(output: str, labels: list[str] | tuple[str, ...]) -> tuple[str | None, str]:
    """(the allowed label the output's first line names, or None; the reply after that line).
    The line is "intent: X"; X is matched exactly, else after normalizing case and
    separators; anything else names no label. An output whose first line is neither an
    intent line nor a label is all reply."""
    lines = output.strip().split("\n", 1)
    first, rest = lines[0].strip(), (lines[1] if len(lines) > 1 else "")
    named, prefixed = re.subn(r"^\W*intent\W*[:=]", "", first, count=1, flags=re.IGNORECASE)
    named = named.strip(" \t`'\"*.")
    label = named if named in labels else {_normal(x): x for x in labels}.get(_normal(named))
    return label, rest if prefixed or label else output.strip()


def split(exchanges: list[Exchange], held_back_fraction: float,
          seed: int) -> tuple[list[Exchange], list[Exchange]]:
    """(train, held back): disjoint, deterministic for a seed, stratified by label (each
    label gives its share, rounded, to the held-back part)."""
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(exchanges):
        groups.setdefault(ex.label, []).append(i)
    held: set[int] = set()
    for label in sorted(groups):
        members = groups[label]
        rng.shuffle(members)
        held.update(members[:round(held_back_fraction * len(members))])
    train = [ex for i, ex in enumerate(exchanges) if i not in held]
    back = [ex for i, ex in enumerate(exchanges) if i in held]
    return train, back


def messages(system_prompt: str, prompt: str) -> list[dict]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": prompt}]


# ---- models -----------------------------------------------------------------------------------

def _use_threads(threads: int) -> None:
    import torch
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))


def load_model(base_dir: Path, adapter_dir: Path | None = None):
    """(model, tokenizer) in fp32 for CPU; an adapter is merged in: no cost per token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ensure_chat_template(model, tokenizer)
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model.eval(), tokenizer


def adapter_system_prompt(adapter_dir: Path) -> str:
    """The system prompt the adapter was trained under (serve it with the same)."""
    return json.loads((Path(adapter_dir) / META_FILE).read_text())["system_prompt"]


def encode_example(tokenizer, system_prompt: str, ex: Exchange,
                   max_tokens: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): the chat up to the assistant's turn is context (labels IGNORE),
    the reply, cut to max_tokens, is the target, with the turn's end when it was not cut."""
    chat = messages(system_prompt, ex.prompt)
    prompt_text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*chat, {"role": "assistant", "content": ex.reply}],
                                         tokenize=False)
    # What the template writes after the reply (its end-of-turn marker): learned, so the
    # adapted model stops where a reply ends.
    at = full.find(ex.reply, len(prompt_text) - 1)
    suffix = full[at + len(ex.reply):] if at >= 0 else ""
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    reply_ids = tokenizer.encode(ex.reply, add_special_tokens=False)
    if len(reply_ids) > max_tokens:
        reply_ids = reply_ids[:max_tokens]
    else:
        reply_ids += tokenizer.encode(suffix.rstrip("\n"), add_special_tokens=False)
    return prompt_ids + reply_ids, [IGNORE] * len(prompt_ids) + reply_ids


def _batches(examples: list[tuple[list[int], list[int]]], size: int,
             rng: random.Random) -> list[list[int]]:
    """Index batches for one epoch: shuffled, then sorted by length within windows of a few
    batches so little of a batch is padding, then the batches shuffled again."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = size * 8
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(examples[i][0]))
        batches += [chunk[i:i + size] for i in range(0, len(chunk), size)]
    rng.shuffle(batches)
    return batches


def _collate(examples, batch: list[int], pad_id: int):
    import torch
    width = max(len(examples[i][0]) for i in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, i in enumerate(batch):
        tokens, targets = examples[i]
        ids[row, :len(tokens)] = torch.tensor(tokens)
        labels[row, :len(targets)] = torch.tensor(targets)
        mask[row, :len(tokens)] = 1
    return ids, mask, labels


def _reply_loss(model, ids, mask, labels):
    """Mean cross-entropy over the reply tokens. The logits are computed at those positions
    only: the 49k-word head over every prompt position would be a fifth of the step's work."""
    import torch.nn.functional as F

    inner = model.get_base_model()
    hidden = inner.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = inner.get_output_embeddings()(hidden[:, :-1][keep])
    cap = getattr(inner.config, "final_logit_softcapping", None)
    if cap:
        logits = (logits / cap).tanh() * cap
    return F.cross_entropy(logits, targets[keep])


def _lora(config: AdaptConfig, layers: int):
    from peft import LoraConfig

    top = (list(range(layers - config.top_layers, layers))
           if 0 < config.top_layers < layers else None)
    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), layers_to_transform=top,
                      task_type="CAUSAL_LM")


# ---- training ---------------------------------------------------------------------------------

def train_adapter(base_dir: Path, train: list[Exchange], out_dir: Path,
                  config: AdaptConfig = AdaptConfig(),
                  progress: Progress | None = None) -> TrainResult:
    """Train a LoRA adapter on the replies of `train` (CPU, fp32; deterministic for a seed
    and thread count) and write it to out_dir whole or not at all."""
    import torch
    from peft import get_peft_model

    if not train:
        raise ValueError("no exchanges to train on")
    started = time.monotonic()
    _use_threads(config.threads)
    torch.manual_seed(config.seed)  # the adapter's initial weights and its dropout
    rng = random.Random(config.seed)
    base, tokenizer = load_model(base_dir)
    model = get_peft_model(base, _lora(config, base.config.num_hidden_layers))
    examples = [encode_example(tokenizer, config.system_prompt, ex, config.max_tokens)
                for ex in train]
    total = config.epochs * math.ceil(len(examples) / config.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warmup = max(1, round(config.warmup_fraction * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.train()
    step, epoch_losses = 0, []
    for epoch in range(config.epochs):
        losses = []
        for batch in _batches(examples, config.batch_size, rng):
            loss = _reply_loss(model, *_collate(examples, batch, pad))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if progress is not None:
                progress(step / total, f"epoch {epoch + 1}/{config.epochs} step {step}/{total} "
                                       f"loss {losses[-1]:.3f}")
        epoch_losses.append(sum(losses) / len(losses))
    size = _save_atomically(model, out_dir, config, len(train))
    return TrainResult(steps=step, seconds=time.monotonic() - started, adapter_bytes=size,
                       final_loss=epoch_losses[-1], epoch_losses=tuple(epoch_losses))


def _save_atomically(model, out_dir: Path, config: AdaptConfig, examples: int) -> int:
    """Write into a staging dir and rename it into place: an interrupted job leaves the old
    adapter or none, never half of one. Returns the adapter's size in bytes."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    meta = {"config": asdict(config), "train_examples": examples,
            "system_prompt": config.system_prompt}
    (staging / META_FILE).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())


# ---- evaluation -------------------------------------------------------------------------------

def _common_prefix(encoded: list[list[int]]) -> int:
    """Tokens every prompt starts with (the system prompt), leaving each at least one of its own."""
    shortest = min(len(ids) for ids in encoded)
    n = 0
    while n < shortest - 1 and all(ids[n] == encoded[0][n] for ids in encoded):
        n += 1
    return n


def _prefix_cache(model, prefix: list[int]):
    """The KV cache of the shared prefix, computed once: a zero-shot prompt is mostly its
    system prompt, and prefilling it for every request would be most of the work."""
    import torch

    if len(prefix) < 16:
        return None
    with torch.no_grad():
        return model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int,
             batch_size: int = 8, assistant_prefix: str = "") -> tuple[list[str], int, float]:
    """Greedy replies to chats, each begun with assistant_prefix, in batches of similar length:
    (texts in the chats' order, prefix included; new tokens; seconds). Rows are padded between
    the shared prefix and their own tokens; positions follow the mask, so the padding shifts
    nothing."""
    import copy

    import torch

    encoded = [tokenizer.encode(tokenizer.apply_chat_template(m, add_generation_prompt=True,
                                                              tokenize=False) + assistant_prefix,
                                add_special_tokens=False) for m in prompts]
    started = time.monotonic()
    shared = _common_prefix(encoded)
    cache = _prefix_cache(model, encoded[0][:shared])
    shared = shared if cache is not None else 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    texts, produced = [""] * len(encoded), 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        rows = [(width - len(encoded[i]), encoded[i][shared:]) for i in batch]
        ids = torch.tensor([encoded[batch[0]][:shared] + [pad] * gap + own for gap, own in rows])
        mask = torch.tensor([[1] * shared + [0] * gap + [1] * len(own) for gap, own in rows])
        past = None
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(batch))
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=past,
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        for row, i in enumerate(batch):
            new = out[row, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in stops), len(new))
            produced += min(len(new), end + 1)
            texts[i] = assistant_prefix + tokenizer.decode(new[:end], skip_special_tokens=True)
    return texts, produced, time.monotonic() - started


def evaluate(base_dir: Path, adapter_dir: Path | None, exchanges: list[Exchange],
             system_prompt: str, labels: list[str] | tuple[str, ...] = (),
             max_new_tokens: int = 64, batch_size: int = 8, threads: int = 0,
             assistant_prefix: str = "") -> EvalResult:
    """Score a model (with its adapter, if any) on exchanges: ROUGE-L of its replies to theirs
    and, given the allowed labels, how often its "intent:" line names the exchange's label.
    assistant_prefix begins every answer (an "intent:" that holds a zero-shot model to the
    format)."""
    _use_threads(threads)
    model, tokenizer = load_model(base_dir, adapter_dir)
    chats = [messages(system_prompt, ex.prompt) for ex in exchanges]
    outputs, produced, seconds = generate(model, tokenizer, chats, max_new_tokens, batch_size,
                                          assistant_prefix)
    rouge, right = 0.0, 0
    for ex, out in zip(exchanges, outputs):
        reply = out
        if labels:
            named, reply = parse_intent(out, labels)
            right += named == ex.label
        rouge += rouge_l(reply, ex.reply)
    n = max(1, len(exchanges))
    return EvalResult(rouge_l=rouge / n, intent_acc=right / n if labels else None,
                      tokens_per_s=produced / seconds if seconds > 0 else 0.0,
                      generated_tokens=produced, seconds=seconds, outputs=tuple(outputs))
