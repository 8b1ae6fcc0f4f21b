"""LoCoMo evidence recall: does the working set built for each question hold its evidence turns?

`python -m bench.locomo [--data PATH] [--budget 1024] [--quick] [--variants]` ranks each
conversation's turns for every category 1-4 question (now = the last session's date), packs
the working set as the kernel does, and reports all-/any-evidence recall per category for the episodic ranking and,
in the same run, the recency window, dense top-k, BM25 and their RRF."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from bench.common import REPO, percentile, report
from services.data import fusion
from kernel.memory import Candidates, Item, assemble
from services.data.episodic import (Entry, EpisodicIndex, RankConfig, day_header, day_label,
                                   render)
from services.data.timeparse import parse_session_date

DEFAULT_DATA = REPO.parent / "shared" / "data" / "locomo" / "dev.json"
TOKENIZER_DIR = Path(os.path.expanduser("~/.cache/vfmos/models/smollm2-135m"))
CACHE_DIR = Path("/tmp/vfmos-locomo-vectors")  # entry embeddings, keyed by the texts' hash
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}
RECENT_TURNS = 4
# --variants: the ranking less one signal at a time (or another fusion), same run, same data.
VARIANTS = {
    "no-context-vectors": RankConfig(context_prev=0.0, context_next=0.0),
    "no-neighbour-spread": RankConfig(neighbour_share=0.0),
    "no-speaker": RankConfig(speaker_boost=0.0, drop_names=False),
    "no-time-window": RankConfig(time_boost=0.0),
    "no-feedback": RankConfig(feedback_docs=0),
    "z-fusion": RankConfig(fusion="z"),
    "rrf-fusion": RankConfig(fusion="rrf"),
}


@dataclass
class Question:
    question: str
    category: int
    evidence: list[str]    # dia_ids, normalised, only ids that exist in the conversation
    answer: str = ""


@dataclass
class Conversation:
    sample_id: str
    speakers: tuple[str, str]
    turns: list[dict]      # {speaker, text, time (datetime), dia_id}, in order
    questions: list[Question] = field(default_factory=list)

    @property
    def now(self) -> datetime | None:
        return self.turns[-1]["time"] if self.turns else None


# loading
def _turn_text(turn: dict) -> str:
    caption = turn.get("blip_caption")
    return f"{turn['text']} [shares a photo: {caption}]" if caption else turn["text"]


def _evidence(raw: list[str], known: set[str]) -> list[str]:
    """Upstream quirks: two ids in one string, 'D:11:26', bare 'D', ids that do not exist."""
    out: list[str] = []
    for item in raw:
        for part in re.split(r"[;,\s]+", str(item)):
            m = re.fullmatch(r"D:?(\d+):(\d+)", part.strip())
            if m and f"D{m[1]}:{m[2]}" in known and f"D{m[1]}:{m[2]}" not in out:
                out.append(f"D{m[1]}:{m[2]}")
    return out


def load_conversations(path: Path | str = DEFAULT_DATA) -> list[Conversation]:
    """Turns only (speaker, text + photo caption, session date, dia_id): the generated
    observations and summaries upstream ships are memories of their own and stay unused."""
    out = []
    for record in json.loads(Path(path).read_text()):
        conv = record["conversation"]
        sessions = sorted((int(k.split("_")[1]) for k in conv
                           if re.fullmatch(r"session_\d+", k)))
        turns = []
        for n in sessions:
            when = parse_session_date(conv.get(f"session_{n}_date_time", ""))
            turns += [{"speaker": t["speaker"], "text": _turn_text(t), "time": when,
                       "dia_id": t["dia_id"]} for t in conv[f"session_{n}"]]
        known = {t["dia_id"] for t in turns}
        questions = [Question(q["question"], int(q["category"]), _evidence(q["evidence"], known),
                              str(q.get("answer", ""))) for q in record["qa"]]
        out.append(Conversation(record["sample_id"], (conv["speaker_a"], conv["speaker_b"]),
                                turns, questions))
    return out


def scored_questions(conv: Conversation) -> list[Question]:
    """The questions recall is measured on: categories 1-4, with evidence that exists."""
    return [q for q in conv.questions if q.category in CATEGORIES and q.evidence]


# scoring and reporting
def score(working_set_dia_ids, evidence: list[str]) -> tuple[bool, bool]:
    """(all evidence turns are in the working set, at least one is)."""
    present = set(working_set_dia_ids)
    hits = [e in present for e in evidence]
    return all(hits), any(hits)


class Report:
    """Recall per method and category, tokens used, ranking latency."""

    def __init__(self):
        self._rows: dict[str, dict[int, list[tuple[bool, bool]]]] = defaultdict(
            lambda: defaultdict(list))
        self._tokens: dict[str, list[int]] = defaultdict(list)
        self._latency: dict[str, list[float]] = defaultdict(list)

    def add(self, method: str, category: int, hit: tuple[bool, bool], tokens: int = 0,
            latency_ms: float | None = None) -> None:
        self._rows[method][category].append(hit)
        self._tokens[method].append(tokens)
        if latency_ms is not None:
            self._latency[method].append(latency_ms)

    def methods(self) -> list[str]:
        return list(self._rows)

    def recall(self, method: str, category: int | None = None) -> tuple[float, float, int]:
        """(all-evidence recall, any-evidence recall, questions) for one category or all."""
        cats = [category] if category else list(self._rows[method])
        hits = [h for c in cats for h in self._rows[method][c]]
        if not hits:
            return float("nan"), float("nan"), 0
        return (sum(a for a, _ in hits) / len(hits), sum(b for _, b in hits) / len(hits),
                len(hits))

    def latency(self, method: str) -> tuple[float, float]:
        values = self._latency.get(method, [])
        return percentile(values, 50), percentile(values, 95)

    def mean_tokens(self, method: str) -> float:
        values = self._tokens[method]
        return sum(values) / len(values) if values else 0.0

    def rows(self) -> list[tuple]:
        out = []
        for m in self.methods():
            cells = [m]
            for c in CATEGORIES:
                a, b, _ = self.recall(m, c)
                cells.append(f"{a:.3f}/{b:.3f}")
            a, b, n = self.recall(m)
            p50, p95 = self.latency(m)
            cells += [f"{a:.3f}", f"{b:.3f}", n, f"{self.mean_tokens(m):.0f}",
                      f"{p50:.1f}/{p95:.1f}" if self._latency.get(m) else "-"]
            out.append(tuple(cells))
        return out

    HEADER = ("method", *(f"{n} all/any" for n in CATEGORIES.values()), "all", "any", "n",
              "tokens", "rank ms p50/p95")

    def figures(self, main: str, baselines: dict[str, str]) -> dict:
        a, b, n = self.recall(main)
        p50, p95 = self.latency(main)
        out = {"all_evidence_recall": round(a, 4), "any_evidence_recall": round(b, 4),
               "questions": n, "rank_ms_p50": round(p50, 2), "rank_ms_p95": round(p95, 2),
               "tokens_mean": round(self.mean_tokens(main), 1)}
        for c, name in CATEGORIES.items():
            ca, cb, _ = self.recall(main, c)
            out[f"cat{c}_{name.replace('-', '_')}_all"] = round(ca, 4)
            out[f"cat{c}_{name.replace('-', '_')}_any"] = round(cb, 4)
        for key, method in baselines.items():
            ba, bb, _ = self.recall(method)
            out[f"{key}_all_evidence_recall"] = round(ba, 4)
            out[f"{key}_any_evidence_recall"] = round(bb, 4)
        return out


# building the memory
def build_entries(conv: Conversation, tokenizer) -> list[Entry]:
    entries = [Entry(seq=i, speaker=t["speaker"], text=t["text"], time=t["time"],
                     meta={"dia_id": t["dia_id"]}) for i, t in enumerate(conv.turns)]
    lines = [render(e) for e in entries]
    counts = tokenizer(lines, add_special_tokens=False)["input_ids"]
    labels = sorted({day_label(e.time) for e in entries})
    headers = tokenizer([day_header(g) for g in labels], add_special_tokens=False)["input_ids"]
    header_tokens = {g: len(ids) for g, ids in zip(labels, headers)}
    for entry, ids in zip(entries, counts):
        entry.tokens = len(ids)
        entry.group = day_label(entry.time)
        entry.group_tokens = header_tokens[entry.group]
    return entries


class MemoEmbedder:
    """The embedder with answers kept: variants re-embed the same questions."""

    def __init__(self, embedder):
        self._embedder, self._memo = embedder, {}
        self.name, self.dim = embedder.name, embedder.dim

    def embed(self, texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if new:
            self._memo.update(zip(new, self._embedder.embed(new)))
        return np.stack([self._memo[t] for t in texts])


def embed_cached(embedder, texts: list[str]) -> np.ndarray:
    """Entry embeddings are made once at add time; the bench keeps them in /tmp between runs."""
    key = hashlib.sha256(("\x00".join(texts) + embedder.name).encode()).hexdigest()[:24]
    path = CACHE_DIR / f"{key}.npy"
    if path.exists():
        return np.load(path)
    vectors = embedder.embed(texts)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


# the methods: each gives a ranked list of seqs for one question
class Baselines:
    """Recency window, plain dense top-k, plain BM25, and RRF of the two (k=60)."""

    def __init__(self, entries: list[Entry], vectors: np.ndarray):
        from services.data.lexical import BM25Index

        self._seqs = np.array([e.seq for e in entries])
        self._vectors = vectors
        self._bm25 = BM25Index()
        self._bm25.add([e.text for e in entries])

    def recency(self, question: str, qv: np.ndarray) -> list[int]:
        return [int(s) for s in self._seqs[::-1]]

    def dense(self, question: str, qv: np.ndarray) -> list[int]:
        return self._order(self._vectors @ qv)

    def bm25(self, question: str, qv: np.ndarray) -> list[int]:
        return self._order(self._bm25.scores(question))

    def rrf(self, question: str, qv: np.ndarray) -> list[int]:
        return self._order(fusion.rrf([self._vectors @ qv, self._bm25.scores(question)]))

    def _order(self, scores: np.ndarray) -> list[int]:
        return [int(s) for s in self._seqs[np.argsort(-scores, kind="stable")]]


def pack(ranked, by_seq: dict[int, Entry], budget: int, recent: list[int]) -> list[int]:
    """The working set's seqs, packed by the kernel's own assembly (kernel/memory.py)."""
    def item(seq: int, kind: str) -> Item:
        e = by_seq[seq]
        return Item(kind=kind, text="", tokens=e.tokens, source_ids=[f"mem:{seq}"], seq=seq,
                    group=e.group, group_tokens=e.group_tokens)
    seqs = [r[0] if isinstance(r, tuple) else r for r in ranked]
    candidates = Candidates(pinned=[], recent=[item(s, "recent") for s in recent],
                            ranked=[item(s, "memory") for s in seqs if s in by_seq], knowledge=[])
    return [i.seq for i in assemble(candidates, budget).items]


def working_set_tokens(entries: list[Entry]) -> int:
    return sum(e.tokens for e in entries) + sum({e.group: e.group_tokens
                                                 for e in entries}.values())


def evaluate(conv: Conversation, entries: list[Entry], ranked_by: dict, report_: Report,
             budget: int, question_vectors: np.ndarray) -> None:
    """Rank with every method, pack, score; the episodic method is timed end to end."""
    by_seq = {e.seq: e for e in entries}
    recent = [e.seq for e in entries[-RECENT_TURNS:]]
    for q, qv in zip(scored_questions(conv), question_vectors):
        for method, rank in ranked_by.items():
            started = time.perf_counter()
            ranked = rank(q.question, qv)
            elapsed = (time.perf_counter() - started) * 1000
            chosen = pack(ranked, by_seq, budget, recent)
            ids = [by_seq[s].meta["dia_id"] for s in chosen]
            report_.add(method, q.category, score(ids, q.evidence),
                        working_set_tokens([by_seq[s] for s in chosen]),
                        elapsed if method == "episodic" else None)


def run(conversations: list[Conversation], budget: int,
        variants: dict[str, RankConfig] | None = None) -> Report:
    from transformers import AutoTokenizer

    from vfmos_runtime.embed import load_embedder

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    embedder = load_embedder()
    memo = MemoEmbedder(embedder)
    report_ = Report()
    for conv in conversations:
        entries = build_entries(conv, tokenizer)
        vectors = embed_cached(embedder, [e.text for e in entries])
        index = EpisodicIndex(embedder)
        index.add(entries, vectors)
        base = Baselines(entries, vectors)
        questions = scored_questions(conv)
        qvs = embed_cached(embedder, [q.question for q in questions])
        now = conv.now
        methods = {"recency": base.recency, "dense": base.dense, "bm25": base.bm25,
                   "rrf": base.rrf,
                   # The real path: the question is embedded inside rank(), and timed.
                   "episodic": lambda text, qv: index.rank(text, now=now)}
        for name, cfg in (variants or {}).items():
            variant = EpisodicIndex(memo, cfg)
            variant.add(entries, vectors)
            methods[f"episodic:{name}"] = lambda text, qv, v=variant: v.rank(text, now=now)
        evaluate(conv, entries, methods, report_, budget, qvs)
    return report_


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.locomo", description=__doc__)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="the first 2 conversations only")
    parser.add_argument("--variants", action="store_true",
                        help="also rank with each signal left out (an ablation table)")
    args = parser.parse_args(argv)
    conversations = load_conversations(args.data)[: 2 if args.quick else None]
    report_ = run(conversations, args.budget, VARIANTS if args.variants else None)
    baselines = {"recency": "recency", "dense": "dense", "bm25": "bm25", "rrf": "rrf"}
    report(f"LoCoMo evidence recall at {args.budget} tokens, categories 1-4 "
           f"({len(conversations)} conversations)", report_.rows(), Report.HEADER,
           report_.figures("episodic", baselines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
