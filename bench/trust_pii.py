"""PII section of `python -m bench trust`: entity-level F1 of vfm-trustd's PII check on the
presidio-research synthetic set, beside regexes alone and presidio's defaults on the same spaCy
pipeline, measured in the same run. `python -m bench.trust_pii [--data-dir DIR] [--quick]` runs it
alone and prints the per-entity table.

Scoring (README §5 of the data): a prediction is right when its (start, end, type) equals a gold
span's after mapping the generator's types onto ours (GOLD_TO_OURS, reported in the figures).
Gold types with no counterpart among our entities (TITLE, NRP, AGE, ORGANIZATION, DOMAIN_NAME)
are left out, and so is any prediction overlapping one of them: it is neither right nor wrong.
Also reported: the same with any overlap counting, the type-agnostic "any PII" variant, token-level
F1 (presidio-research's evaluator counts tokens) and the share of gold PII characters masked.

The learned NER (services.trust.ner) was trained on part of the dev split's sentence templates;
the records whose text it was trained on (hashes in its weights) are left out, so every figure is
on sentence shapes it never saw. Another split of the set is scored whole. Beside it: the same
check on spaCy's small NER and address rules, what it used before."""

from __future__ import annotations

import gzip
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.common import percentile

FILE = "pii_dev.jsonl.gz"
GOAL_F1 = 0.85
GOLD_TO_OURS = {"PERSON": "PERSON", "GPE": "LOCATION", "STREET_ADDRESS": "LOCATION",
                "ZIP_CODE": "LOCATION", "DATE_TIME": "DATE_TIME", "CREDIT_CARD": "CREDIT_CARD",
                "PHONE_NUMBER": "PHONE_NUMBER", "EMAIL_ADDRESS": "EMAIL_ADDRESS",
                "IBAN_CODE": "IBAN_CODE", "US_SSN": "US_SSN", "IP_ADDRESS": "IP_ADDRESS"}
QUICK_RECORDS = 250

Triple = tuple[int, int, str]


@dataclass
class Record:
    text: str
    gold: list[Triple]
    ignored: list[tuple[int, int]]  # gold spans of types we do not detect


