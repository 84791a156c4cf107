from collections import Counter

import numpy as np
import pytest

from selection.s2l import balanced_allocation, s2l_select


@pytest.mark.parametrize(
    "sizes, budget, expected",
    [
        # big clusters 5, 10, 20: 12 // 3 = 4 each; sizes 1 and 2 wait for the leftover
        ([1, 2, 5, 10, 20], 12, [0, 0, 4, 4, 4]),
        # 3 <= 12 // 3 taken whole; then 9 // 2 = 4; the last gets the remaining 5
        ([3, 10, 10], 12, [3, 4, 5]),
        # visiting order is by size, not by id: 10 // 2 = 5 for the 6-cluster, 5 left for 20
        ([20, 6], 10, [5, 5]),
        # 4 whole (share 5), then 11 // 2 = 5 and 6: the 6 for the larger cluster
        ([50, 4, 7], 15, [6, 4, 5]),
        # all big clusters whole, the leftover exactly empties the small ones
        ([1, 2, 3, 3], 9, [1, 2, 3, 3]),
        ([4, 4], 0, [0, 0]),
    ],
)
def test_balanced_allocation_by_hand(sizes, budget, expected):
    assert balanced_allocation(np.array(sizes), budget).tolist() == expected


def test_leftover_fill_comes_from_small_clusters():
    # big 3, 3 taken whole (6), leftover 2 drawn from the 3 rows of clusters of size 1 and 2
    for seed in range(20):
        counts = balanced_allocation(np.array([1, 2, 3, 3]), 8, seed=seed)
        assert counts[2:].tolist() == [3, 3]
        assert counts[:2].sum() == 2 and counts[0] <= 1 and counts[1] <= 2


def test_allocation_invariants_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 30, size=rng.integers(1, 12))
        budget = int(rng.integers(0, sizes.sum() + 1))
        counts = balanced_allocation(sizes, budget, seed=int(rng.integers(100)))
        assert counts.sum() == budget and np.all(counts <= sizes) and np.all(counts >= 0)
        big = sizes > 2
        if budget <= sizes[big].sum():  # the first pass alone: no small cluster touched
            assert counts[~big].sum() == 0
            partial = big & (counts < sizes)
            if partial.any():  # water-filling: partial shares within 1, whole ones not above
                assert counts[partial].max() - counts[partial].min() <= 1
                assert np.all(sizes[big & ~partial] <= counts[partial].max() + 1)


def test_allocation_errors():
    with pytest.raises(ValueError, match="budget"):
        balanced_allocation(np.array([2, 3]), 6)
    with pytest.raises(ValueError, match=">= 0"):
        balanced_allocation(np.array([2, -1]), 1)


def _grouped_trajectories(sizes, rng):
    """Well-separated trajectory groups: k-means recovers them exactly."""
    centers = np.arange(len(sizes))[:, None] * 10.0 + np.array([0.0, 1.0, 2.0])
    traj = np.concatenate(
        [c + 0.01 * rng.standard_normal((n, 3)) for c, n in zip(centers, sizes, strict=True)]
    )
    return traj, np.repeat(np.arange(len(sizes)), sizes)


@pytest.mark.parametrize(
    "budget, per_group",
    [(12, [0, 4, 4, 4]), (30, [0, 4, 10, 16]), (35, [1, 4, 10, 20])],
)
def test_s2l_spreads_budget_over_trajectory_clusters(budget, per_group):
    traj, group = _grouped_trajectories([2, 4, 10, 20], np.random.default_rng(0))
    sel = s2l_select(traj, budget, n_clusters=4, seed=0)
    assert len(sel) == budget and len(set(sel.indices.tolist())) == budget
    assert np.bincount(group[sel.indices], minlength=4).tolist() == per_group
    assert sorted(sel.cluster_sizes.values()) == [2, 4, 10, 20]
    assert {c: n for c, n in sel.cluster_budget.items() if n} == dict(Counter(sel.cluster.tolist()))
    if budget == 35:
        assert sum("leftover fill" in r for r in sel.reason) == 1
    assert all(r.startswith(("s2l: cluster ", "s2l: leftover fill, cluster ")) for r in sel.reason)


