"""Train the PII check's learned NER: `python -m services.trust.train_ner [--data-dir DIR]
[--out FILE] [--epochs N] [--augment K] [--benign F] [--holdout F]`.

Reads `pii_dev.jsonl.gz` (the presidio-research synthetic set, schema in ../shared/data/trust/
README.md), holds out a share of its sentence templates (never trained on, so that
`python -m bench trust` can score unseen sentence shapes), adds K copies of each training
sentence with its entities swapped for other training values of the same type and texts with
no personal data (support tickets and answers, KB FAQs, materials abstracts), and fits LoRA
adapters on the packaged MiniLM plus a tag head. Writes services/trust/weights/ner.npz (about
660 KB: float16 adapters and head, and a JSON meta with the hashes of every trained text).
Fixed seeds (data order, swaps, dropout): a rerun on the same data with the same --threads
writes the same bytes. About a minute an epoch on 2 cores (8 epochs)."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import sys
import time
from pathlib import Path


from services.trust import ner
from services.trust.corpus import DEFAULT_DATA  # ../shared/data/trust

SEED = 20261201
FILE = "pii_dev.jsonl.gz"
RANK, ALPHA = 8, 16
BATCH = 16


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_templates(rows: list[dict], holdout: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out), whole templates on one side (records without a template id are
    grouped by their text)."""
    key = [str(r.get("template_id", r["text"])) for r in rows]
    groups = sorted(set(key))
    random.Random(seed).shuffle(groups)
    held = set(groups[:round(len(groups) * holdout)])
    return ([r for r, k in zip(rows, key) if k not in held],
            [r for r, k in zip(rows, key) if k in held])


def swapped(row: dict, pool: dict[str, list[str]], rng: random.Random) -> dict | None:
    """The sentence with each entity replaced by another value of its type (None when its
    spans nest, which a swap cannot keep)."""
    spans = sorted(row["spans"], key=lambda s: s["start"])
    if any(a["end"] > b["start"] for a, b in zip(spans, spans[1:])):
        return None
    parts, new, at, size = [], [], 0, 0
    for span in spans:
        value = rng.choice(pool[span["type"]])
        before = row["text"][at:span["start"]]
        parts += [before, value]
        size += len(before)
        new.append({"start": size, "end": size + len(value), "type": span["type"]})
        size += len(value)
        at = span["end"]
    parts.append(row["text"][at:])
    return {"text": "".join(parts), "spans": new}


BENIGN = {"ticket questions": 300, "ticket answers": 300, "kb faq": 150, "abstracts": 100}


def benign_texts(data_dir: Path, skip: int = 0, scale: float = 1.0) -> dict[str, list[str]]:
    """Texts with no personal data, by source, in a fixed order (by hash): support tickets and
    the answers to them (numbered steps, order numbers, {{placeholders}}), the support KB's
    FAQ entries and materials abstracts. Training reads the first BENIGN[source] of each as
    all-O sentences, so that the tagger learns what is *not* an address ("4." opening a step,
    an order number); the bench reads the next ones (`skip`) to count false alarms."""
    from services.trust.corpus import personas_dir, read_jsonl

    personas = personas_dir(data_dir)
    tickets = sorted(read_jsonl(personas / "support" / "tickets_intent_dev.jsonl.gz"),
                     key=lambda r: hashlib.sha1(r["id"].encode()).hexdigest())
    faq = sorted((r for r in read_jsonl(personas / "support" / "kb_docs.jsonl.gz")
                  if r.get("doc_type") == "faq"),
                 key=lambda r: hashlib.sha1(r["key"].encode()).hexdigest())
    abstracts = sorted(read_jsonl(personas / "materials" / "abstracts_dev.jsonl.gz"),
                       key=lambda r: hashlib.sha1(str(r["id"]).encode()).hexdigest())
    sources = {"ticket questions": [r["instruction"] for r in tickets],
               "ticket answers": [r["response"] for r in tickets],
               "kb faq": [f"{r['question']} {r['answer']}" for r in faq],
               "abstracts": [f"{r['title']}. {r['abstract']}" for r in abstracts]}
    return {name: texts[skip * BENIGN[name]:][:round(BENIGN[name] * scale)]
            for name, texts in sources.items()}


