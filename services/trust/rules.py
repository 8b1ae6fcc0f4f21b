"""Tenant rules as system-1 checks (denied topics, regexes, required disclaimers, escalation
rules with amounts) and a leak check by overlap with protected texts. Pure logic: no wire."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import regex

from services.trust.checks import Finding, Span, Text
from services.trust.policy import DisclaimerRule, EscalationRule, Policy, RegexRule, TopicRule

# What a rule's finding asks the service to do (Finding.details["action"]).
REFUSE, REDACT, ESCALATE, REVISE, APPEND, SYSTEM2 = (
    "refuse", "redact", "escalate", "revise", "append", "system2")

STOPWORDS = frozenset("""a an and are as at be but by can do does for from has have how i in
into is it its me my no not of on or our own so than that the their them then there these
they this to us was we were what when where which who why will with you your about any all
questions question asking ask talk talking discuss discussing request requests""".split())

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'-]*")
# How long one tenant pattern may run on one text. A pattern that backtracks without end
# on some text ("(a|aa)+$" on forty a's and a "!": minutes with `re`) must not hold a worker
# thread of the service every tenant shares.
PATTERN_TIMEOUT_S = 0.05


class PatternTimeout(Exception):
    """A tenant pattern ran out of its time on a text; `rule` names it."""

    def __init__(self, rule: str):
        super().__init__(rule)
        self.rule = rule


class TenantPattern:
    """A tenant's regular expression (Python `re` syntax: the `regex` package's VERSION0),
    run with a time limit of PATTERN_TIMEOUT_S per text."""

    def __init__(self, pattern: str, rule: str, ignore_case: bool = False):
        self.pattern = pattern
        self.rule = rule
        self._compiled = regex.compile(
            pattern, regex.VERSION0 | (regex.IGNORECASE if ignore_case else 0))

    def search(self, text: str):
        try:
            return self._compiled.search(text, timeout=PATTERN_TIMEOUT_S)
        except TimeoutError:
            raise PatternTimeout(self.rule) from None

    def finditer(self, text: str) -> list:
        try:
            return list(self._compiled.finditer(text, timeout=PATTERN_TIMEOUT_S))
        except TimeoutError:
            raise PatternTimeout(self.rule) from None


def stem(word: str) -> str:
    """A light English stemmer: enough that 'refund' meets 'refunds' and 'refunded'."""
    w = word.lower().strip("'-")
    if w.endswith("'s"):
        w = w[:-2]
    for suffix, keep in (("ies", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3 and not w.endswith("ss"):
            return w[: len(w) - len(suffix)] + keep
    return w


def stems(text: str) -> list[str]:
    return [stem(m.group()) for m in _WORD.finditer(text)]


def content_stems(text: str) -> list[str]:
    seen, out = set(), []
    for m in _WORD.finditer(text):
        if m.group().lower() in STOPWORDS:
            continue
        s = stem(m.group())
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


# ---- amounts with currencies ---------------------------------------------------------------

CURRENCIES = {"$": "USD", "us$": "USD", "usd": "USD", "dollar": "USD", "dollars": "USD",
              "€": "EUR", "eur": "EUR", "euro": "EUR", "euros": "EUR",
              "£": "GBP", "gbp": "GBP", "pound": "GBP", "pounds": "GBP",
              "¥": "JPY", "jpy": "JPY", "yen": "JPY", "chf": "CHF", "francs": "CHF",
              "cad": "CAD", "c$": "CAD", "aud": "AUD", "a$": "AUD", "nok": "NOK", "sek": "SEK",
              "dkk": "DKK", "kr": "NOK", "inr": "INR", "₹": "INR", "rupees": "INR",
              "cny": "CNY", "rmb": "CNY", "yuan": "CNY", "pln": "PLN", "zł": "PLN"}
_CUR = "|".join(sorted((re.escape(c) for c in CURRENCIES), key=len, reverse=True))
_NUM = r"\d{1,3}(?:[,.\u00a0]\d{3})+(?:[.,]\d{1,2})?|\d+(?:[.,]\d{1,2})?"
_SCALE = r"(?:\s*(?P<s{n}>k|thousand|m|million|bn|billion)\b)?"
AMOUNT = re.compile(
    rf"(?<![A-Za-z])(?P<pre>{_CUR})\s?(?P<n1>{_NUM}){_SCALE.format(n=1)}"
    rf"|(?<![\d.,])(?P<n2>{_NUM}){_SCALE.format(n=2)}\s?(?P<post>{_CUR})(?![A-Za-z])",
    re.IGNORECASE)
_SCALES = {"k": 1e3, "thousand": 1e3, "m": 1e6, "million": 1e6, "bn": 1e9, "billion": 1e9}


@dataclass(frozen=True)
class Amount:
    value: float
    currency: str
    start: int
    end: int


def parse_number(raw: str) -> float:
    """'1,200.50' and '1.200,50' are both 1200.5; a lone separator before three digits groups
    thousands ('1.500' = 1500), before one or two it is the decimal mark."""
    raw = raw.replace("\u00a0", " ").replace(" ", "")
    if "," in raw and "." in raw:
        decimal = "," if raw.rfind(",") > raw.rfind(".") else "."
        other = "." if decimal == "," else ","
        return float(raw.replace(other, "").replace(decimal, "."))
    for sep in (",", "."):
        if sep in raw:
            head, _, tail = raw.rpartition(sep)
            if raw.count(sep) > 1 or len(tail) == 3:
                return float(raw.replace(sep, ""))
            return float(head.replace(sep, "") + "." + tail)
    return float(raw)


def amounts(text: str) -> list[Amount]:
    """Every amount of money with a currency sign, code or word in `text`."""
    found = []
    for m in AMOUNT.finditer(text):
        number = m.group("n1") or m.group("n2")
        sign = (m.group("pre") or m.group("post")).lower()
        scale = (m.group("s1") or m.group("s2") or "").lower()
        try:
            value = parse_number(number) * _SCALES.get(scale, 1.0)
        except ValueError:
            continue
        found.append(Amount(value, CURRENCIES.get(sign, ""), m.start(), m.end()))
    return found


# ---- the tenant's rules, compiled once per policy -------------------------------------------

def _finding(rule: str, score: float, reason: str, action: str, spans=(), started=0.0,
             **details) -> Finding:
    return Finding("rules", score, reason, tuple(spans),
                   elapsed_ms=(time.perf_counter() - started) * 1e3 if started else 0.0,
                   details={"rule": rule, "action": action, **details})


@dataclass
class _Topic:
    rule: TopicRule
    patterns: tuple[re.Pattern, ...]
    words: tuple[str, ...]
    vector: np.ndarray | None


def similarity_score(cosine: float) -> float:
    """MiniLM cosine between a text and a topic's description, spread onto 0..1: unrelated
    texts sit near 0.1-0.25, a paraphrase of the description above 0.6."""
    return float(min(1.0, max(0.0, (cosine - 0.25) / 0.4)))


class TenantRules:
    """A policy's rules, compiled: regexes once, each topic description embedded once (when an
    embedder is given; otherwise topics match on patterns and on the description's words)."""

    def __init__(self, policy: Policy, embed: Callable[[list[str]], np.ndarray] | None = None):
        self.policy = policy
        self._embed = embed
        vectors = embed([t.description for t in policy.denied_topics]) \
            if embed is not None and policy.denied_topics else None
        self.topics = [
            _Topic(t, tuple(TenantPattern(p, f"denied_topics.{t.name}", True)
                            for p in t.patterns),
                   tuple(content_stems(t.description)),
                   None if vectors is None else vectors[i])
            for i, t in enumerate(policy.denied_topics)]
        self.regexes = [(r, TenantPattern(r.pattern, f"regexes.{r.name}"))
                        for r in policy.regexes]
        self.disclaimers = [(d, TenantPattern(d.when, f"required_disclaimers.{d.name}", True))
                            for d in policy.disclaimers]
        self.escalations = [(e, TenantPattern(e.pattern, f"escalation_rules.{e.name}", True)
                             if e.pattern else None, tuple(stems(e.topic)))
                            for e in policy.escalations]
        self.high_stakes = [(t, tuple(stems(t))) for t in policy.high_stakes_topics]

    @property
    def uses_embeddings(self) -> bool:
        return self._embed is not None and bool(self.topics)

    # the question
    def screen_question(self, text: Text) -> list[Finding]:
        words = set(stems(text.value))
        found = [self.topic(t, text, words) for t in self.topics]
        found += self._regexes(text.value, "input")
        found += self._escalations(text.value, words, "question")
        for phrase, needed in self.high_stakes:
            if needed and all(w in words for w in needed):
                found.append(_finding(f"high_stakes_topics.{phrase}", 1.0,
                                      f"high-stakes topic '{phrase}': sent to system 2",
                                      SYSTEM2))
        return found

    def topic(self, topic: _Topic, text: Text, words: set[str]) -> Finding:
        started = time.perf_counter()
        rule = f"denied_topics.{topic.rule.name}"
        for pattern in topic.patterns:
            m = pattern.search(text.value)
            if m:
                return _finding(rule, 1.0, f"denied topic '{topic.rule.name}': matches "
                                f"/{pattern.pattern}/", REFUSE, [Span(m.start(), m.end(),
                                                                      rule)], started)
        matched = [w for w in topic.words if w in words]
        keyword = len(matched) / min(2, len(topic.words)) if topic.words else 0.0
        if len(matched) == 1 and len(topic.words) > 1:
            keyword = 0.3  # one shared word is a hint, below the default uncertain band
        keyword = min(1.0, keyword)
        semantic = 0.0
        if topic.vector is not None:
            semantic = similarity_score(float(np.dot(text.embedding, topic.vector)))
        score = max(keyword, semantic)
        how = f"words {', '.join(matched)}" if keyword >= semantic else \
            f"similar to its description ({semantic:.2f})"
        return _finding(rule, score, f"denied topic '{topic.rule.name}': {how}"
                        if score > 0 else "", REFUSE, started=started)

    def screen_item(self, text: str) -> list[Finding]:
        """A working-set item: only the input regexes apply (topics are about the question)."""
        return self._regexes(text, "input")

    # the answer
    def check_output(self, text: str, final: bool, question: str = "") -> list[Finding]:
        found = self._regexes(text, "output")
        found += self._escalations(text, set(stems(text)), "answer")
        if final:
            found += self._disclaimers(question, text)
        return found

    def _regexes(self, text: str, side: str) -> list[Finding]:
        found = []
        for rule, pattern in self.regexes:
            if rule.on not in (side, "both"):
                continue
            spans = [Span(m.start(), m.end(), f"regexes.{rule.name}",
                          rule.replacement if rule.action == REDACT else "")
                     for m in pattern.finditer(text) if m.end() > m.start()]
            if spans:
                found.append(_finding(f"regexes.{rule.name}", 1.0,
                                      f"regex '{rule.name}' matches ({len(spans)}x)",
                                      rule.action, spans))
        return found

    def _escalations(self, text: str, words: set[str], side: str) -> list[Finding]:
        found = []
        for rule, pattern, topic in self.escalations:
            if rule.on not in (side, "both"):
                continue
            fired = self._fires(rule, pattern, topic, text, words)
            if fired:
                found.append(_finding(f"escalation_rules.{rule.name}", 1.0,
                                      f"escalation rule '{rule.name}': {fired}", ESCALATE,
                                      escalation=rule.name,
                                      holding_reply=rule.holding_reply))
        return found

    @staticmethod
    def _fires(rule: EscalationRule, pattern, topic, text: str, words: set[str]) -> str:
        if pattern is not None and not pattern.search(text):
            return ""
        if topic and not all(w in words for w in topic):
            return ""
        why = f"about '{rule.topic}'" if rule.topic else f"matches /{rule.pattern}/"
        if rule.amount_above is None:
            return why
        over = [a for a in amounts(text) if a.value > rule.amount_above
                and (not rule.currency or a.currency == rule.currency)]
        if not over:
            return ""
        a = over[0]
        return f"{why}, amount {a.value:g} {a.currency} above {rule.amount_above:g}"

    def _disclaimers(self, question: str, answer: str) -> list[Finding]:
        found = []
        for rule, when in self.disclaimers:
            if not (when.search(question) or when.search(answer)):
                continue
            if _normal(rule.text) in _normal(answer):
                continue
            verb = "appended" if rule.action == APPEND else "missing: answer to be revised"
            found.append(_finding(f"required_disclaimers.{rule.name}", 1.0,
                                  f"disclaimer '{rule.name}' {verb}", rule.action,
                                  text=rule.text))
        return found


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


