"""The learned system-1 checks: small calibrated heads on the shared MiniLM embedding, stacked
with hashed character n-grams and keyword counts (moderation, harmful requests, direct and
indirect prompt injection, system-prompt and secret leaks in outputs)."""

from __future__ import annotations

import json
import math
import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.trust import keywords
from services.trust.checks import Finding, Text

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WINDOW_WORDS = 32
# An answer longer than this is scored sentence by sentence, the worst sentence deciding. The
# encoder reads 256 word pieces (about 160 words) and nothing after them, and its mean over a
# long benign answer drowns one harmful sentence: in a 380-word answer three sentences that
# score 0.89-0.99 alone scored 0.01-0.07 whole; in 24-word windows (every 16 words) 0.36-0.97
# by position; one sentence a window gives each its own score wherever it stands, and flagged
# none of 300 support answers and 300 materials abstracts.
ANSWER_WINDOW_WORDS = 40
_MIN_WINDOW_WORDS = 6       # a shorter piece (a list number, "Thanks!") joins the one before
_ANSWER_SENTENCE = re.compile(r"(?<=[.!?])\s+|\s*\n+\s*")
HASH_FEATURES = 2 ** 14      # columns per kind of n-gram
HASH_NGRAMS = (3, 5)         # characters, inside word boundaries
HASH_WORD_NGRAMS = (1, 2)    # words and word pairs; a punctuation mark counts as a word
NGRAM_FEATURES = 2 * HASH_FEATURES  # the characters' block, then the words'
_BLOCK = re.compile(r"\s*\n+\s*|\s*\|\s*")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_NON_ALNUM = re.compile(r"[\W_]+", re.UNICODE)


def windows(text: str, max_words: int = WINDOW_WORDS) -> list[str]:
    """The text cut into pieces of at most `max_words` words: lines (and `|`-separated fields)
    are never joined, sentences of one line are packed together, a longer sentence is cut by
    words. An instruction hidden in a long document is judged in a window of its own size,
    not diluted by the whole document's mean."""
    pieces: list[str] = []
    for block in _BLOCK.split(text):
        current: list[str] = []
        for sentence in _SENTENCE.split(block):
            words = sentence.split()
            while len(words) > max_words:
                if current:
                    pieces.append(" ".join(current))
                    current = []
                pieces.append(" ".join(words[:max_words]))
                words = words[max_words:]
            if current and len(current) + len(words) > max_words:
                pieces.append(" ".join(current))
                current = []
            current += words
        if current:
            pieces.append(" ".join(current))
    return pieces or [text]


def answer_windows(text: str) -> list[str]:
    """An answer's windows: its sentences (and lines), a longer one cut every
    ANSWER_WINDOW_WORDS words, a piece under _MIN_WINDOW_WORDS joined to the one before; an
    answer of ANSWER_WINDOW_WORDS words or fewer is one window, itself. A window depends only
    on the text up to its end, so as a streamed answer grows only its last windows change."""
    if len(text.split()) <= ANSWER_WINDOW_WORDS:
        return [text]
    out: list[str] = []
    for sentence in _ANSWER_SENTENCE.split(text):
        words = sentence.split()
        for i in range(0, len(words), ANSWER_WINDOW_WORDS):
            piece = words[i:i + ANSWER_WINDOW_WORDS]
            if out and len(piece) < _MIN_WINDOW_WORDS \
                    and len(out[-1].split()) + len(piece) <= ANSWER_WINDOW_WORDS:
                out[-1] += " " + " ".join(piece)
            else:
                out.append(" ".join(piece))
    return out


class WindowCache:
    """Embeddings of texts that come back (an answer's sentences at each check of the answer
    so far, a working set's items and document windows Ask after Ask), kept by (namespace,
    text), the least recently used dropped past `size`. The namespace (the tenant) keeps
    one tenant's texts from warming another's (a cache hit shows in the check's time)."""

    def __init__(self, embed, size: int = 2048):
        self.embed = embed
        self.size = size
        self._vectors: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()   # checks run on several worker threads

    def __call__(self, pieces: list[str], namespace: str = "") -> np.ndarray:
        known: dict[str, np.ndarray] = {}
        with self._lock:
            for piece in pieces:
                vector = self._vectors.get((namespace, piece))
                if vector is not None:
                    self._vectors.move_to_end((namespace, piece))
                    known[piece] = vector
        missing = [p for p in dict.fromkeys(pieces) if p not in known]
        if missing:
            known.update(zip(missing, self.embed(missing)))
            with self._lock:
                for piece in missing:
                    self._vectors[(namespace, piece)] = known[piece]
                while len(self._vectors) > self.size:
                    self._vectors.popitem(last=False)
        return np.stack([known[p] for p in pieces])