def load(path: Path, quick: bool, trained: frozenset[str] = frozenset()) -> list[Record]:
    """The records of the file, less those whose text the learned NER was trained on (hashes in
    its weights' meta; on another split of the set none are)."""
    from services.trust.train_ner import text_hash

    records = []
    with gzip.open(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            if text_hash(row["text"]) in trained:
                continue
            gold = [(s["start"], s["end"], GOLD_TO_OURS[s["type"]]) for s in row["spans"]
                    if s["type"] in GOLD_TO_OURS]
            ignored = [(s["start"], s["end"]) for s in row["spans"]
                       if s["type"] not in GOLD_TO_OURS]
            records.append(Record(row["text"], gold, ignored))
    if quick and len(records) > QUICK_RECORDS:  # spread over the file: every template's kind
        records = records[::max(1, len(records) // QUICK_RECORDS)][:QUICK_RECORDS]
    return records


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def prf(self) -> tuple[float, float, float]:
        p = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        r = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        return p, r, (2 * p * r / (p + r) if p + r else 0.0)


@dataclass
class Score:
    exact: dict[str, Counts] = field(default_factory=dict)  # per type, exact (start, end, type)
    overlap: Counts = field(default_factory=Counts)  # same type, any overlap
    any_pii: Counts = field(default_factory=Counts)  # exact (start, end), any type
    tokens: Counts = field(default_factory=Counts)  # token-level, typed
    gold_chars: int = 0
    masked_chars: int = 0
    ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # this thread's CPU: steadier on a busy host

    def micro(self) -> Counts:
        total = Counts()
        for c in self.exact.values():
            total.tp, total.fp, total.fn = total.tp + c.tp, total.fp + c.fp, total.fn + c.fn
        return total


_TOKEN = re.compile(r"\w+|[^\w\s]")


def _token_labels(text: str, spans: list[Triple]) -> list[str]:
    labels = []
    for m in _TOKEN.finditer(text):
        label = "O"
        for start, end, kind in spans:
            if start <= m.start() and m.end() <= end:
                label = kind
        labels.append(label)
    return labels


def score_record(rec: Record, pred: list[Triple], score: Score) -> None:
    pred = [p for p in pred if not any(_overlaps(p[:2], ig) for ig in rec.ignored)]
    gold, got = set(rec.gold), set(pred)
    for kind in {k for *_, k in gold | got}:
        c = score.exact.setdefault(kind, Counts())
        g = {t for t in gold if t[2] == kind}
        p = {t for t in got if t[2] == kind}
        c.tp += len(g & p)
        c.fp += len(p - g)
        c.fn += len(g - p)
    matched = sum(any(_overlaps(g[:2], p[:2]) and g[2] == p[2] for p in got) for g in gold)
    score.overlap.tp += matched
    score.overlap.fn += len(gold) - matched
    score.overlap.fp += sum(not any(_overlaps(g[:2], p[:2]) and g[2] == p[2] for g in gold)
                            for p in got)
    gold_any, pred_any = {t[:2] for t in gold}, {t[:2] for t in got}
    score.any_pii.tp += len(gold_any & pred_any)
    score.any_pii.fp += len(pred_any - gold_any)
    score.any_pii.fn += len(gold_any - pred_any)
    for g, p in zip(_token_labels(rec.text, rec.gold), _token_labels(rec.text, pred)):
        if g != "O" and g == p:
            score.tokens.tp += 1
        else:
            score.tokens.fp += p != "O"
            score.tokens.fn += g != "O"
    for start, end, _ in rec.gold:
        score.gold_chars += end - start
        score.masked_chars += sum(any(s <= i < e for s, e, _ in pred) for i in range(start, end))


def run(records: list[Record], predict: Callable[[str], list[Triple]]) -> Score:
    score = Score()
    for rec in records:
        started, cpu = time.perf_counter(), time.thread_time()
        pred = predict(rec.text)
        score.ms.append((time.perf_counter() - started) * 1000.0)
        score.cpu_ms.append((time.thread_time() - cpu) * 1000.0)
        score_record(rec, pred, score)
    return score


# --- the methods -------------------------------------------------------------------------------

_REGEXES = {
    "EMAIL_ADDRESS": r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
    "IBAN_CODE": r"\b[A-Za-z]{2}\d{2}[A-Za-z0-9]{11,30}\b",
    "CREDIT_CARD": r"\b(?:\d[ -]?){12,18}\d\b",
    "US_SSN": r"\b\d{3}-\d{2}-\d{4}\b",
    "IP_ADDRESS": r"\b(?:\d{1,3}\.){3}\d{1,3}\b",
    "PHONE_NUMBER": r"(?:\+\d{1,3}[ .-]?)?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b",
    "DATE_TIME": r"\b\d{1,2}/\d{1,2}/\d{2,4}\b|\b\d{4}-\d{2}-\d{2}\b",
}


def regex_baseline(text: str) -> list[Triple]:
    """Keyword/regex rules alone: the structured entities, no names or places."""
    taken: list[Triple] = []
    for kind, pattern in _REGEXES.items():
        for m in re.finditer(pattern, text):
            if not any(_overlaps((m.start(), m.end()), t[:2]) for t in taken):
                taken.append((m.start(), m.end(), kind))
    return taken


def presidio_default_sm():
    """presidio's default analyzer (all its recognizers, its context enhancer, the full spaCy
    pipeline) on our pinned small pipeline instead of en_core_web_lg, which cannot be installed
    offline. Its email recognizer is swapped for the offline one, which validates alike."""
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    from services.trust import pii

    engine = NlpEngineProvider(nlp_configuration={
        "nlp_engine_name": "spacy",
        "models": [{"lang_code": "en", "model_name": pii.SPACY_PACKAGE}]}).create_engine()
    analyzer = AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])
    analyzer.registry.remove_recognizer("EmailRecognizer")
    analyzer.registry.add_recognizer(pii._OfflineEmailRecognizer())

    def predict(text: str) -> list[Triple]:
        results = analyzer.analyze(text=text, language="en", entities=list(pii.ENTITIES))
        return [(r.start, r.end, r.entity_type) for r in results]
    return predict


def ours(detector, fast: bool = False):
    def predict(text: str) -> list[Triple]:
        return [(h.start, h.end, h.label) for h in detector.find(text, fast=fast)]
    return predict


# --- the section -------------------------------------------------------------------------------

QUESTIONS = "xstest_dev.jsonl"  # short questions as users type them, for the latency figure


def questions(data_dir: Path, quick: bool) -> list[str]:
    with open(Path(data_dir) / QUESTIONS) as f:
        return [json.loads(line)["text"] for line in f][: 80 if quick else None]


def timed(texts: list[str], predict: Callable[[str], list[Triple]]) -> tuple[list, list]:
    """Wall and this thread's CPU milliseconds of predict on each text (CPU time is steadier
    on a host shared with other work)."""
    for text in texts[:5]:  # warm caches, as a running daemon has them
        predict(text)
    wall, cpu = [], []
    for text in texts:
        started, cpu0 = time.perf_counter(), time.thread_time()
        predict(text)
        wall.append((time.perf_counter() - started) * 1000.0)
        cpu.append((time.thread_time() - cpu0) * 1000.0)
    return wall, cpu


def evaluate(data_dir: Path, quick: bool) -> tuple[dict, list[tuple]]:
    from services.trust.ner import load_meta
    from services.trust.pii import PiiDetector

    detector, before = PiiDetector(), PiiDetector(ner="spacy")
    trained = frozenset(load_meta()["trained_texts"])
    records = load(Path(data_dir) / FILE, quick, trained)
    if not records:
        raise SystemExit(f"trust_pii: no record of {Path(data_dir) / FILE} is unseen by the "
                         "learned NER (it was trained on all of them)")
    scores = {"ours": run(records, ours(detector)), "regex": run(records, regex_baseline),
              "presidio_sm": run(records, presidio_default_sm()),
              "spacy": run(records, ours(before))}
    benign = benign_alarms(data_dir, quick, {"ours": detector, "spacy": before})
    asked = questions(data_dir, quick)
    latency = {"ours": timed(asked, ours(detector)), "regex": timed(asked, regex_baseline),
               "fast": timed(asked, ours(detector, fast=True))}
    figures, rows = _figures(scores, latency, len(records)), _rows(scores, latency)
    if benign:
        figures["pii_benign_alarms_per_100"] = benign
        rows += [("pii", f"names/places/dates flagged per 100 benign texts: {source}",
                  counts["ours"], 0.0, counts["ours"], f"(spaCy NER: {counts['spacy']})")
                 for source, counts in benign.items()]
    return figures, rows


NER_LABELS = ("PERSON", "LOCATION", "DATE_TIME")


def benign_alarms(data_dir: Path, quick: bool, detectors: dict) -> dict[str, dict[str, float]]:
    """Per source of texts without personal data (support tickets and answers, KB FAQs,
    materials abstracts; others than the learned NER was trained on): names, places and dates
    flagged per 100 texts, by each detector. Empty when ../personas is not beside DIR."""
    from services.trust.train_ner import benign_texts

    try:
        sources = benign_texts(Path(data_dir), skip=1, scale=0.5 if quick else 1.0)
    except OSError:
        return {}
    out: dict[str, dict[str, float]] = {}
    for source, texts in sources.items():
        if not texts:
            continue
        out[source] = {}
        for name, detector in detectors.items():
            hits = sum(h.label in NER_LABELS for found in detector.find_many(texts) for h in found)
            out[source][name] = round(100.0 * hits / len(texts), 1)
    return out


def _ms(values: list[float], q: float) -> float:
    return round(percentile(values, q), 2)


def _figures(scores: dict[str, Score], latency: dict[str, tuple], n: int) -> dict:
    mine = scores["ours"]
    p, r, f1 = mine.micro().prf()
    figures = {"pii_f1": round(f1, 4), "pii_precision": round(p, 4), "pii_recall": round(r, 4),
               "pii_f1_regex": round(scores["regex"].micro().prf()[2], 4),
               "pii_f1_presidio_default_sm": round(scores["presidio_sm"].micro().prf()[2], 4),
               "pii_f1_spacy_ner": round(scores["spacy"].micro().prf()[2], 4),
               "pii_f1_overlap": round(mine.overlap.prf()[2], 4),
               "pii_f1_any_type": round(mine.any_pii.prf()[2], 4),
               "pii_f1_token": round(mine.tokens.prf()[2], 4),
               "pii_f1_token_presidio_default_sm": round(scores["presidio_sm"].tokens.prf()[2], 4),
               "pii_masked_chars": round(mine.masked_chars / max(1, mine.gold_chars), 4),
               "pii_ms_p50": _ms(mine.ms, 50), "pii_ms_p99": _ms(mine.ms, 99),
               "pii_cpu_ms_p50": _ms(mine.cpu_ms, 50), "pii_cpu_ms_p99": _ms(mine.cpu_ms, 99)}
    for name, key in (("ours", "pii_question"), ("fast", "pii_question_fast")):
        wall, cpu = latency[name]
        figures.update({f"{key}_ms_p50": _ms(wall, 50), f"{key}_ms_p99": _ms(wall, 99),
                        f"{key}_cpu_ms_p50": _ms(cpu, 50), f"{key}_cpu_ms_p99": _ms(cpu, 99)})
    figures["pii_per_entity"] = {
        kind: dict(zip(("p", "r", "f1"), (round(x, 4) for x in c.prf())), n=c.tp + c.fn)
        for kind, c in sorted(mine.exact.items())}
    figures.update({"pii_records": n, "pii_records_note": "those unseen by the learned NER",
                    "pii_matching": "exact (start, end, type) after mapping",
                    "pii_gold_to_ours": GOLD_TO_OURS})
    return figures


def _rows(scores: dict[str, Score], latency: dict[str, tuple]) -> list[tuple]:
    """(task, figure, ours, regex baseline, system 1 only, goal); PII is a system-1 check, so
    its system-1-only column is ours again. presidio's default gets a row of its own."""
    mine, regex, default = scores["ours"], scores["regex"], scores["presidio_sm"]
    masked = [s.masked_chars / max(1, s.gold_chars) for s in (mine, regex)]
    rows = [("pii", "entity F1 (exact span+type)", mine.micro().prf()[2],
             regex.micro().prf()[2], mine.micro().prf()[2], f">= {GOAL_F1}"),
            ("pii", "entity F1: presidio default, sm", default.micro().prf()[2],
             regex.micro().prf()[2], default.micro().prf()[2], "(baseline)"),
            ("pii", "entity F1: ours on spaCy sm NER", scores["spacy"].micro().prf()[2],
             regex.micro().prf()[2], scores["spacy"].micro().prf()[2], "(before)"),
            ("pii", "entity F1 (overlap)", mine.overlap.prf()[2], regex.overlap.prf()[2],
             mine.overlap.prf()[2], ""),
            ("pii", "entity F1 (any type)", mine.any_pii.prf()[2], regex.any_pii.prf()[2],
             mine.any_pii.prf()[2], ""),
            ("pii", "token F1", mine.tokens.prf()[2], regex.tokens.prf()[2],
             mine.tokens.prf()[2], ""),
            ("pii", "token F1: presidio default, sm", default.tokens.prf()[2],
             regex.tokens.prf()[2], default.tokens.prf()[2], "(baseline)"),
            ("pii", "gold PII chars masked", masked[0], masked[1], masked[0], "")]
    for q in (50, 99):
        rows += [("pii", f"ms per question p{q}", _ms(latency["ours"][0], q),
                  _ms(latency["regex"][0], q), _ms(latency["ours"][0], q), "few ms"),
                 ("pii", f"CPU ms per question p{q}", _ms(latency["ours"][1], q),
                  _ms(latency["regex"][1], q), _ms(latency["ours"][1], q), "few ms"),
                 ("pii", f"ms per question p{q}, fast path", _ms(latency["fast"][0], q),
                  _ms(latency["regex"][0], q), _ms(latency["fast"][0], q), "few ms")]
    gold_kinds = {k for k, c in mine.exact.items() if c.tp + c.fn + c.fp}
    for kind in sorted(gold_kinds | {k for k, c in regex.exact.items() if c.tp + c.fn}):
        ours_f1 = mine.exact.get(kind, Counts()).prf()[2]
        rows.append(("pii", f"F1 {kind}", ours_f1,
                     regex.exact.get(kind, Counts()).prf()[2], ours_f1, ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    from bench.trust import run_section

    return run_section("trust_pii", "trust: PII (Presidio synthetic set)", evaluate, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
