"""Knowledge ingest and search: chunks/s and MB/s with real embeddings, query latency at 10k and
100k chunks, HNSW against exact search (recall@10, latency) and where HNSW starts to pay.

`python -m bench.ingest [--quick]`. The ingest rate uses the real MiniLM. At 10k and 100k
chunks, embedding every chunk would take hours on two cores, so those collections go through
the real ingest path (parse, chunk, LMDB, BM25, vector index) with an embedder that returns
real MiniLM vectors of the first phase's chunks plus Gaussian noise (near-duplicates in
topic clusters, as a real corpus has); queries get such vectors too. The output says so."""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np

from bench.common import percentile, report
from vfmos_runtime.embed import load_embedder
from services.data.knowledge import KnowledgeBase
from services.data.vindex import VectorIndex

TENANT = "bench"
NOISE = 0.04          # per dimension: cosine ~0.75 between a replica and its base vector


class Words:
    """Synthetic English-like text: pronounceable words with Zipf frequencies."""

    def __init__(self, seed: int, vocabulary: int = 6000):
        self.rng = np.random.default_rng(seed)
        syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
        self.words = sorted({"".join(self.rng.choice(syllables, self.rng.integers(2, 4)))
                             for _ in range(vocabulary)})
        weights = 1.0 / np.arange(1, len(self.words) + 1)
        # One big draw, read in slices: a weighted choice per sentence would dominate the run.
        self._stream = self.rng.choice(len(self.words), 1 << 20, p=weights / weights.sum())
        self._at = 0

    def _take(self, n: int) -> list[str]:
        if self._at + n > len(self._stream):
            self._at = int(self.rng.integers(0, 1000))
        picked = self._stream[self._at:self._at + n]
        self._at += n
        return [self.words[i] for i in picked]

    def sentence(self) -> str:
        return " ".join(self._take(int(self.rng.integers(8, 17)))).capitalize() + "."

    def paragraph(self, sentences: int) -> str:
        return " ".join(self.sentence() for _ in range(sentences))

    def query(self) -> str:
        return " ".join(self._take(int(self.rng.integers(3, 7))))


def markdown_doc(words: Words, sections: int, sentences: int) -> bytes:
    parts = [f"# Report {words.query()}"]
    for i in range(sections):
        parts += [f"## Section {i} {words.query()}", words.paragraph(sentences)]
    return "\n\n".join(parts).encode()


class ReplicaEmbedder:
    """Real MiniLM vectors of a pool, each text getting one (picked by its hash) plus noise:
    how the 10k/100k collections get embeddings without hours of embedding."""

    def __init__(self, pool: np.ndarray, name: str, seed: int = 3):
        self.pool, self.name, self.dim = pool, name, pool.shape[1]
        self.rng = np.random.default_rng(seed)

    def embed(self, texts: list[str]) -> np.ndarray:
        picks = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
                 % len(self.pool) for t in texts]
        x = self.pool[picks] + NOISE * self.rng.standard_normal(
            (len(texts), self.dim)).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def open_env(path: Path) -> lmdb.Environment:
    # The daemon's settings: fsync on every commit.
    return lmdb.open(str(path), map_size=16 << 30, max_dbs=32, sync=True, metasync=True)


