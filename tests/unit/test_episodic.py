"""Episodic ranking, with a tiny bag-of-words embedder (no model)."""

import zlib
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from services.data.episodic import (Entry, EpisodicIndex, RankConfig, day_header, day_label,
                                   render)

DAY = datetime(2023, 5, 8, 13, 56, tzinfo=timezone.utc)


class WordHashEmbedder:
    """A real (if weak) embedder: hashed word counts, L2-normalised; shares words = similar."""

    name, dim = "wordhash", 64

    def embed(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().replace("?", " ").replace(".", " ").split():
                out[row, zlib.crc32(word.encode()) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-9)


def entry(seq, speaker, text, day=0, tokens=10):
    return Entry(seq=seq, speaker=speaker, text=text, time=DAY + timedelta(days=day),
                 meta={"dia_id": f"D{day + 1}:{seq}"}, tokens=tokens)


def conversation():
    turns = [("Caroline", "Hey Mel, how have you been lately?", 0),
             ("Melanie", "Busy with the kids and work, and you?", 0),
             ("Caroline", "I went to a support group yesterday, it was powerful.", 0),
             ("Melanie", "That sounds amazing, what happened there?", 0),
             ("Caroline", "Transgender stories, so inspiring.", 0),
             ("Melanie", "I painted a sunrise over the lake last year.", 30),
             ("Caroline", "Wow Melanie, beautiful colours!", 30),
             ("Melanie", "We went camping in the mountains with the kids.", 60),
             ("Caroline", "Camping sounds fun, Melanie!", 60),
             ("Melanie", "Pottery class is my new thing, I signed up today.", 90)]
    return [entry(i, s, t, d) for i, (s, t, d) in enumerate(turns)]


@pytest.fixture
def index():
    idx = EpisodicIndex(WordHashEmbedder())
    idx.add(conversation())
    return idx


def test_render_is_compact_and_the_day_is_a_header():
    e = entry(0, "Caroline", "I went. [shares a photo: a photo of a lake]")
    assert render(e) == "Caroline: I went. [photo: a lake]"
    assert day_label(e.time) == "8 May 2023" and day_header("8 May 2023") == "[8 May 2023]"
    assert day_label(None) == ""


def test_rank_returns_every_entry_once_best_first(index):
    ranked = index.rank("What did Melanie paint?", now=DAY + timedelta(days=90))
    seqs = [s for s, _ in ranked]
    assert sorted(seqs) == list(range(10))
    assert seqs[0] == 5
    assert [sc for _, sc in ranked] == sorted((sc for _, sc in ranked), reverse=True)
    assert len(index.rank("painted", limit=3)) == 3


def test_the_named_speakers_turns_win_over_turns_that_address_her(index):
    ranked = index.rank("Where did Melanie go camping?", now=DAY + timedelta(days=90))
    assert ranked[0][0] == 7        # "We went camping" by Melanie
    off = index.rank("Where did Melanie go camping?", config=RankConfig(
        speaker_boost=0.0, drop_names=False, neighbour_share=0.0, feedback_docs=0))
    assert off[0][0] == 8           # "Camping sounds fun, Melanie!" matches more words


def test_the_answer_after_a_matching_question_is_lifted(index):
    question = "What happened at the support group?"
    plain = index.rank(question, config=RankConfig(neighbour_share=0.0))
    spread = index.rank(question)
    position = lambda ranked, seq: [s for s, _ in ranked].index(seq)
    assert position(spread, 4) < position(plain, 4)


def test_time_window_prefers_turns_from_then(index):
    question = "Anything on 7 June 2023?"
    off = index.rank(question, config=RankConfig(time_boost=0.0, neighbour_share=0.0))
    on = index.rank(question, config=RankConfig(time_boost=6.0, neighbour_share=0.0))
    assert {s for s, _ in on[:2]} == {5, 6}   # the session of 7 June
    assert {s for s, _ in off[:2]} != {5, 6}


def test_incremental_add_matches_one_batch():
    turns = conversation()
    whole, parts = EpisodicIndex(WordHashEmbedder()), EpisodicIndex(WordHashEmbedder())
    whole.add(turns)
    parts.add(turns[:4])
    parts.add(turns[4:], WordHashEmbedder().embed([t.text for t in turns[4:]]))
    question = "What did Caroline go to?"
    assert whole.rank(question) == parts.rank(question)


def test_empty_index_ranks_nothing():
    assert EpisodicIndex(WordHashEmbedder()).rank("anything") == []


