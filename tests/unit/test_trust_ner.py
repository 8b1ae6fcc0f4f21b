"""The PII check's learned NER: its tags decode back to the spans they were made from, the
training script's template split and value swaps keep offsets right, and the shipped tagger
finds names and addresses in sentences of shapes it was never trained on."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from services.trust import ner, train_ner
from services.trust.train_ner import split_templates, swapped, text_hash


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    from vfmos_runtime.embed import packaged_minilm_dir
    return AutoTokenizer.from_pretrained(packaged_minilm_dir())


@pytest.fixture(scope="module")
def tagger() -> ner.LearnedNer:
    return ner.LearnedNer()


FORM = "Billing address: Ana Kovač\n    28245 Puruntie 82 Apt. 595\n   LAPPEENRANTA\n    53650"
FORM_SPANS = [(FORM.index(value), FORM.index(value) + len(value), kind) for value, kind in (
    ("Ana Kovač", "PERSON"), ("28245", "STREET_ADDRESS"), ("Puruntie 82", "STREET_ADDRESS"),
    ("Apt. 595", "STREET_ADDRESS"), ("LAPPEENRANTA", "GPE"), ("53650", "ZIP_CODE"))]


def test_training_tags_decode_to_their_spans(tokenizer):
    """Adjacent entities of one type stay apart (a B tag), one entity across words and
    punctuation stays whole (I tags), and a word's later pieces follow its first."""
    tags = ner.tag_names(["GPE", "PERSON", "STREET_ADDRESS", "ZIP_CODE"])
    item = ner.encode(tokenizer, FORM, FORM_SPANS, tags)
    probs = np.zeros((len(item.ids), len(tags)), dtype=np.float32)
    for k, tag in enumerate(item.tags):
        probs[k, max(tag, 0)] = 1.0  # later pieces (-100) say O: decode must not read them
    found = ner.decode(item, probs, tags)
    assert [(e.start, e.end, e.type) for e in found] == FORM_SPANS
    assert all(e.score == 1.0 for e in found)


def test_a_later_word_piece_never_starts_an_entity(tokenizer):
    tags = ner.tag_names(["PERSON"])
    item = ner.encode(tokenizer, "Koskikatu", [], tags)
    assert item.tags[1] == 0 and all(t == -100 for t in item.tags[2:])
    probs = np.zeros((len(item.ids), len(tags)), dtype=np.float32)
    probs[:, 0] = 1.0
    probs[2:-1, tags.index("B-PERSON")] = 2.0  # only the later pieces say PERSON
    assert ner.decode(item, probs, tags) == []


def test_shape_features_see_capitals_digits_and_line_starts():
    text = "ana KOVAČ\n12"
    features = ner.shape_features(text, [(0, 3), (4, 9), (10, 12), (0, 0)])
    assert features[0][:5] == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert features[1][:2] == [1.0, 1.0]
    assert features[2][2:5] == [1.0, 1.0, 1.0]
    assert features[3] == [0.0] * ner.SHAPES


def test_the_template_split_keeps_each_template_on_one_side():
    rows = [{"text": f"t{n} {i}", "template_id": n, "spans": []}
            for n in range(20) for i in range(3)]
    train, held = split_templates(rows, 0.25, seed=7)
    assert len(held) == 15 and len(train) == 45
    assert not {r["template_id"] for r in train} & {r["template_id"] for r in held}
    assert split_templates(rows, 0.25, seed=7) == (train, held)


def test_a_swap_keeps_offsets_on_the_new_values():
    import random
    row = {"text": "Mail Ana at Puruntie 82 today", "spans": [
        {"start": 5, "end": 8, "type": "PERSON"},
        {"start": 12, "end": 23, "type": "STREET_ADDRESS"}]}
    pool = {"PERSON": ["Bartholomew Ng"], "STREET_ADDRESS": ["1 Rue X"]}
    new = swapped(row, pool, random.Random(0))
    assert new["text"] == "Mail Bartholomew Ng at 1 Rue X today"
    assert [new["text"][s["start"]:s["end"]] for s in new["spans"]] == ["Bartholomew Ng", "1 Rue X"]
    nested = {"text": "ab", "spans": [{"start": 0, "end": 2, "type": "PERSON"},
                                       {"start": 1, "end": 2, "type": "PERSON"}]}
    assert swapped(nested, pool, random.Random(0)) is None


