"""Lexical retrieval: BM25 (the bm25s library) over our own tokenisation, shared by all indexes."""

from __future__ import annotations

import re

import numpy as np

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# A short list: BM25's idf already discounts common words; these only add noise to queries.
STOPWORDS = frozenset("""a an and are as at be been but by did do does for from had has have
he her hers him his how i if in into is it its me my of on or our she so than that the their
them then there these they this to was we were what when where which who whom why will with
would you your yours""".split())


class Tokenizer:
    """Lower-case words, stop words dropped, English stemming when PyStemmer is installed."""

    def __init__(self, stem: bool = True):
        self._stemmer = None
        if stem:
            try:
                import Stemmer  # PyStemmer

                self._stemmer = Stemmer.Stemmer("english")
            except ImportError:
                self._stemmer = None

    def __call__(self, text: str) -> list[str]:
        words = [w.replace("'s", "") for w in _WORD.findall(text.lower())]
        words = [w for w in words if w and w not in STOPWORDS]
        if self._stemmer is not None:
            words = self._stemmer.stemWords(words)
        return words


class BM25Index:
    """A BM25 index over a list of texts; rebuilt (cheaply) when texts are added."""

    def __init__(self, tokenizer: Tokenizer | None = None, k1: float = 1.5, b: float = 0.75):
        self.tokenize = tokenizer or Tokenizer()
        self._k1, self._b = k1, b
        self._docs: list[list[str]] = []
        self._bm25 = None
        self._df: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self._docs)

    def add(self, texts: list[str]) -> None:
        """Add in place: callers that search meanwhile from other threads use `extended`."""
        self._docs.extend(self.tokenize(t) for t in texts)
        self._bm25 = None  # rebuilt on the next query
        self._df = None

    def extended(self, texts: list[str]) -> "BM25Index":
        """A new index of these documents and the texts; this one is left as it is, so a
        reader building its scores can never store them over a newer corpus."""
        new = BM25Index(self.tokenize, self._k1, self._b)
        new._docs = self._docs + [self.tokenize(t) for t in texts]
        return new

    def _index(self):
        import bm25s

        if self._bm25 is None:
            bm25 = bm25s.BM25(k1=self._k1, b=self._b)
            # bm25s refuses an empty corpus vocabulary; a placeholder token keeps it well-formed.
            bm25.index([d or ["\x00"] for d in self._docs], show_progress=False)
            self._bm25 = bm25
        return self._bm25

    @property
    def docs(self) -> list[list[str]]:
        """Each document's terms, as tokenized."""
        return self._docs

    def idf(self, term: str) -> float:
        """Inverse document frequency (BM25's, always positive)."""
        if self._df is None:
            self._df = {}
            for doc in self._docs:
                for t in set(doc):
                    self._df[t] = self._df.get(t, 0) + 1
        n, df = len(self._docs), self._df.get(term, 0)
        return float(np.log(1 + (n - df + 0.5) / (df + 0.5)))

    def scores(self, query: str) -> np.ndarray:
        """One BM25 score per document (0 for documents sharing no term with the query)."""
        return self.term_scores(self.tokenize(query))

    def term_scores(self, terms: list[str]) -> np.ndarray:
        """Scores for terms already tokenized (repeats count, as in a longer query)."""
        if not self._docs:
            return np.zeros(0, dtype=np.float32)
        if not terms:
            return np.zeros(len(self._docs), dtype=np.float32)
        return np.asarray(self._index().get_scores(terms), dtype=np.float32)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        scores = self.scores(query)
        if scores.size == 0:
            return []
        top = np.argsort(-scores, kind="stable")[:k]
        return [(int(i), float(scores[i])) for i in top if scores[i] > 0]