# ---- leaks of protected texts, by overlap --------------------------------------------------

_TOKEN = re.compile(r"\w+")
_SECRETISH = re.compile(r"(?=[A-Za-z0-9_\-]*\d)(?=[A-Za-z0-9_\-]*[A-Za-z])[A-Za-z0-9_\-]{10,}")


class OverlapLeakCheck:
    """Finds protected text (a system prompt, secrets of the pinned context) in an answer
    without a learned model: the longest run of words the answer shares with a protected
    text, and any secret-looking token of it (letters and digits, 10+ characters) verbatim.
    Score: the run over `full_run` words (1.0 at or above it), 1.0 for a secret."""

    name = "leak_overlap"
    reads_embedding = False  # words only: it judges an answer's first few words too

    def __init__(self, full_run: int = 12, min_run: int = 3):
        self.full_run, self.min_run = full_run, min_run

    def check_output(self, output: Text, protected: list[str]) -> Finding:
        started = time.perf_counter()
        out_tokens = [(m.group().lower(), m.start(), m.end())
                      for m in _TOKEN.finditer(output.value)]
        best, best_span, secret = 0, None, None
        for text in protected:
            if not text.strip():
                continue
            for m in _SECRETISH.finditer(text):
                at = output.value.find(m.group())
                if at >= 0:
                    secret = Span(at, at + len(m.group()), "secret")
                    break
            run, span = _longest_run(out_tokens, [t.lower() for t in _TOKEN.findall(text)])
            if run > best:
                best, best_span = run, span
            if secret:
                break
        elapsed = (time.perf_counter() - started) * 1e3
        if secret is not None:
            return Finding(self.name, 1.0, "a secret of the protected context appears "
                           "verbatim", (secret,), elapsed_ms=elapsed)
        if best < self.min_run or best_span is None:
            return Finding(self.name, 0.0, "", elapsed_ms=elapsed)
        score = min(1.0, best / self.full_run)
        return Finding(self.name, score, f"{best} words in a row from a protected text",
                       (best_span,), elapsed_ms=elapsed)


