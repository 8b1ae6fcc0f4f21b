"""Episodic memory ranking: which remembered turns belong in the working set for a question."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from services.data import fusion
from services.data.lexical import BM25Index
from services.data.timeparse import question_window


@dataclass
class Entry:
    seq: int               # position in the process's memory, 0-based, increasing
    speaker: str
    text: str              # image turns: the text plus " [shares a photo: <caption>]"
    time: datetime | None  # UTC-aware
    meta: dict[str, str] = field(default_factory=dict)
    tokens: int = 0        # tokens of render(entry) in the model's tokenizer
    group: str = ""        # the day it was said: one header line in a context for all of them
    group_tokens: int = 0  # tokens of that header line, paid once per working set


_PHOTO = re.compile(r" \[shares a photo: (?:a photo of |a photography of |a picture of )?")


def render(entry: Entry) -> str:
    """The line that goes into the model context: 'Caroline: text'.

    Every token here is paid once per entry in every working set, so the line is terse:
    caption boilerplate cut, and the date is not repeated on every line: a context shows
    each day once, as a header over its entries (`day_label`, `day_header`)."""
    return f"{entry.speaker}: {_PHOTO.sub(' [photo: ', entry.text)}"


def day_label(when: datetime | None) -> str:
    return f"{when.day} {when:%b %Y}" if when is not None else ""


def day_header(label: str) -> str:
    """The header line a day's entries sit under in a context."""
    return f"[{label}]"


@dataclass(frozen=True)
class RankConfig:
    """The ranking's knobs; the defaults are the measured best (bench/locomo.py)."""

    dense_weight: float = 1.5
    lexical_weight: float = 1.0
    fusion: str = "minmax"            # or "z" (z-scores), "rrf" (reciprocal rank fusion)
    rrf_k: float = 60.0
    context_prev: float = 0.5         # a turn's vector plus this much of the turn before...
    context_next: float = 0.2         # ...and of the turn after (same session), renormalised
    neighbour_share: float = 0.4      # how far a turn moves toward a better neighbour's score
    reply_share: float | None = None  # the same for the turn after a hit (None: as above)
    speaker_boost: float = 1.0        # added to turns by a person the question names
    drop_names: bool = True           # match speakers' names by speaker, not by words in turns
    time_boost: float = 1.5           # added to turns inside the window the question names
    feedback_docs: int = 3            # pseudo-relevance feedback: top hits folded into the query
    feedback_weight: float = 0.5
    lexical_feedback_terms: int = 0   # RM3-like: top terms of the feedback docs added to BM25
    bm25_k1: float = 1.5
    bm25_b: float = 0.75
    lexical_speaker: bool = True      # index "speaker: text", so a named person's turns match


@dataclass(frozen=True)
class _View:
    """One consistent state of an index: every column has one row per entry, in seq order.
    Never changed once built; an add makes a new view, so a reader holding one never sees
    the columns of two states (that mix was the broadcast error under concurrent writes)."""

    seqs: tuple[int, ...]
    speakers: tuple[str, ...]
    times: np.ndarray      # unix seconds, 0 when unknown
    raw: np.ndarray        # the entries' own vectors
    vectors: np.ndarray    # ... mixed with their neighbours' (what dense scores use)
    groups: np.ndarray     # conversation number of each entry
    lexical: BM25Index


class EpisodicIndex:
    """Dense (MiniLM) and lexical (BM25) views of one process's memory, ranked together.

    Readers may rank from any thread at any time; writers (add) must take turns, which the
    owner (EpisodicMemory) ensures with its lock."""

    def __init__(self, embedder, config: RankConfig | None = None, view: _View | None = None):
        self._embedder = embedder
        self.config = config or RankConfig()
        dim = getattr(embedder, "dim", 384) if embedder else 384
        empty = np.zeros((0, dim), dtype=np.float32)
        self._view = view or _View((), (), np.zeros(0), empty, empty,
                                   np.zeros(0, dtype=np.int64),
                                   BM25Index(k1=self.config.bm25_k1, b=self.config.bm25_b))

    def __len__(self) -> int:
        return len(self._view.seqs)

    def add(self, entries: list[Entry], vectors: np.ndarray | None = None) -> None:
        """Append entries; readers see all of them or none (one reference swapped)."""
        self._view = self._extended_view(entries, vectors)

    def extended(self, entries: list[Entry],
                 vectors: np.ndarray | None = None) -> "EpisodicIndex":
        """A new index with the entries appended; this one stays as it was."""
        return EpisodicIndex(self._embedder, self.config, self._extended_view(entries, vectors))

    def _extended_view(self, entries: list[Entry], vectors: np.ndarray | None) -> _View:
        old = self._view
        if not entries:
            return old
        if vectors is None:
            vectors = self._embedder.embed([e.text for e in entries])
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(entries), -1)
        raw = np.vstack([old.raw, vectors]) if old.seqs else vectors
        times = np.concatenate([old.times, [e.time.timestamp() if e.time else 0.0
                                            for e in entries]])
        groups = _session_groups(times)
        lexical = old.lexical.extended([f"{e.speaker}: {e.text}" if self.config.lexical_speaker
                                        else e.text for e in entries])
        return _View(old.seqs + tuple(e.seq for e in entries),
                     old.speakers + tuple(e.speaker for e in entries), times, raw,
                     self._in_context(raw, groups), groups, lexical)

    def _in_context(self, raw: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """Each turn's vector with some of its neighbours': "Yes, last Friday!" means little
        alone; the question it answers says what it is about."""
        cfg = self.config
        if not (cfg.context_prev or cfg.context_next) or len(raw) < 2:
            return raw
        same = (groups[1:] == groups[:-1])[:, None]
        mixed = raw.copy()
        mixed[1:] += cfg.context_prev * np.where(same, raw[:-1], 0.0)
        mixed[:-1] += cfg.context_next * np.where(same, raw[1:], 0.0)
        return mixed / np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), 1e-9)

    def rank(self, question: str, now: datetime | None = None, limit: int = 400,
             query_vector: np.ndarray | None = None,
             config: RankConfig | None = None) -> list[tuple[int, float]]:
        """(seq, score) of the entries most worth their tokens for the question, best first."""
        view = self._view  # read once: everything below ranks this one state
        if not view.seqs:
            return []
        cfg = config or self.config
        asked = question
        if cfg.drop_names:
            question = _without_names(view, question)
        if query_vector is None:
            query_vector = self._embedder.embed([question])[0]
        scores = _scores(view, question, np.asarray(query_vector, dtype=np.float32), now, cfg,
                         asked)
        top = np.argsort(-scores, kind="stable")[:limit]
        return [(view.seqs[i], float(scores[i])) for i in top]