class NgramHasher:
    """Character 3-5-grams and word 1-2-grams, each kind hashed into HASH_FEATURES columns of
    its own and L2-normalised on its own: no vocabulary to ship, the same on every run.
    Character grams carry spelling (misspelt, split or foreign words); word pairs carry the
    phrasing of a request ("ignore the", "access granted", "my password"), which character
    grams inside one word cannot see.

    The features are scikit-learn's HashingVectorizer's (binary, l2, murmurhash3 of each
    gram; a test holds the two equal), computed without its per-call validation and with
    each gram's column remembered: most of a text's grams were seen before. A short text
    took 0.44 ms in the vectorizer and takes 0.05 ms here."""

    MEMO_SIZE = 1 << 18     # grams whose column is remembered; the memo starts over past it

    def __init__(self):
        from sklearn.feature_extraction.text import HashingVectorizer
        common = dict(n_features=HASH_FEATURES, alternate_sign=False, binary=True, norm="l2",
                      lowercase=True)
        self._chars = HashingVectorizer(analyzer="char_wb", ngram_range=HASH_NGRAMS, **common)
        self._words = HashingVectorizer(analyzer="word", ngram_range=HASH_WORD_NGRAMS,
                                        token_pattern=r"(?u)\b\w+\b|[^\w\s]", **common)
        self._analyzers = (self._chars.build_analyzer(), self._words.build_analyzer())
        self._memo: dict[str, int] = {}
        self.n_features = NGRAM_FEATURES

    def _column(self, gram: str) -> int:
        """HashingVectorizer's column for `gram` (abs of its signed murmurhash3, with the
        same rule for -2**31)."""
        from sklearn.utils import murmurhash3_32
        h = murmurhash3_32(gram, seed=0)
        column = (2147483647 - (HASH_FEATURES - 1)) % HASH_FEATURES if h == -2147483648 \
            else abs(h) % HASH_FEATURES
        if len(self._memo) >= self.MEMO_SIZE:
            self._memo = {}
        self._memo[gram] = column
        return column

    def transform(self, texts: list[str]):
        """A sparse (len(texts), n_features) matrix: the character block, then the words'."""
        import scipy.sparse as sp
        indices: list[int] = []
        data: list[float] = []
        indptr = [0]
        for text in texts:
            for block, analyze in enumerate(self._analyzers):
                memo = self._memo
                columns = sorted({memo.get(g) if g in memo else self._column(g)
                                  for g in analyze(text)})
                if columns:
                    offset = block * HASH_FEATURES
                    indices += [c + offset for c in columns]
                    data += [1.0 / math.sqrt(len(columns))] * len(columns)
            indptr.append(len(indices))
        return sp.csr_matrix((np.array(data, dtype=np.float64),
                              np.array(indices, dtype=np.int32),
                              np.array(indptr, dtype=np.int32)),
                             shape=(len(texts), NGRAM_FEATURES))

    def reference(self, texts: list[str]):
        """The same matrix from scikit-learn's own vectorizers (the slow path, for tests)."""
        import scipy.sparse as sp
        return sp.hstack([self._chars.transform(texts), self._words.transform(texts)],
                         format="csr")


def keyword_features(texts: list[str]) -> np.ndarray:
    return np.log1p(np.array([keywords.counts(t) for t in texts], dtype=np.float32))


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


