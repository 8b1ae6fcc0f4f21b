"""Cheap features of a prompt for the router, beside its MiniLM embedding: how long it is, how
much arithmetic it holds, what kind of question it is. Pure functions of the text."""

from __future__ import annotations

import math
import re

import numpy as np

_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_SENTENCE_END = re.compile(r"[.?!](?:\s|$)")
_OPERATOR = re.compile(r"[=+*^<>×÷]")
_NEGATION = re.compile(r"\b(?:not|except|least|false|incorrect|never)\b", re.I)
_OPTION = re.compile(r"^\s*(?:[A-Ha-h][.)]|\([A-Ha-h]\))\s")
_ROMAN = re.compile(r"\b(?:I|II|III|IV)\b")
_CODE = re.compile(r"\bdef\b|\breturn\b|[{};]|\w\(\w*\)")
_WH = re.compile(r"^\s*(?:what|which|who|whom|when|where|why|how)\b", re.I)

FEATURES = ("log_words", "log_numbers", "log_max_number", "percent", "fraction", "log_sentences",
            "decimal", "log_distinct_numbers", "money", "has_operator", "log_operators",
            "negation", "log_option_words_mean", "log_option_words_max", "numeric_options",
            "log_question_words", "roman_list", "code", "log_lines", "wh_question")


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def cheap_features(prompt: str) -> np.ndarray:
    """One float32 vector, in the order of FEATURES (unscaled: the router scales them)."""
    numbers = _NUMBER.findall(prompt)
    lines = [line for line in prompt.splitlines() if line.strip()]
    options = [_OPTION.sub("", line, count=1) for line in lines if _OPTION.match(line)]
    question = "\n".join(line for line in lines if not _OPTION.match(line))
    option_words = [len(o.split()) for o in options] or [0]
    operators = len(_OPERATOR.findall(prompt))
    values = (
        math.log1p(len(prompt.split())),
        math.log1p(len(numbers)),
        math.log1p(min(max((_number(n) for n in numbers), default=0.0), 1e12)),
        "%" in prompt,
        "/" in prompt,
        math.log1p(len(_SENTENCE_END.findall(prompt))),
        any("." in n for n in numbers),
        math.log1p(len(set(numbers))),
        "$" in prompt or "€" in prompt or "£" in prompt,
        operators > 0,
        math.log1p(operators),
        bool(_NEGATION.search(question)),
        math.log1p(sum(option_words) / len(option_words)),
        math.log1p(max(option_words)),
        sum(bool(re.search(r"\d", o)) for o in options) / max(1, len(options)),
        math.log1p(len(question.split())),
        bool(_ROMAN.search(prompt)),
        bool(_CODE.search(prompt)),
        math.log1p(len(lines)),
        bool(_WH.match(question)),
    )
    return np.asarray(values, dtype=np.float32)


def feature_matrix(prompts: list[str]) -> np.ndarray:
    if not prompts:
        return np.zeros((0, len(FEATURES)), dtype=np.float32)
    return np.stack([cheap_features(p) for p in prompts])