def test_exact_budget_and_no_duplicates_over_random_combos():
    rng = np.random.default_rng(1)
    for _ in range(25):
        n = int(rng.integers(1, 60))
        budget = int(rng.integers(1, n + 1))
        k = int(rng.integers(1, 12))
        traj = rng.random((n, 3))
        traj[rng.random((n, 3)) < 0.05] = np.nan
        sel = s2l_select(traj, budget, n_clusters=k, seed=int(rng.integers(100)), n_iter=5)
        assert len(sel) == budget and len(np.unique(sel.indices)) == budget
        assert sel.indices.min() >= 0 and sel.indices.max() < n
        assert sum(sel.cluster_budget.values()) == budget


def test_stratification_by_source():
    rng = np.random.default_rng(2)
    sources = np.array(["a"] * 3 + ["b"] * 10 + ["c"] * 50)
    traj = rng.random((63, 4))
    # a: 30 // 3 = 10 >= 3, whole; b: 27 // 2 = 13 >= 10, whole; c gets the remaining 17
    sel = s2l_select(traj, 30, n_clusters=5, sources=sources, seed=0)
    assert Counter(sources[sel.indices].tolist()) == {"a": 3, "b": 10, "c": 17}
    assert np.all(sel.cluster[sources[sel.indices] != "c"] == -1)
    assert np.all(sel.cluster[sources[sel.indices] == "c"] >= 0)
    assert any(r.startswith("s2l: source 'a' taken whole (size 3") for r in sel.reason)
    # 6 // 3 = 2 < 3: even the smallest source is clustered; every source gets 2
    sel = s2l_select(traj, 6, n_clusters=5, sources=sources, seed=0)
    assert Counter(sources[sel.indices].tolist()) == {"a": 2, "b": 2, "c": 2}
    assert len(np.unique(sel.cluster)) == len(sel.cluster_budget.keys() & set(sel.cluster))
    # cluster ids are global: no id is shared by two sources
    owner = {}
    for c, s in zip(sel.cluster.tolist(), sources[sel.indices].tolist(), strict=True):
        assert owner.setdefault(c, s) == s


def test_nan_is_zero_and_stride_keeps_every_kth_column():
    rng = np.random.default_rng(3)
    traj = rng.random((40, 6))
    with_nan = traj.copy()
    with_nan[::7, 2] = np.nan
    zeroed = np.nan_to_num(with_nan, nan=0.0)
    a = s2l_select(with_nan, 10, n_clusters=4, seed=5)
    np.testing.assert_array_equal(a.indices, s2l_select(zeroed, 10, n_clusters=4, seed=5).indices)
    b = s2l_select(traj, 10, n_clusters=4, seed=5, checkpoint_stride=2)
    c = s2l_select(traj[:, ::2], 10, n_clusters=4, seed=5)
    np.testing.assert_array_equal(b.indices, c.indices)


def test_deterministic_and_seed_dependent():
    traj = np.random.default_rng(4).random((80, 3))
    a = s2l_select(traj, 20, n_clusters=5, seed=1)
    b = s2l_select(traj, 20, n_clusters=5, seed=1)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.reason, b.reason)
    assert not np.array_equal(a.indices, s2l_select(traj, 20, n_clusters=5, seed=2).indices)


def test_bad_inputs():
    traj = np.zeros((5, 2))
    for budget in (0, 6, -1):
        with pytest.raises(ValueError, match="budget"):
            s2l_select(traj, budget)
    with pytest.raises(ValueError, match="infinite"):
        s2l_select(np.array([[0.0, np.inf], [1.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="2-D"):
        s2l_select(np.zeros(5), 1)
    with pytest.raises(ValueError, match="checkpoint_stride"):
        s2l_select(traj, 1, checkpoint_stride=0)
    with pytest.raises(ValueError, match="sources"):
        s2l_select(traj, 1, sources=np.zeros(4))