@dataclass
class LinearHead:
    """score = sigmoid(stack · [embedding logit, n-gram logit, keyword counts] + bias): two
    linear models whose out-of-fold logits a third one (the Platt calibration) combines.
    Without `w_vec` it reads no embedding (an n-gram head: the moderation gate)."""

    w_vec: np.ndarray | None
    b_vec: float
    stack: np.ndarray
    bias: float
    w_hash: np.ndarray | None = None
    b_hash: float = 0.0
    keywords: bool = False
    threshold: float = 0.5

    def parts(self, vec: np.ndarray, grams, kw: np.ndarray) -> np.ndarray:
        """The stacker's inputs for a batch: rows of [z_vec, (z_hash), (keyword counts...)]."""
        cols = [] if self.w_vec is None else [
            np.asarray(vec, dtype=np.float32) @ self.w_vec.astype(np.float32) + self.b_vec]
        if self.w_hash is not None:
            cols.append(np.asarray(grams @ self.w_hash.astype(np.float32)).ravel() + self.b_hash)
        out = np.column_stack(cols)
        return np.hstack([out, kw]) if self.keywords else out

    def logits(self, vec, grams, kw) -> np.ndarray:
        return self.parts(vec, grams, kw) @ self.stack + self.bias

    def scores(self, vec, grams, kw) -> np.ndarray:
        return sigmoid(self.logits(vec, grams, kw))

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}.scalars": np.array([self.b_vec, self.bias, self.b_hash, self.threshold,
                                              float(self.keywords)], dtype=np.float64),
               f"{prefix}.stack": self.stack.astype(np.float64)}
        if self.w_vec is not None:
            out[f"{prefix}.w_vec"] = self.w_vec.astype(np.float16)
        if self.w_hash is not None:
            out[f"{prefix}.w_hash"] = self.w_hash.astype(np.float16)
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> "LinearHead":
        b_vec, bias, b_hash, threshold, kw = arrays[f"{prefix}.scalars"]
        w_hash, w_vec = arrays.get(f"{prefix}.w_hash"), arrays.get(f"{prefix}.w_vec")
        return cls(w_vec=None if w_vec is None else w_vec.astype(np.float32), b_vec=float(b_vec),
                   stack=arrays[f"{prefix}.stack"], bias=float(bias),
                   w_hash=None if w_hash is None else w_hash.astype(np.float32),
                   b_hash=float(b_hash), keywords=bool(kw), threshold=float(threshold))


class Features:
    """What the heads read from one text, computed once and shared by every learned check."""

    def __init__(self):
        self._hasher = NgramHasher()
        self._memo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def of(self, text: Text):
        got = self._memo.get(text)
        if got is None:
            got = (text.embedding[None, :], self._hasher.transform([text.value]),
                   keyword_features([text.value]))
            self._memo[text] = got
        return got

    def batch(self, texts: list[str], vectors: np.ndarray):
        return vectors, *self.cheap(texts)

    def cheap(self, texts: list[str]):
        """What an n-gram head reads: (n-grams, keyword counts), no embedding."""
        return self._hasher.transform(texts), keyword_features(texts)


class _HeadCheck:
    name = ""
    reason = ""

    def __init__(self, head: LinearHead, features: Features):
        self.head = head
        self.features = features
        self.threshold = head.threshold

    def check(self, text: Text) -> Finding:
        feats = self.features.of(text)  # the embedding is the caller's cost, not the check's
        start = time.perf_counter()
        score = float(self.head.scores(*feats)[0])
        return Finding(self.name, score, self.reason if score >= self.threshold else "",
                       elapsed_ms=(time.perf_counter() - start) * 1000)


class HarmfulRequestCheck(_HeadCheck):
    name = "harmful_request"
    reason = "asks for help with serious harm"


class InjectionCheck(_HeadCheck):
    name = "injection"
    reason = "tries to override or extract the instructions"


class ModerationCheck(_HeadCheck):
    """Harmful content, with a calibrated score per OpenAI moderation category.

    An answer's windows first meet the gate, an n-gram head (no embedding): a window it scores
    under its cut is harmless beyond doubt and the encoder does not read it; the others are
    read and scored by the full head. Most of an answer's sentences are cleared that way
    (the encoder was most of an answer's system-1 time). The gate's cut and `gate_floor`, the
    lowest policy threshold it serves, are chosen on training data (services.trust.train)."""

    name = "moderation"
    reason = "harmful content"

    def __init__(self, head: LinearHead, categories: dict[str, LinearHead], features: Features,
                 cache: WindowCache | None = None, gate: LinearHead | None = None,
                 gate_floor: float = 1.0):
        super().__init__(head, features)
        self.categories = categories
        self.cache = cache      # the sentences of answers, embedded once
        self.gate = gate
        self.gate_floor = gate_floor

    def check(self, text: Text) -> Finding:
        return self._worst(self.features.of(text))

    def check_answer(self, text: Text, threshold: float | None = None) -> Finding:
        """A model's answer, which may run past what the encoder reads: scored whole when it
        is one window, else window by window (`answer_windows`) and the worst decides. The
        gate serves when the policy's `threshold` (default: the head's) is at least
        `gate_floor`."""
        pieces = answer_windows(text.value)
        threshold = self.threshold if threshold is None else threshold
        if self.gate is not None and threshold >= self.gate_floor:
            return self._gated(text, pieces)
        if len(pieces) == 1 or self.cache is None:
            return self.check(text)
        return self._worst(self.features.batch(pieces, self.cache(pieces, text.namespace)),
                           len(pieces))

    def _gated(self, text: Text, pieces: list[str]) -> Finding:
        grams, kw = self.features.cheap(pieces)
        scores = self.gate.scores(None, grams, kw)
        read = np.flatnonzero(scores >= self.gate.threshold)
        if len(read) == len(pieces) == 1:
            vectors = text.embedding[None, :]
        elif len(read) and self.cache is not None:
            vectors = self.cache([pieces[i] for i in read], text.namespace)
        elif len(read):
            vectors = text._embed([pieces[i] for i in read])
        start = time.perf_counter()  # the embedding is the caller's cost, as in check()
        per: dict[str, float] = {}
        if len(read):
            feats = (vectors, grams[read], kw[read])
            scores[read] = self.head.scores(*feats)
        row = int(np.argmax(scores))
        if row in read:  # the categories' heads read the embedding
            per = self._categories(feats, int(np.flatnonzero(read == row)[0]))
        score = float(scores[row])
        reason = self._reason(score, per)
        details = {"categories": per, "encoder_windows": int(len(read)),
                   **({"window": row, "windows": len(pieces)} if len(pieces) > 1 else {})}
        return Finding(self.name, score, reason, details=details,
                       elapsed_ms=(time.perf_counter() - start) * 1000)

    def _worst(self, feats, windows: int = 1) -> Finding:
        """The finding of the worst row of `feats` (one row: the text whole)."""
        start = time.perf_counter()
        scores = self.head.scores(*feats)
        row = int(np.argmax(scores))
        per = self._categories(feats, row)
        score = float(scores[row])
        details = {"categories": per, **({"window": row, "windows": windows}
                                         if windows > 1 else {})}
        return Finding(self.name, score, self._reason(score, per), details=details,
                       elapsed_ms=(time.perf_counter() - start) * 1000)

    def _categories(self, feats, row: int) -> dict[str, float]:
        return {c: round(float(h.scores(*feats)[row]), 4) for c, h in self.categories.items()}

    def _reason(self, score: float, per: dict[str, float]) -> str:
        top = max(per, key=per.get) if per else ""
        return f"harmful content ({top})" if score >= self.threshold and top else ""


