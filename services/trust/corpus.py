"""The training and evaluation texts of the learned checks, read from the shared data folders
(never copied into the repository), and a disk cache of their MiniLM embeddings."""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "trust"
CACHE_DIR = Path("/tmp/vfmos-trust-vectors")  # keyed by each text's hash, never shipped
MODERATION_CATEGORIES = ("sexual", "hate", "violence", "harassment", "self-harm",
                         "sexual/minors", "hate/threatening", "violence/graphic")


@dataclass
class Example:
    """One text with its task label (1 = what the check looks for) and where it came from."""

    text: str
    label: int
    source: str                      # e.g. "moderation", "xstest", "tickets", "synthetic"
    group: str = ""                  # records that must stay on one side of a split
    extra: dict = field(default_factory=dict)


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def personas_dir(data_dir: Path) -> Path:
    return Path(data_dir).resolve().parent / "personas"


def sample(rows: list, limit: int | None, key) -> list:
    """A deterministic subset (by hash of each row's key), so every run sees the same rows."""
    if limit is None or len(rows) <= limit:
        return rows
    return sorted(rows, key=lambda r: hashlib.sha1(key(r).encode()).hexdigest())[:limit]


def moderation(data_dir: Path) -> list[Example]:
    out = []
    for r in read_jsonl(Path(data_dir) / "moderation_dev.jsonl.gz"):
        out.append(Example(r["text"], int(r["label"] == "unsafe"), "moderation", r["id"],
                           {"categories": list(r.get("categories") or [])}))
    return out


def xstest(data_dir: Path) -> list[Example]:
    return [Example(r["text"], int(r["label"] == "unsafe"), "xstest", r["id"],
                    {"type": r.get("type", "")})
            for r in read_jsonl(Path(data_dir) / "xstest_dev.jsonl")]


def injections(data_dir: Path) -> list[Example]:
    """Tensor Trust attacks, one per unique text (the same attack is used on many defenses)."""
    seen: dict[str, Example] = {}
    for r in read_jsonl(Path(data_dir) / "injection_dev.jsonl.gz"):
        if r["text"] not in seen:
            seen[r["text"]] = Example(r["text"], 1, "tensor_trust", "",
                                      {"task": r.get("task", "")})
    return list(seen.values())


def prompt_leaks(data_dir: Path) -> list[Example]:
    return [Example(r["text"], int(r["label"] == "leak"), "prompt_leak", r["id"],
                    {"access_code": r["access_code"],
                     "verbatim": bool(r.get("access_code_verbatim"))})
            for r in read_jsonl(Path(data_dir) / "prompt_leak_dev.jsonl")]


def bipia(data_dir: Path) -> list[Example]:
    return [Example(r["text"], int(r["label"] == "injection"), "bipia",
                    r.get("attack_str") or r["id"],
                    {"context_id": r.get("context_id", ""), "attack": r.get("attack_str", ""),
                     "group": r.get("attack_group", ""), "position": r.get("position", "")})
            for r in read_jsonl(Path(data_dir) / "bipia_email_dev.jsonl.gz")]


def tickets(data_dir: Path, limit: int | None = None) -> list[Example]:
    path = personas_dir(data_dir) / "support" / "tickets_intent_dev.jsonl.gz"
    rows = sample(read_jsonl(path), limit, lambda r: r["id"])
    return [Example(r["instruction"], 0, "tickets", r["id"]) for r in rows]


def routing_dir(data_dir: Path) -> Path:
    return Path(data_dir).resolve().parent / "routing"


def task_requests(data_dir: Path, limit: int | None = None) -> list[Example]:
    """Everyday work asked of an assistant (write, explain, solve, choose): MT-Bench's first
    turns and samples of the GSM8K and MMLU prompts in ../routing. Tensor Trust's attacks
    are imperatives too ("write a story starting with 'Access Granted'"), so an injection
    head that never saw plain requests learns that "Write a poem about the moon." is one.
    A missing folder gives none (another data dir may carry only the trust sets)."""
    d = routing_dir(data_dir)
    out = []
    questions = d / "mt_bench" / "question.jsonl"
    if questions.exists():
        out += [Example(r["turns"][0], 0, "task_requests", f"mt_bench:{r['question_id']}")
                for r in read_jsonl(questions) if r.get("turns")]
    share = None if limit is None else max(1, limit // 2)
    for name in ("gsm8k_dev.jsonl.gz", "mmlu_dev.jsonl.gz"):
        if (d / name).exists():
            rows = sample(read_jsonl(d / name), share, lambda r: r["id"])
            out += [Example(r["prompt"], 0, "task_requests", r["id"]) for r in rows]
    return out


def kb_docs(data_dir: Path, limit: int | None = None) -> list[Example]:
    path = personas_dir(data_dir) / "support" / "kb_docs.jsonl.gz"
    rows = sample(read_jsonl(path), limit, lambda r: r["key"])
    out = []
    for r in rows:
        if r.get("doc_type") == "faq":
            text = f"{r['question']} {r['answer']}"
        else:
            text = " ".join(s["text"] for s in r.get("sentences", []))
        out.append(Example(text, 0, "kb_docs", r["key"]))
    return out


def abstracts(data_dir: Path, limit: int | None = None) -> list[Example]:
    path = personas_dir(data_dir) / "materials" / "abstracts_dev.jsonl.gz"
    rows = sample(read_jsonl(path), limit, lambda r: r["id"])
    return [Example(f"{r['title']}. {r['abstract']}", 0, "abstracts", r["id"]) for r in rows]


class VectorCache:
    """Embeddings of texts already seen, on local disk: a rerun of the training script or the
    bench embeds only what is new (MiniLM on two shared cores manages ~20 texts a second)."""

    def __init__(self, embedder, directory: Path = CACHE_DIR):
        self.embedder = embedder
        # float32 and bfloat16 vectors of one model differ a little: each has its own file
        dtype = getattr(embedder, "dtype", "")
        self.path = Path(directory) / (getattr(embedder, "name", "embedder") +
                                       (f"-{dtype}" if dtype else "") + ".pkl")
        self._vectors: dict[str, np.ndarray] = {}
        if self.path.exists():
            try:
                with open(self.path, "rb") as f:
                    self._vectors = pickle.load(f)
            except (OSError, EOFError, pickle.UnpicklingError):
                self._vectors = {}

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()

    def embed(self, texts: list[str], chunk: int = 256) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if self.key(t) not in self._vectors))
        for start in range(0, len(missing), chunk):
            part = missing[start:start + chunk]
            for text, vec in zip(part, self.embedder.embed(part)):
                self._vectors[self.key(text)] = vec.astype(np.float32)
            self._save()
        dim = getattr(self.embedder, "dim", 384)
        if not texts:
            return np.zeros((0, dim), dtype=np.float32)
        return np.stack([self._vectors[self.key(t)] for t in texts])

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(self._vectors, f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(self.path)