def batches(sizes: list[int], size: int, rng: random.Random) -> list[list[int]]:
    """Indexes in batches of `size`, in random order, each batch of texts of similar length
    (sorted within pools of 32 batches): padding a step to its longest text is what costs."""
    order = list(range(len(sizes)))
    rng.shuffle(order)
    pool = size * 32
    out = []
    for at in range(0, len(order), pool):
        ranked = sorted(order[at:at + pool], key=lambda i: sizes[i])
        out += [ranked[k:k + size] for k in range(0, len(ranked), size)]
    rng.shuffle(out)
    return out


def spans_of(row: dict) -> list[tuple[int, int, str]]:
    return [(s["start"], s["end"], s["type"]) for s in row["spans"]]


def exact_f1(model, tokenizer, rows: list[dict], tags: list[str]) -> float:
    import torch
    tp = fp = fn = 0
    model.eval()
    with torch.inference_mode():
        for row in rows:
            item = ner.encode(tokenizer, row["text"])
            ids, mask, shapes, _ = ner.batch([item])
            probs = torch.softmax(model(ids, mask, shapes), -1)[0].numpy()
            got = {(e.start, e.end, e.type) for e in ner.decode(item, probs, tags)}
            gold = set(spans_of(row))
            tp, fp, fn = tp + len(got & gold), fp + len(got - gold), fn + len(gold - got)
    return 2 * tp / max(1, 2 * tp + fp + fn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.trust.train_ner",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ner.WEIGHTS)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--augment", type=int, default=1, help="swapped copies per sentence")
    parser.add_argument("--benign", type=float, default=0.5,
                        help="share of BENIGN's texts without personal data to train on")
    parser.add_argument("--holdout", type=float, default=0.2, help="share of templates held out")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    path = args.data_dir / FILE
    if not path.is_file():
        print(f"train_ner: {path} not found (--data-dir names the folder of {FILE})",
              file=sys.stderr)
        return 2
    if not 0.0 <= args.holdout < 1.0 or args.epochs < 1 or args.augment < 0 \
            or not 0.0 <= args.benign <= 1.0:
        print("train_ner: --holdout must be 0..1 (exclusive), --benign 0..1, --epochs >= 1, "
              "--augment >= 0", file=sys.stderr)
        return 2

    import torch
    from transformers import AutoTokenizer
    from vfmos_runtime.embed import packaged_minilm_dir

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    rng = random.Random(SEED)
    rows = load(path)
    train, held = split_templates(rows, args.holdout, SEED)
    types = sorted({s["type"] for r in rows for s in r["spans"]})
    tags = ner.tag_names(types)
    pool: dict[str, list[str]] = {}
    for row in train:
        for span in row["spans"]:
            pool.setdefault(span["type"], []).append(row["text"][span["start"]:span["end"]])
    extra = [s for row in train for _ in range(args.augment)
             for s in [swapped(row, pool, rng)] if s]
    benign = [text for texts in benign_texts(args.data_dir, scale=args.benign).values()
              for text in texts]
    extra += [{"text": text, "spans": []} for text in benign]
    encoder_dir = packaged_minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    items = [ner.encode(tokenizer, r["text"], spans_of(r), tags) for r in train + extra]
    print(f"train_ner: {len(train)} sentences (+{len(extra) - len(benign)} swapped, "
          f"+{len(benign)} benign) from "
          f"{len({r.get('template_id') for r in train})} templates; {len(held)} held out; "
          f"{len(tags)} tags", flush=True)

    model = ner.build_model(encoder_dir, len(tags), RANK, ALPHA)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=args.lr)
    started = time.monotonic()
    for epoch in range(args.epochs):
        model.train()
        total = 0.0
        for chunk in batches([len(i.ids) for i in items], BATCH, rng):
            ids, mask, shapes, target = ner.batch([items[i] for i in chunk])
            logits = model(ids, mask, shapes)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(tags)),
                                                     target.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        print(f"train_ner: epoch {epoch + 1}/{args.epochs} loss {total:.2f} "
              f"({time.monotonic() - started:.0f} s)", flush=True)
    f1 = exact_f1(model, tokenizer, held, tags) if held else None
    meta = {"types": types, "rank": RANK, "alpha": ALPHA, "seed": SEED, "epochs": args.epochs,
            "augment": args.augment, "benign": args.benign, "holdout": args.holdout,
            "lr": args.lr,
            "data_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "held_out_exact_f1": None if f1 is None else round(f1, 4),
            "trained_texts": sorted({text_hash(r["text"]) for r in train})}
    ner.save(args.out, model, meta)
    print(f"train_ner: held-out templates exact F1 (all types) {meta['held_out_exact_f1']}; "
          f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