class IndirectInjectionCheck:
    """Instructions hidden in a retrieved document: the document's windows are scored and the
    worst one decides (a short chunk is one window and reuses the shared embedding)."""

    name = "indirect_injection"

    def __init__(self, head: LinearHead, doc_scale: tuple[float, float], features: Features,
                 embed=None):
        self.head = head
        self.embed = embed      # for the windows of a long document
        # A tenant's knowledge chunks come back in Ask after Ask: their windows are kept.
        self.cache = WindowCache(embed) if embed is not None else None
        self.doc_scale = doc_scale
        self.features = features
        self.threshold = head.threshold

    def window_logits(self, text: Text) -> tuple[list[str], np.ndarray]:
        pieces = windows(text.value)
        if len(pieces) == 1:
            return pieces, self.head.logits(*self.features.of(text))
        if self.cache is not None:
            vectors = self.cache(pieces, text.namespace)
        elif text._embed is not None:
            vectors = text._embed(pieces)
        else:
            raise RuntimeError("a long document needs an embedder for its windows")
        return pieces, self.head.logits(*self.features.batch(pieces, vectors))

    def check(self, text: Text) -> Finding:
        pieces, logits = self.window_logits(text)
        start = time.perf_counter()
        worst = int(np.argmax(logits))
        a, b = self.doc_scale
        score = float(sigmoid(a * logits[worst] + b))
        reason = (f"instruction in the document: {pieces[worst][:80]!r}"
                  if score >= self.threshold else "")
        return Finding(self.name, score, reason, details={"window": worst, "windows": len(pieces)},
                       elapsed_ms=(time.perf_counter() - start) * 1000)


# Leaks: how much of each protected text the output gives away, plus a head on the output.
LEAK_FEATURES = ("verbatim", "normalised", "reversed", "longest_run", "trigrams", "words",
                 "output_in_protected", "secret_length")


def _norm(s: str) -> str:
    return _NON_ALNUM.sub("", s.lower())


def _grams(s: str, n: int = 3) -> set[str]:
    return {s[i:i + n] for i in range(max(0, len(s) - n + 1))} or ({s} if s else set())


def _longest_run(a: str, b: str) -> int:
    """Longest common substring of a (short secret) and b (the output), in characters."""
    best = 0
    for i in range(len(a)):
        for j in range(i + best + 1, len(a) + 1):
            if a[i:j] in b:
                best = j - i
            else:
                break
    return best


