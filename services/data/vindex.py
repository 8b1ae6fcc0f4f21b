"""In-process vector index: exact inner products when small, faiss HNSW past a measured size."""

from __future__ import annotations

import contextlib

import numpy as np

# Measured with `python -m bench.ingest` (MiniLM vectors replicated with noise, 2 shared
# cores): exact search p50 0.07 ms at 2k rows, 0.13-0.26 ms at 10k, 0.5-1.0 ms at 20k,
# 2.6 ms at 50k, 9 ms at 100k; HNSW 0.07-0.3 ms throughout at recall@10 0.98-1.0, after a
# build of ~2 s at 10k, 5 s at 20k and 6-30 s at 100k. HNSW is faster from 2k-10k rows, but
# until ~20k exact costs well under the query's own embedding (7-15 ms), is exact, and
# needs no graph built at load; past 20k its cost grows linearly and HNSW pays.
ANN_THRESHOLD = 20_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 96
# Removed rows stay in the HNSW graph (it cannot delete) and are filtered out of results;
# past this share of dead rows the graph is rebuilt from the live ones.
MAX_DEAD_SHARE = 0.25


class VectorIndex:
    """Unit vectors under integer ids, searched by inner product (cosine on unit vectors).

    Not thread-safe: the owner (one collection of the KnowledgeBase) holds a lock."""

    def __init__(self, dim: int, ann_threshold: int = ANN_THRESHOLD):
        self.dim = dim
        self.ann_threshold = ann_threshold
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._ids = np.zeros(0, dtype=np.int64)
        self._alive = np.zeros(0, dtype=bool)
        self._size = 0                 # rows in use in the arrays (they grow by doubling)
        self._row_of: dict[int, int] = {}
        self._hnsw = None              # faiss index over rows [0, _hnsw_rows)
        self._hnsw_rows = 0
        self._blas = None

    def __len__(self) -> int:
        return len(self._row_of)

    @property
    def uses_ann(self) -> bool:
        return len(self) >= self.ann_threshold

    def add(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if len(ids) != len(vectors):
            raise ValueError("one id per vector")
        self.remove([i for i in ids.tolist() if i in self._row_of])
        self._grow(self._size + len(ids))
        rows = np.arange(self._size, self._size + len(ids))
        self._vectors[rows] = vectors
        self._ids[rows] = ids
        self._alive[rows] = True
        self._row_of.update(zip(ids.tolist(), rows.tolist()))
        self._size += len(ids)

    def remove(self, ids: list[int]) -> int:
        removed = 0
        for i in ids:
            row = self._row_of.pop(int(i), None)
            if row is not None:
                self._alive[row] = False
                removed += 1
        if removed and self._size - len(self._row_of) > MAX_DEAD_SHARE * self._size:
            self._compact()
        return removed

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None,
               exact: bool = False) -> list[tuple[int, float]]:
        """The k best (id, score), best first. `allowed` (ids) restricts the search; such a
        search is exact, over those rows only, which is what a selective filter wants."""
        if k <= 0 or not self._row_of:
            return []
        query = np.asarray(query, dtype=np.float32).reshape(self.dim)
        if allowed is not None:
            rows = np.array([self._row_of[i] for i in np.asarray(allowed).tolist()
                             if i in self._row_of], dtype=np.int64)
            return self._exact(query, k, rows)
        if exact or not self.uses_ann:
            return self._exact(query, k, None)
        return self._ann(query, k)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the live rows, for tests and benchmarks."""
        rows = np.flatnonzero(self._alive[:self._size])
        return self._ids[rows].copy(), self._vectors[rows].copy()

    # internals
    def _grow(self, need: int) -> None:
        if need <= len(self._vectors):
            return
        cap = max(need, 2 * len(self._vectors), 256)
        for name, dtype, shape in (("_vectors", np.float32, (cap, self.dim)),
                                   ("_ids", np.int64, (cap,)), ("_alive", bool, (cap,))):
            new = np.zeros(shape, dtype=dtype)
            new[:self._size] = getattr(self, name)[:self._size]
            setattr(self, name, new)

    def _compact(self) -> None:
        rows = np.flatnonzero(self._alive[:self._size])
        ids, vectors = self._ids[rows], self._vectors[rows]
        n = len(rows)
        self._vectors[:n], self._ids[:n] = vectors, ids
        self._alive[:n], self._alive[n:] = True, False
        self._size = n
        self._row_of = dict(zip(ids.tolist(), range(n)))
        self._hnsw, self._hnsw_rows = None, 0

    def _exact(self, query: np.ndarray, k: int, rows: np.ndarray | None) -> list[tuple[int, float]]:
        if rows is None:
            rows = np.flatnonzero(self._alive[:self._size])
        if len(rows) == 0:
            return []
        if len(rows) == self._size:
            # Every row: a slice avoids copying the matrix (rows in any order are all rows).
            rows = np.arange(self._size)
            matrix = self._vectors[:self._size]
        else:
            matrix = self._vectors[rows]
        with self._one_blas_thread():
            scores = matrix @ query
        k = min(k, len(rows))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(rows) else np.arange(len(rows))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(self._ids[rows[j]]), float(scores[j])) for j in top]

    def _ann(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        index = self._graph()
        # Ask for enough extra results that dead rows filtered out still leave k.
        live_share = len(self._row_of) / self._size
        want = min(self._size, int(k / live_share * 1.5) + 8)
        index.hnsw.efSearch = max(HNSW_EF_SEARCH, want)
        scores, rows = index.search(query.reshape(1, -1), want)
        out = []
        for score, row in zip(scores[0], rows[0]):
            if row >= 0 and self._alive[row]:
                out.append((int(self._ids[row]), float(score)))
                if len(out) == k:
                    break
        if len(out) < min(k, len(self._row_of)):  # unlucky with dead rows: be exact
            return self._exact(query, k, None)
        return out

    def _graph(self):
        import faiss

        if self._hnsw is None:
            self._hnsw = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            self._hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            self._hnsw_rows = 0
        if self._hnsw_rows < self._size:  # rows added since: HNSW grows in place
            self._hnsw.add(self._vectors[self._hnsw_rows:self._size])
            self._hnsw_rows = self._size
        return self._hnsw

    def _one_blas_thread(self):
        """One query is a memory-bound matrix-vector product: BLAS threads buy nothing, and
        on a busy machine (the models own the cores) they turn 0.2 ms into ~10 ms waiting
        for each other. threadpoolctl is optional; without it, BLAS does as it likes."""
        if self._blas is None:
            try:
                from threadpoolctl import ThreadpoolController

                self._blas = ThreadpoolController()
            except ImportError:
                self._blas = False
        return (self._blas.limit(limits=1, user_api="blas") if self._blas
                else contextlib.nullcontext())