def _longest_run(out_tokens: list[tuple[str, int, int]], protected: list[str]
                 ) -> tuple[int, Span | None]:
    """The longest run of consecutive answer words that also occur consecutively in the
    protected text, with its character span in the answer. Linear in the answer's length:
    bigrams of the protected text in a set, then the longest chain of matching bigrams."""
    if len(protected) == 1:
        hits = [(s, e) for w, s, e in out_tokens if w == protected[0]]
        return (1, Span(hits[0][0], hits[0][1], "protected")) if hits else (0, None)
    grams = {(protected[i], protected[i + 1]) for i in range(len(protected) - 1)}
    best, best_at, run = 0, None, 0
    for i in range(1, len(out_tokens)):
        if (out_tokens[i - 1][0], out_tokens[i][0]) in grams:
            run += 1
            if run + 1 > best:
                best, best_at = run + 1, (i - run, i)
        else:
            run = 0
    if best_at is None:
        return 0, None
    first, last = best_at
    return best, Span(out_tokens[first][1], out_tokens[last][2], "protected")


def apply_spans(text: str, spans: list[Span]) -> str:
    """`text` with every span that has a replacement replaced (overlaps: the earliest wins)."""
    out, at = [], 0
    for span in sorted((s for s in spans if s.replacement), key=lambda s: (s.start, -s.end)):
        if span.start < at:
            continue
        out.append(text[at:span.start])
        out.append(span.replacement)
        at = span.end
    out.append(text[at:])
    return "".join(out)