def measure_ingest(embedder, words: Words, docs: int, tmp: Path,
                   extra_pool: int) -> tuple[dict, np.ndarray]:
    """Real end-to-end ingest; returns the figures and the replica pool: the chunk vectors,
    and `extra_pool` embedded sentences (cheap) so the pool has many topics."""
    env = open_env(tmp / "real")
    kb = KnowledgeBase(env, embedder)
    kb.create_collection(TENANT, "real")
    data = [markdown_doc(words, sections=4, sentences=12) for _ in range(docs)]
    kb.ingest(TENANT, "real", "warmup.md", data[0])  # first-call overheads out of the timing
    kb.delete_source(TENANT, "real", "warmup.md")
    start = time.perf_counter()
    chunks = sum(kb.ingest(TENANT, "real", f"doc{i}.md", d).chunks for i, d in enumerate(data))
    elapsed = time.perf_counter() - start
    queries = [words.query() for _ in range(30)]
    latency = []
    for q in queries:
        t = time.perf_counter()
        kb.search(TENANT, "real", q, k=10)
        latency.append((time.perf_counter() - t) * 1e3)
    embed_ms = []
    for q in queries:
        t = time.perf_counter()
        embedder.embed([q])
        embed_ms.append((time.perf_counter() - t) * 1e3)
    with env.begin() as txn:
        pool = np.stack([v for _, _, v in kb.store.scan_chunks(
            txn, kb.store.prefix(TENANT, "real"))])
    env.close()
    pool = np.concatenate([pool, embedder.embed([words.sentence() for _ in range(extra_pool)])])
    megabytes = sum(map(len, data)) / 1e6
    return {"chunks": chunks, "seconds": elapsed, "chunks_per_s": chunks / elapsed,
            "mb_per_s": megabytes / elapsed, "mb": megabytes,
            "query_p50_ms": percentile(latency, 50),
            "query_embed_p50_ms": percentile(embed_ms, 50)}, pool


def fill(kb: KnowledgeBase, collection: str, words: Words, chunks: int) -> float:
    """Ingest `chunks` one-paragraph sections (100 a document); returns chunks/s."""
    kb.create_collection(TENANT, collection)
    start = time.perf_counter()
    for i in range(chunks // 100):
        kb.ingest(TENANT, collection, f"{collection}/doc{i}.md",
                  markdown_doc(words, sections=100, sentences=3))
    return chunks / (time.perf_counter() - start)


def measure_search(kb: KnowledgeBase, collection: str, words: Words, queries: int) -> dict:
    start = time.perf_counter()
    kb.search(TENANT, collection, words.query(), k=10)  # loads: LMDB scan, BM25, HNSW
    load_s = time.perf_counter() - start
    latency = []
    for _ in range(queries):
        q = words.query()
        t = time.perf_counter()
        kb.search(TENANT, collection, q, k=10)
        latency.append((time.perf_counter() - t) * 1e3)
    return {"load_s": load_s, "query_p50_ms": percentile(latency, 50),
            "query_p95_ms": percentile(latency, 95)}


def compare_indexes(vectors: np.ndarray, queries: np.ndarray) -> dict:
    """HNSW against exact search over the same vectors: build time, latency, recall@10."""
    dim, ids = vectors.shape[1], np.arange(len(vectors))
    exact, ann = VectorIndex(dim, ann_threshold=1 << 62), VectorIndex(dim, ann_threshold=0)
    exact.add(ids, vectors)
    ann.add(ids, vectors)
    start = time.perf_counter()
    ann.search(queries[0], 10)  # builds the graph
    build_s = time.perf_counter() - start
    out = {"build_s": build_s}
    results = {}
    for name, index in (("exact", exact), ("ann", ann)):
        latency, results[name] = [], []
        for q in queries:
            t = time.perf_counter()
            results[name].append({i for i, _ in index.search(q, 10)})
            latency.append((time.perf_counter() - t) * 1e3)
        out[f"{name}_p50_ms"] = percentile(latency, 50)
    out["recall_at_10"] = float(np.mean([len(a & e) / 10 for a, e in
                                         zip(results["ann"], results["exact"])]))
    return out


def collection_vectors(kb: KnowledgeBase, collection: str) -> np.ndarray:
    with kb.store.env.begin() as txn:
        return np.stack([v for _, _, v in kb.store.scan_chunks(
            txn, kb.store.prefix(TENANT, collection))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    sizes = [10_000] if args.quick else [10_000, 100_000]
    crossover = [2_000, 5_000, 10_000] if args.quick else [2_000, 5_000, 10_000, 20_000,
                                                            50_000, 100_000]
    words = Words(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="vfmb-ingest", dir="/tmp"))
    try:
        embedder = load_embedder()
        real, pool = measure_ingest(embedder, words, 8 if args.quick else 30, tmp,
                                    300 if args.quick else 2000)
        replica = ReplicaEmbedder(pool, embedder.name)
        env = open_env(tmp / "scale")
        kb = KnowledgeBase(env, replica)
        scale = {}
        for n in sizes:
            rate = fill(kb, f"c{n}", words, n)
            scale[n] = {"fill_chunks_per_s": rate, **measure_search(kb, f"c{n}", words,
                                                                     50 if args.quick else 200)}
        vectors = collection_vectors(kb, f"c{sizes[-1]}")
        queries = replica.embed([words.query() for _ in range(100 if args.quick else 200)])
        indexes = {n: compare_indexes(vectors[:n], queries) for n in crossover}
        env.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_report(real, scale, indexes, pool)
    return 0


def _table(title: str, header: tuple, rows: list[tuple]) -> None:
    print(title)
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))
    print()


