"""vfm-trustd's learned NER for names, places, street addresses and dates: the packaged MiniLM
with a LoRA delta and a word-tag head, trained by `python -m services.trust.train_ner` on the
presidio-research synthetic set. The PII check uses it beside presidio's pattern recognizers
(cards, phones, emails, IBANs, ...), where spaCy's small statistical NER was before: spaCy's
news-trained model splits and misses the addresses and foreign names of support forms.

The encoder is uncased, so the head also reads each word's shape (capitalised, all capitals,
digits, at a line start). Tags are BIO over words (the tokenizer's pre-tokenized words: a word
is tagged by its first word piece); a B tag after a gap starts a new entity, which is how
"28245 Puruntie 82 Apt. 595" on a form line comes out as three address parts."""

from __future__ import annotations

import json
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

WEIGHTS = Path(__file__).resolve().parent / "weights" / "ner.npz"
SHAPES = 6                # shape features a word piece gets (see shape_features)
SHAPE_DIM = 32
MAX_PIECES = 192          # word pieces one forward pass reads; longer texts are cut in pieces
PIECE_CHARS = 480         # ... of at most this many characters, cut at white space
LORA_TARGETS = ("query", "key", "value", "dense")


@dataclass(frozen=True)
class Entity:
    """Characters [start, end) of a text, the generator's type (PERSON, STREET_ADDRESS, GPE,
    ...), and the head's mean probability of the tags that made it."""

    start: int
    end: int
    type: str
    score: float


def tag_names(types: Sequence[str]) -> list[str]:
    return ["O"] + [f"{p}-{t}" for t in types for p in "BI"]


def shape_features(text: str, offsets: Sequence[tuple[int, int]]) -> list[list[float]]:
    """Per word piece: its word starts with a capital, the word is in capitals, the piece is
    digits, the piece starts a word, a line break just before it, and a bias."""
    out = []
    for a, b in offsets:
        if a == b:
            out.append([0.0] * SHAPES)
            continue
        word_start = a
        while word_start > 0 and text[word_start - 1].isalnum():
            word_start -= 1
        word = text[word_start:b]
        out.append([float(text[word_start].isupper()), float(len(word) > 1 and word.isupper()),
                    float(text[a:b].isdigit()), float(word_start == a),
                    float("\n" in text[max(0, a - 3):a]), 1.0])
    return out


@dataclass
class Encoded:
    """One text as the model reads it: word-piece ids, their character offsets, which word
    each belongs to (None: special token), shape features, and (training) the tag ids, -100
    where no tag is learned (special tokens and a word's later pieces)."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    words: list[int | None]
    shapes: list[list[float]]
    tags: list[int] | None = None


def encode(tokenizer, text: str, spans: Sequence[tuple[int, int, str]] = (),
           tags: Sequence[str] | None = None) -> Encoded:
    """`spans` (start, end, type) and `tags` (tag_names) give the training tags."""
    enc = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=MAX_PIECES)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    words = enc.word_ids()
    out = Encoded(text, list(enc["input_ids"]), offsets, words, shape_features(text, offsets))
    if tags is None:
        return out
    index = {name: n for n, name in enumerate(tags)}
    out.tags = []
    for k, (a, b) in enumerate(offsets):
        if words[k] is None or k > 0 and words[k - 1] == words[k]:
            out.tags.append(-100)
            continue
        tag = 0
        for start, end, kind in spans:
            if start <= a and b <= end and f"B-{kind}" in index:
                inside = any(text[x].isalnum() for x in range(start, a))
                tag = index[("I-" if inside else "B-") + kind]
        out.tags.append(tag)
    return out


def decode(item: Encoded, probs: np.ndarray, tags: Sequence[str]) -> list[Entity]:
    """Entities from per-piece tag probabilities: each word takes its first piece's best tag;
    an I tag continues an entity of its type, anything else closes it."""
    best = probs.argmax(-1)
    found: list[Entity] = []
    current: list | None = None  # [start, end, type, [probabilities]]

    def close() -> None:
        nonlocal current
        if current:
            found.append(Entity(current[0], current[1], current[2],
                                float(np.mean(current[3]))))
        current = None

    for k, (a, b) in enumerate(item.offsets):
        word = item.words[k]
        if word is None:
            close()
            continue
        if k > 0 and item.words[k - 1] == word:  # a later piece of the same word
            if current:
                current[1] = b
            continue
        tag = tags[int(best[k])]
        if tag == "O":
            close()
            continue
        prefix, kind = tag.split("-", 1)
        if current and prefix == "I" and current[2] == kind:
            current[1] = b
            current[3].append(float(probs[k, best[k]]))
        else:
            close()
            current = [a, b, kind, [float(probs[k, best[k]])]]
    close()
    return found


def build_model(encoder_dir: Path, n_tags: int, rank: int, alpha: int):
    """The tagger: MiniLM with LoRA adapters (peft) on its attention and dense layers, and a
    head over each piece's state and its shape features."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            base = AutoModel.from_pretrained(encoder_dir)
            with warnings.catch_warnings():  # peft asks a transformers 5 model a deprecated
                warnings.filterwarnings(      # question; it would reach every daemon's log
                    "ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                self.encoder = get_peft_model(base, LoraConfig(
                    r=rank, lora_alpha=alpha, lora_dropout=0.1,
                    target_modules=list(LORA_TARGETS)))
            hidden = int(base.config.hidden_size)
            self.shape = torch.nn.Linear(SHAPES, SHAPE_DIM)
            self.head = torch.nn.Linear(hidden + SHAPE_DIM, n_tags)

        def forward(self, ids, mask, shapes):
            states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            return self.tag_logits(states, shapes)

        def tag_logits(self, states, shapes):
            """The head over the encoder's hidden states and the pieces' shape features."""
            return self.head(torch.cat([states, torch.relu(self.shape(shapes))], -1))

    return Tagger()


