"""Score fusion: ranks, RRF, normalised sums, spreading to neighbours."""

import numpy as np
import pytest

from services.data import fusion


def test_ranks_best_first_ties_in_index_order():
    assert fusion.ranks(np.array([0.1, 0.9, 0.5, 0.9])).tolist() == [3, 0, 2, 1]


def test_rrf_prefers_items_both_lists_like():
    dense = np.array([0.9, 0.8, 0.1])
    lexical = np.array([0.0, 5.0, 4.0])
    fused = fusion.rrf([dense, lexical], k=60)
    assert fused.argmax() == 1
    assert fused[0] == pytest.approx(1 / 61 + 1 / 63)


def test_weighted_zscores_keep_the_margin():
    lead = np.array([10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # one clear winner
    flat = np.array([0.0, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1])  # a weak preference
    fused = fusion.weighted([lead, flat], [2.0, 1.0])
    assert fused == pytest.approx(2 * fusion.zscore(lead) + fusion.zscore(flat))
    assert fused.argmax() == 0
    assert np.all(fusion.zscore(np.ones(3)) == 0)
    assert fusion.minmax(np.array([2.0, 4.0])).tolist() == [0.0, 1.0]


def test_spread_lifts_neighbours_within_a_group_only():
    scores = np.array([0.0, 0.0, 1.0, 0.0, 0.0])
    groups = np.array([0, 0, 0, 1, 1])
    out = fusion.spread(scores, groups, 0.5)
    assert out.tolist() == [0.0, 0.5, 1.0, 0.0, 0.0]

