"""Vector index: exact when small, HNSW past the threshold with high recall; removal works."""

from __future__ import annotations

import numpy as np
import pytest

from services.data.vindex import VectorIndex

DIM = 64


def clustered(n: int, seed: int = 0, centres: int = 50) -> np.ndarray:
    # Embeddings cluster by topic; uniform random vectors would be a worst case no
    # real collection looks like.
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, DIM)).astype(np.float32)
    x = middle[rng.integers(0, centres, n)] + 0.7 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ids_of(hits) -> list[int]:
    return [i for i, _ in hits]


def test_exact_search_returns_the_true_top_k_in_order():
    x = clustered(500)
    index = VectorIndex(DIM)
    index.add(np.arange(500) * 10, x)
    assert not index.uses_ann
    hits = index.search(x[7], 5)
    truth = np.argsort(-(x @ x[7]))[:5] * 10
    assert ids_of(hits) == truth.tolist() and hits[0] == (70, pytest.approx(1.0, abs=1e-5))
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_ann_recall_at_10_against_exact_on_clustered_random_data():
    x = clustered(6000)
    # Questions land near documents, not anywhere in the space.
    noise = 0.05 * np.random.default_rng(1).standard_normal((100, DIM)).astype(np.float32)
    queries = x[:100] + noise
    ann = VectorIndex(DIM, ann_threshold=1000)
    ann.add(np.arange(6000), x)
    assert ann.uses_ann
    recall = np.mean([len(set(ids_of(ann.search(q, 10))) &
                          set(ids_of(ann.search(q, 10, exact=True)))) / 10 for q in queries])
    assert recall >= 0.95


@pytest.mark.parametrize("threshold", [10**9, 100])
def test_removed_ids_never_come_back(threshold):
    x = clustered(2000)
    index = VectorIndex(DIM, ann_threshold=threshold)
    index.add(np.arange(2000), x)
    index.search(x[0], 10)  # builds the graph before the removal, when ANN
    gone = set(range(0, 2000, 5))  # 20%: below the compaction share
    assert index.remove(sorted(gone)) == len(gone) and len(index) == 1600
    for q in x[:50]:
        hits = index.search(q, 10)
        assert len(hits) == 10 and not gone & set(ids_of(hits))
    assert index.remove([0, 999_999]) == 0  # already gone, never there


def test_removing_most_rows_compacts_and_stays_correct():
    x = clustered(1000)
    index = VectorIndex(DIM, ann_threshold=100)
    index.add(np.arange(1000), x)
    index.search(x[0], 3)
    index.remove(list(range(901)))
    ids, vectors = index.vectors()
    assert ids.tolist() == list(range(901, 1000)) and np.allclose(vectors, x[901:])
    assert ids_of(index.search(x[950], 1)) == [950]
    assert not index.uses_ann  # 99 rows left: exact again


def test_adding_an_existing_id_replaces_its_vector():
    x = clustered(10)
    index = VectorIndex(DIM)
    index.add([1, 2], x[:2])
    index.add([1], x[5:6])
    assert len(index) == 2
    assert ids_of(index.search(x[5], 1)) == [1]


def test_allowed_ids_restrict_the_search():
    x = clustered(300)
    index = VectorIndex(DIM, ann_threshold=50)
    index.add(np.arange(300), x)
    hits = index.search(x[0], 5, allowed=np.array([250, 3, 7, 12345]))
    assert sorted(ids_of(hits)) == [3, 7, 250]
    assert index.search(x[0], 5, allowed=np.array([], dtype=np.int64)) == []


def test_empty_index_and_mismatched_input():
    index = VectorIndex(DIM)
    assert index.search(np.ones(DIM), 3) == []
    with pytest.raises(ValueError):
        index.add([1, 2], clustered(3))