def batch(items: Sequence[Encoded]):
    """Padded tensors (ids, mask, shapes, tags) of some encoded texts."""
    import torch
    width = max(len(i.ids) for i in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    tags = torch.full_like(ids, -100)
    shapes = torch.zeros(len(items), width, SHAPES)
    for n, item in enumerate(items):
        size = len(item.ids)
        ids[n, :size] = torch.tensor(item.ids)
        mask[n, :size] = 1
        shapes[n, :size] = torch.tensor(item.shapes)
        if item.tags is not None:
            tags[n, :size] = torch.tensor(item.tags)
    return ids, mask, shapes, tags


def trainable_state(model) -> dict[str, np.ndarray]:
    """What training changed (LoRA matrices, shape layer, head) as float16 arrays."""
    return {name: p.detach().cpu().numpy().astype(np.float16)
            for name, p in model.named_parameters() if p.requires_grad}


def save(path: Path, model, meta: dict) -> None:
    arrays = trainable_state(model)
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_meta(path: Path = WEIGHTS) -> dict:
    with np.load(path) as data:
        return json.loads(bytes(data["meta"]).decode())


def pieces(text: str, limit: int) -> list[tuple[int, str]]:
    """(offset, piece) of a text, each at most `limit` characters, cut at a space or line
    break (the PII check cuts what spaCy reads the same way)."""
    out, at = [], 0
    while len(text) - at > limit:
        cut = max(text.rfind(" ", at, at + limit), text.rfind("\n", at, at + limit))
        cut = cut if cut > at else at + limit
        out.append((at, text[at:cut]))
        at = cut
    out.append((at, text[at:]))
    return out


class LearnedNer:
    """The shipped tagger, LoRA merged into the encoder at load (one plain forward pass per
    text). Thread-safe like the embedder: the tokenizer under a lock, the forward pass not."""

    def __init__(self, path: Path = WEIGHTS, encoder_dir: Path | None = None,
                 batch_size: int = 32):
        import torch
        from transformers import AutoTokenizer
        from vfmos_runtime.embed import BertForward, packaged_minilm_dir

        if not Path(path).is_file():
            raise RuntimeError(f"the NER weights {path} are missing "
                               "(python -m services.trust.train_ner writes them)")
        encoder_dir = encoder_dir or packaged_minilm_dir()
        with np.load(path) as data:
            self.meta = json.loads(bytes(data["meta"]).decode())
            state = {k: torch.from_numpy(data[k].astype(np.float32))
                     for k in data.files if k != "meta"}
        self.types: list[str] = list(self.meta["types"])
        self.tags = tag_names(self.types)
        model = build_model(encoder_dir, len(self.tags), self.meta["rank"], self.meta["alpha"])
        missing = set(state) - {n for n, _ in model.named_parameters()}
        if missing:
            raise RuntimeError(f"the NER weights {path} do not fit the model: {sorted(missing)[:3]}")
        model.load_state_dict(state, strict=False)
        model.encoder = model.encoder.merge_and_unload()
        self._model = model.eval()
        # A lone piece (a question, an answer window) skips transformers' module tree.
        self._lean = BertForward(model.encoder) if BertForward.fits(model.encoder) else None
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
        self._lock = threading.Lock()
        self.batch_size = batch_size

    def find_many(self, texts: Sequence[str]) -> list[list[Entity]]:
        """Entities of each text (the generator's types; see `types`)."""
        owners, offsets, items = [], [], []
        for n, text in enumerate(texts):
            for offset, piece in pieces(text, PIECE_CHARS):
                if piece.strip():
                    with self._lock:
                        items.append(encode(self._tokenizer, piece))
                    owners.append(n)
                    offsets.append(offset)
        found: list[list[Entity]] = [[] for _ in texts]
        order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
        with self._torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                ids, mask, shapes, _ = batch([items[i] for i in chunk])
                logits = (self._model.tag_logits(self._lean(ids, mask), shapes)
                          if self._lean is not None and len(chunk) == 1
                          else self._model(ids, mask, shapes))
                probs = self._torch.softmax(logits, -1).numpy()
                for row, i in enumerate(chunk):
                    size = len(items[i].ids)
                    found[owners[i]] += [
                        Entity(e.start + offsets[i], e.end + offsets[i], e.type, e.score)
                        for e in decode(items[i], probs[row, :size], self.tags)]
        return found