def overlap_features(output: str, protected: str) -> list[float]:
    out_low, sec_low = output.lower(), protected.lower().strip()
    out_n, sec_n = _norm(output), _norm(protected)
    if not sec_n:
        return [0.0] * len(LEAK_FEATURES)
    sec_grams, out_grams = _grams(sec_n), _grams(out_n)
    words = [w for w in re.findall(r"\w+", sec_low) if len(w) > 1]
    out_words = set(re.findall(r"\w+", out_low))
    return [float(bool(sec_low) and sec_low in out_low),
            float(sec_n in out_n),
            float(sec_n[::-1] in out_n),
            _longest_run(sec_n[:200], out_n) / len(sec_n[:200]),
            len(sec_grams & out_grams) / len(sec_grams),
            (sum(w in out_words for w in words) / len(words)) if words else 0.0,
            (len(out_grams & sec_grams) / len(out_grams)) if out_grams else 0.0,
            math.log1p(len(sec_n))]


class LeakCheck:
    """An output that reveals the system prompt or a protected secret."""

    name = "leak"

    def __init__(self, head: LinearHead, coef: np.ndarray, bias: float, features: Features,
                 threshold: float = 0.5):
        self.head = head        # does the output read like revealed instructions?
        self.coef = coef        # over [head logit, overlap features of the worst protected text]
        self.bias = bias
        self.features = features
        self.threshold = threshold

    def score_parts(self, head_logit: float, overlaps: list[float]) -> float:
        return float(sigmoid(np.dot(self.coef, [head_logit, *overlaps]) + self.bias))

    def check_output(self, output: Text, protected: list[str]) -> Finding:
        feats = self.features.of(output)
        start = time.perf_counter()
        head_logit = float(self.head.logits(*feats)[0])
        best, which = self.score_parts(head_logit, [0.0] * len(LEAK_FEATURES)), -1
        for i, secret in enumerate(protected):
            score = self.score_parts(head_logit, overlap_features(output.value, secret))
            if score > best:
                best, which = score, i
        reason = ""
        if best >= self.threshold:
            reason = (f"reveals protected text #{which + 1}" if which >= 0
                      else "reads like revealed instructions")
        return Finding(self.name, best, reason, details={"protected": which},
                       elapsed_ms=(time.perf_counter() - start) * 1000)

    def check(self, text: Text) -> Finding:
        return self.check_output(text, [])


def save(directory: Path, heads: dict[str, LinearHead], extra: dict[str, np.ndarray],
         meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = dict(extra)
    for name, head in heads.items():
        arrays.update(head.arrays(name))
    np.savez_compressed(directory / "heads.npz", **arrays)
    (directory / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def load_heads(directory: Path = WEIGHTS_DIR) -> tuple[dict[str, LinearHead], dict, dict]:
    with np.load(directory / "heads.npz") as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads((directory / "meta.json").read_text())
    heads = {name: LinearHead.from_arrays(arrays, name) for name in meta["heads"]}
    return heads, arrays, meta


def build_checks(heads: dict[str, LinearHead], arrays: dict, meta: dict, embed=None) -> dict:
    features = Features()
    categories = {c: heads[f"moderation/{c}"] for c in meta["categories"]}
    a, b = arrays["indirect_injection.doc_scale"]
    return {
        "moderation": ModerationCheck(heads["moderation"], categories, features,
                                      WindowCache(embed) if embed is not None else None,
                                      heads.get("moderation_gate"),
                                      float(meta.get("moderation_gate_floor", 1.0))),
        "harmful_request": HarmfulRequestCheck(heads["harmful_request"], features),
        "injection": InjectionCheck(heads["injection"], features),
        "indirect_injection": IndirectInjectionCheck(heads["indirect_injection"],
                                                     (float(a), float(b)), features, embed),
        "leak": LeakCheck(heads["leak"], arrays["leak.coef"][:-1], float(arrays["leak.coef"][-1]),
                          features, float(meta["thresholds"]["leak"])),
    }


def load_checks(embedder=None, directory: Path = WEIGHTS_DIR) -> dict:
    """The learned checks with the shipped weights. `embedder` is the one the Texts are made
    with; the checks read `Text.embedding` and only embed windows of long documents."""
    heads, arrays, meta = load_heads(directory)
    for name, head in heads.items():
        if head.w_hash is not None and head.w_hash.shape[0] != NGRAM_FEATURES:
            raise ValueError(f"head {name} reads {head.w_hash.shape[0]} n-gram features, this "
                             f"code makes {NGRAM_FEATURES}: retrain with "
                             "python -m services.trust.train")
    if embedder is not None and getattr(embedder, "dim", meta["dim"]) != meta["dim"]:
        raise ValueError(f"the weights want {meta['dim']}-dim embeddings, "
                         f"the embedder gives {embedder.dim}")
    return build_checks(heads, arrays, meta, getattr(embedder, "embed", None))