def _session_groups(times: np.ndarray) -> np.ndarray:
    """Turns closer than six hours apart are one conversation, for neighbour spreading."""
    breaks = np.abs(np.diff(times)) > 6 * 3600
    return np.concatenate([[0], np.cumsum(breaks)]).astype(np.int64)


def _without_names(view: _View, question: str) -> str:
    """The question less the speakers' names: turns say "Wow, John!" to John, so the
    name in a turn points away from him; who a question is about is a speaker match."""
    names = {s.split()[0] for s in set(view.speakers) if s.strip()}
    if not names:
        return question
    pattern = r"\b(" + "|".join(re.escape(n) for n in names) + r")('s|’s)?\b"
    cleaned = re.sub(pattern, " ", question, flags=re.I)
    return re.sub(r"\s+", " ", cleaned).strip() or question


def _scores(view: _View, question: str, qv: np.ndarray, now: datetime | None,
            cfg: RankConfig, asked: str) -> np.ndarray:
    dense = view.vectors @ qv
    terms = view.lexical.tokenize(question)
    lexical = view.lexical.term_scores(terms)
    scores = _fuse(dense, lexical, cfg)
    if cfg.feedback_docs and (cfg.feedback_weight or cfg.lexical_feedback_terms):
        top = np.argsort(-scores)[:cfg.feedback_docs]
        if cfg.feedback_weight:
            q2 = qv + cfg.feedback_weight * view.vectors[top].mean(axis=0)
            dense = view.vectors @ (q2 / (np.linalg.norm(q2) or 1.0))
        if cfg.lexical_feedback_terms:
            lexical = view.lexical.term_scores(terms + _feedback_terms(view, top, terms, cfg))
        scores = _fuse(dense, lexical, cfg)
    if cfg.speaker_boost:
        scores = scores + cfg.speaker_boost * _named_speakers(view, asked)
    if cfg.time_boost:
        scores = scores + cfg.time_boost * _in_window(view, question, now)
    if cfg.neighbour_share:
        scores = fusion.spread(scores, view.groups, cfg.neighbour_share, cfg.reply_share)
    return scores


def _feedback_terms(view: _View, top: np.ndarray, asked: list[str],
                    cfg: RankConfig) -> list[str]:
    """The feedback docs' terms that are rarest in the memory (idf-weighted counts)."""
    asked = set(asked)
    weights: dict[str, float] = {}
    for i in top:
        for term in set(view.lexical.docs[i]) - asked:
            weights[term] = weights.get(term, 0.0) + view.lexical.idf(term)
    best = sorted(weights, key=weights.get, reverse=True)
    return best[:cfg.lexical_feedback_terms]


def _fuse(dense: np.ndarray, lexical: np.ndarray, cfg: RankConfig) -> np.ndarray:
    weights = [cfg.dense_weight, cfg.lexical_weight]
    if cfg.fusion == "rrf":
        return fusion.rrf([dense, lexical], cfg.rrf_k, weights)
    # Min-max keeps a lone strong BM25 match from dwarfing everything (z-scores of a sparse
    # score list do), and puts the boosts below on one scale: a component's full range.
    norm = fusion.zscore if cfg.fusion == "z" else fusion.minmax
    return fusion.weighted([dense, lexical], weights, norm)


def _named_speakers(view: _View, question: str) -> np.ndarray:
    """1 for turns by a speaker whose (first) name the question mentions."""
    words = set(re.findall(r"[a-z]+", question.lower()))
    named = {s for s in set(view.speakers) if s.split() and s.split()[0].lower() in words}
    return np.array([s in named for s in view.speakers], dtype=np.float64)


def _in_window(view: _View, question: str, now: datetime | None) -> np.ndarray:
    """How strongly each turn sits in the time the question names: a turn is dated when
    it was said, after the event it tells of, so the window reaches a week past its end;
    and a named day says more than a named year."""
    window = question_window(question, now)
    if window is None:
        return np.zeros(len(view.seqs))
    width = (window.end - window.start).total_seconds()
    start = window.start.timestamp() - 2 * 86400
    end = window.end.timestamp() + max(7 * 86400, 0.25 * width)
    times = view.times
    weight = 1.0 if width <= 2 * 86400 else 0.6 if width <= 32 * 86400 else 0.3
    return weight * ((times >= start) & (times < end)).astype(np.float64)