def test_the_shipped_weights_say_what_they_were_trained_on():
    meta = ner.load_meta()
    assert {"PERSON", "STREET_ADDRESS", "GPE", "DATE_TIME"} <= set(meta["types"])
    assert len(meta["trained_texts"]) > 100
    assert 0.0 < meta["holdout"] < 1.0


def test_held_out_sentences_were_never_trained_on():
    """The records the bench scores are not in the tagger's training set: the split's held-out
    templates are, by their text hashes, outside what the weights list."""
    meta = ner.load_meta()
    path = train_ner.DEFAULT_DATA / train_ner.FILE
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    train, held = split_templates(rows, meta["holdout"], meta["seed"])
    trained = set(meta["trained_texts"])
    assert {text_hash(r["text"]) for r in train} == trained
    assert sum(text_hash(r["text"]) not in trained for r in held) > 0.8 * len(held)


def test_the_tagger_finds_a_name_and_an_address(tagger):
    text = ("Hi, this is Oksana Vlasenko. Please send the new card to 14 Kalevankatu, "
            "Apt. 3, Tampere, Finland.")
    found = tagger.find_many([text])[0]
    kinds = {(text[e.start:e.end], e.type) for e in found}
    assert ("Oksana Vlasenko", "PERSON") in kinds
    address = [e for e in found if e.type in ("STREET_ADDRESS", "GPE", "ZIP_CODE")]
    covered = {i for e in address for i in range(e.start, e.end)}
    assert all(i in covered for i in range(text.index("14 Kal"), text.index("Tampere") + 7))
    assert not any(e.start < text.index("send") for e in address)


def test_a_sentence_without_entities_gives_none(tagger):
    assert tagger.find_many(["how do i reset my password on the mobile app?", ""]) == [[], []]


def test_a_long_text_is_read_in_pieces_with_offsets_kept(tagger):
    filler = "we looked at the invoice and it was fine. " * 40
    text = filler + "Ask Oksana Vlasenko about it. " + filler
    found = tagger.find_many([text])[0]
    assert len(text) > 3 * ner.PIECE_CHARS
    people = [(text[e.start:e.end], e.type) for e in found if e.type == "PERSON"]
    assert people == [("Oksana Vlasenko", "PERSON")]


def test_training_batches_hold_every_text_once_with_similar_lengths():
    import random
    sizes = [random.Random(n).randint(5, 190) for n in range(1000)]
    out = train_ner.batches(sizes, 16, random.Random(3))
    assert sorted(i for b in out for i in b) == list(range(1000))
    assert all(len(b) <= 16 for b in out)
    spread = np.mean([max(sizes[i] for i in b) - min(sizes[i] for i in b) for b in out])
    assert spread < 30  # unsorted batches of 16 spread over ~160 pieces


def test_a_lone_text_takes_the_lean_pass_and_finds_the_same_entities(tagger):
    text = ("Hi, this is Oksana Vlasenko. Please send the new card to 14 Kalevankatu, "
            "Apt. 3, Tampere, Finland, before 3 March.")
    assert tagger._lean is not None  # the merged MiniLM is a plain BERT encoder
    lean = tagger.find_many([text])[0]
    saved, tagger._lean = tagger._lean, None
    try:
        full = tagger.find_many([text])[0]
    finally:
        tagger._lean = saved
    assert [(e.start, e.end, e.type) for e in lean] == [(e.start, e.end, e.type) for e in full]
    assert all(abs(a.score - b.score) < 1e-4 for a, b in zip(lean, full)) and lean
