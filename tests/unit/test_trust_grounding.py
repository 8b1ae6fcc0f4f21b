"""Grounding (system 2): an answer supported by its sources scores low, one with a fabricated
entity or one judged against sources about something else scores high, and the unsupported
words are named. Runs the packaged MiniLM, the pinned spaCy pipeline and the shipped weights."""

from __future__ import annotations

import numpy as np
import pytest

from services.trust.grounding import FEATURES, SIGNS, Combiner, GroundingCheck
from services.trust.train_grounding import fit, save

SOURCES = ["The Oberoi Group is a hotel company with its head office in Delhi. It was founded "
           "in 1934 and runs more than thirty luxury hotels.",
           "Mohan Singh Oberoi, the founder of the group, was born in Bhaun, in the Punjab."]
QUESTION = "In what city does the hotel company founded by Mohan Singh Oberoi have its head office?"


@pytest.fixture(scope="module")
def check() -> GroundingCheck:
    from vfmos_runtime.embed import load_embedder

    return GroundingCheck(load_embedder().embed)


def test_a_supported_answer_scores_low(check):
    for answer in ("Delhi", "The Oberoi Group has its head office in Delhi."):
        finding = check.check(answer, SOURCES, QUESTION)
        assert finding.system == 2 and finding.check == "grounding"
        assert finding.score < check.combiner.threshold, (answer, finding.reason)
        assert finding.spans == ()


def test_a_fabricated_entity_scores_high_and_is_named(check):
    answer = "The head office is in Mumbai, where Ratan Tata runs it."
    finding = check.check(answer, SOURCES, QUESTION)
    assert finding.score >= check.combiner.threshold, finding.reason
    named = [answer[s.start:s.end] for s in finding.spans]
    assert "Mumbai" in named and "Ratan Tata" in named
    assert all(s.label == "unsupported" for s in finding.spans)
    assert "Mumbai" in finding.reason


def test_sources_about_another_question_do_not_support_a_right_answer(check):
    elsewhere = ["House of Anubis is a mystery television series developed for Nickelodeon. "
                 "It first aired in September 2006 and its last episode was shown in 2009."]
    supported = check.check("Delhi", SOURCES, QUESTION)
    swapped = check.check("Delhi", elsewhere, QUESTION)
    assert swapped.score >= check.combiner.threshold > supported.score
    assert [(s.start, s.end, s.label) for s in swapped.spans] == [(0, 5, "unsupported")]


def test_no_sources_is_unsupported_and_an_empty_answer_is_not(check):
    assert check.check("Delhi", [], QUESTION).score == 1.0
    assert check.check("Delhi", ["  "], QUESTION).score == 1.0
    assert check.check("   ", SOURCES, QUESTION).score == 0.0


def test_without_a_question_the_answer_is_still_checked(check):
    assert check.check("The Oberoi Group has its head office in Delhi.", SOURCES).score < \
        check.check("The Oberoi Group has its head office in Lisbon, Portugal.", SOURCES).score


def test_training_holds_each_weight_to_its_sign():
    # Synthetic rows where more unsupported entities go with *grounded*: a free fit would give
    # that feature a negative weight; the trainer must not.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, len(FEATURES)))
    y = rng.random(400) < 0.5
    column = FEATURES.index("n_unsupported_entity")
    X[:, column] = np.where(y, 0.0, 3.0) + rng.normal(scale=0.1, size=400)
    combiner = fit(X, y)
    for i, name in enumerate(FEATURES):
        if SIGNS.get(name) == 1:
            assert combiner.coef[i] >= 0, name
        elif SIGNS.get(name) == -1:
            assert combiner.coef[i] <= 0, name


def test_weights_for_other_features_are_refused(tmp_path):
    path = tmp_path / "g.npz"
    combiner = Combiner(np.zeros(len(FEATURES)), np.ones(len(FEATURES)),
                        np.zeros(len(FEATURES)), 0.0, 0.5)
    save(combiner, path)
    assert Combiner.load(path).threshold == 0.5
    with np.load(path) as data:
        arrays = dict(data)
    arrays["features"] = np.array(FEATURES[:-1] + ("something_else",))
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="train_grounding"):
        Combiner.load(path)


def test_a_large_working_set_embeds_a_bounded_number_of_sentences(check):
    from services.trust.grounding import MAX_SENTENCES

    seen: list[int] = []

    def counting(texts):
        seen.append(len(texts))
        return check._embed(texts)

    filler = [f"Paragraph {i} is about the weather in a town with {i} bakeries."
              for i in range(120)]
    large = GroundingCheck(counting, check.combiner, check._nlp)
    finding = large.check("Delhi", filler + SOURCES, QUESTION)
    assert seen and max(seen) <= MAX_SENTENCES + 3  # the answer, the question, both together
    assert finding.score < check.combiner.threshold, finding.reason