def print_report(real: dict, scale: dict, indexes: dict, pool: np.ndarray) -> None:
    _table("ingest with real MiniLM embeddings (synthetic Markdown, fsync per document)",
           ("chunks", "MB", "seconds", "chunks/s", "MB/s", "search p50 ms", "query embed ms"),
           [(real["chunks"], f"{real['mb']:.2f}", f"{real['seconds']:.1f}",
             f"{real['chunks_per_s']:.1f}", f"{real['mb_per_s']:.3f}",
             f"{real['query_p50_ms']:.1f}", f"{real['query_embed_p50_ms']:.1f}")])
    _table(f"search at scale: real ingest path, but chunk and query vectors are the "
           f"{len(pool)} real MiniLM vectors above plus noise (sigma {NOISE}/dim), not "
           "embedded; latency excludes query embedding",
           ("chunks", "ingest chunks/s", "first search (load) s", "query p50 ms", "p95 ms"),
           [(n, f"{r['fill_chunks_per_s']:.0f}", f"{r['load_s']:.2f}",
             f"{r['query_p50_ms']:.2f}", f"{r['query_p95_ms']:.2f}")
            for n, r in scale.items()])
    ann_wins = [n for n, r in indexes.items() if r["ann_p50_ms"] < r["exact_p50_ms"]]
    figures = {"chunks_per_s": round(real["chunks_per_s"], 1),
               "mb_per_s": round(real["mb_per_s"], 4),
               "query_embed_p50_ms": round(real["query_embed_p50_ms"], 2),
               "ann_crossover_chunks": ann_wins[0] if ann_wins else None,
               "replicated_vectors": True}
    for n, r in scale.items():
        figures[f"query_p50_ms_{n // 1000}k"] = round(r["query_p50_ms"], 2)
        figures[f"load_s_{n // 1000}k"] = round(r["load_s"], 2)
    for n, r in indexes.items():
        if n in scale:
            figures[f"ann_recall_at_10_{n // 1000}k"] = round(r["recall_at_10"], 4)
            figures[f"ann_query_p50_ms_{n // 1000}k"] = round(r["ann_p50_ms"], 3)
            figures[f"exact_query_p50_ms_{n // 1000}k"] = round(r["exact_p50_ms"], 3)
    report("vector index alone: HNSW (M 32, efSearch 96) against exact, same vectors; "
           f"HNSW first faster at {figures['ann_crossover_chunks']} chunks",
           [(n, f"{r['build_s']:.2f}", f"{r['exact_p50_ms']:.3f}", f"{r['ann_p50_ms']:.3f}",
             f"{r['recall_at_10']:.3f}") for n, r in indexes.items()],
           ("chunks", "HNSW build s", "exact p50 ms", "HNSW p50 ms", "recall@10"), figures)


if __name__ == "__main__":
    raise SystemExit(main())
