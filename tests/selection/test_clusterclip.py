import numpy as np
import pytest

from selection.clusterclip import (
    balanced_order,
    clusterclip_draws,
    clusterclip_order,
    clusterclip_subset,
    embed_clusters,
)


def test_clip_never_exceeds_max_repeats_and_exhaustion_ends_the_order():
    labels = np.random.default_rng(0).integers(0, 5, size=50)
    for r in (1, 2, 3):
        order = clusterclip_order(labels, 1000, max_repeats=r, seed=r)
        counts = np.bincount(order, minlength=50)
        # 1000 draws > 50 * r: every document is used exactly r times, then the order stops
        assert len(order) == 50 * r and np.all(counts == r)
        short = clusterclip_order(labels, 40, max_repeats=r, seed=r)
        assert len(short) == 40 and np.bincount(short).max() <= r


def test_draws_are_balanced_over_clusters_until_pools_empty():
    sizes = [5, 100, 1000]
    labels = np.repeat(np.arange(3), sizes)
    share = np.bincount(labels[clusterclip_order(labels, 3000, max_repeats=10**6, seed=0)])
    np.testing.assert_allclose(share / 3000, 1 / 3, atol=0.04)
    share = np.bincount(labels[balanced_order(labels, 3000, seed=0)])
    np.testing.assert_allclose(share / 3000, 1 / 3, atol=0.04)
    # clip at 2: the 5-row cluster leaves the draw after 10 draws, the others split the rest
    order = clusterclip_order(labels, 300, max_repeats=2, seed=0)
    assert np.sum(labels[order] == 0) == 10
    late = labels[order[100:]]
    assert np.sum(late == 0) == 0 and abs(np.mean(late == 1) - 0.5) < 0.1
    # ... until the 100-row cluster is spent too (200 draws); then only the large one is left
    order = clusterclip_order(labels, 800, max_repeats=2, seed=0)
    assert np.bincount(labels[order]).tolist()[:2] == [10, 200]
    assert np.all(labels[order[-100:]] == 2)


def test_deterministic_and_seed_dependent():
    labels = np.random.default_rng(1).integers(0, 4, size=30)
    a = clusterclip_order(labels, 50, max_repeats=2, seed=3)
    np.testing.assert_array_equal(a, clusterclip_order(labels, 50, max_repeats=2, seed=3))
    assert not np.array_equal(a, clusterclip_order(labels, 50, max_repeats=2, seed=4))
    np.testing.assert_array_equal(
        balanced_order(labels, 50, seed=3), balanced_order(labels, 50, seed=3)
    )


def test_balanced_order_shape_and_range():
    labels = np.array([7, 7, 7, 9])
    order = balanced_order(labels, 400, seed=0)
    assert order.shape == (400,) and order.dtype == np.int64
    assert set(order.tolist()) <= {0, 1, 2, 3}
    assert abs(np.mean(order == 3) - 0.5) < 0.1  # the singleton cluster gets half the draws
    assert len(balanced_order(labels, 0, seed=0)) == 0
    assert len(clusterclip_order(labels, 0, max_repeats=1, seed=0)) == 0


def test_subset_is_exact_distinct_and_balanced():
    labels = np.array([10] * 2 + [42] * 20 + [-1] * 30)
    sel = clusterclip_subset(labels, 20, seed=0)
    assert len(sel) == 20 and len(np.unique(sel.indices)) == 20
    np.testing.assert_array_equal(sel.cluster, labels[sel.indices])
    assert sel.cluster_sizes == {-1: 30, 10: 2, 42: 20}
    assert sum(sel.cluster_budget.values()) == 20 and sel.cluster_budget[10] == 2
    assert sel.reason[list(sel.cluster).index(42)] == "clusterclip: cluster 42 (size 20)"
    whole = clusterclip_subset(labels, 1.0, seed=0)
    assert sorted(whole.indices.tolist()) == list(range(52))


def test_draws_with_repeats():
    labels = np.array([0, 0, 1])
    sel = clusterclip_draws(labels, 6, max_repeats=2, seed=0)
    assert len(sel) == 6 and np.bincount(sel.indices).tolist() == [2, 2, 2]
    assert sel.cluster_budget == {0: 4, 1: 2}


def test_embed_clusters_groups_directions():
    rng = np.random.default_rng(2)
    base = np.eye(3)
    x = np.repeat(base, 10, axis=0) + 0.05 * rng.standard_normal((30, 3))
    labels = embed_clusters(x * rng.uniform(0.5, 5, size=(30, 1)), 3, seed=0)
    assert [len(set(labels[i : i + 10].tolist())) for i in (0, 10, 20)] == [1, 1, 1]
    assert len(set(labels.tolist())) == 3


def test_bad_inputs():
    with pytest.raises(ValueError, match="max_repeats"):
        clusterclip_order(np.array([0, 1]), 3, max_repeats=0, seed=0)
    with pytest.raises(ValueError, match="integer"):
        clusterclip_order(np.array([0.5, 1.0]), 3, max_repeats=1, seed=0)
    with pytest.raises(ValueError, match="1-D"):
        balanced_order(np.zeros((2, 2), dtype=int), 3, seed=0)
    with pytest.raises(ValueError, match="budget"):
        clusterclip_subset(np.array([0, 1]), 3, seed=0)
