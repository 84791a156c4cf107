import numpy as np
import pytest

from selection.baselines import loss_select, random_select, semdedup


def test_random_select():
    sel = random_select(100, 10, seed=0)
    assert len(sel) == 10 and len(np.unique(sel.indices)) == 10
    assert sel.indices.min() >= 0 and sel.indices.max() < 100
    assert set(sel.reason) == {"random"} and np.all(sel.cluster == -1)
    np.testing.assert_array_equal(sel.indices, random_select(100, 10, seed=0).indices)
    assert not np.array_equal(sel.indices, random_select(100, 10, seed=1).indices)
    assert len(random_select(100, 0.25, seed=0)) == 25
    assert sorted(random_select(5, 5, seed=0).indices.tolist()) == [0, 1, 2, 3, 4]


LOSSES = np.array([0.5, 3.0, np.nan, 1.0, 3.0, 2.0])


@pytest.mark.parametrize(
    "mode, budget, expected",
    [
        ("highest", 3, [1, 4, 5]),  # tie 3.0 at rows 1 and 4: lower index first
        ("lowest", 2, [0, 3]),
        # increasing loss over the 5 rows with a loss: 0, 3, 5, 1, 4; the median is row 5
        ("middle", 1, [5]),
        ("middle", 3, [3, 5, 1]),
        ("middle", 4, [0, 3, 5, 1]),
        ("highest", 6, [1, 4, 5, 3, 0, 2]),  # the NaN row only when nothing else is left
        ("lowest", 6, [0, 3, 5, 1, 4, 2]),
        ("middle", 6, [0, 3, 5, 1, 4, 2]),
    ],
)
def test_loss_select_by_hand(mode, budget, expected):
    sel = loss_select(LOSSES, budget, mode=mode)
    assert sel.indices.tolist() == expected
    assert all(r.startswith(f"loss-{mode}: ") for r in sel.reason)
    assert ("NaN" in sel.reason[-1]) == (budget == 6)


def test_loss_select_reason_and_errors():
    sel = loss_select(LOSSES, 1, mode="highest")
    assert sel.reason[0] == "loss-highest: loss 3 (rank 1 of 5 by decreasing loss)"
    with pytest.raises(ValueError, match="highest"):
        loss_select(LOSSES, 1, mode="top")
    with pytest.raises(ValueError, match="1-D"):
        loss_select(np.zeros((2, 2)), 1, mode="lowest")
    with pytest.raises(ValueError, match="budget"):
        loss_select(LOSSES, 7, mode="lowest")


def _brute_force_keep(x, threshold):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        for j in range(i):
            if keep[j] and x[i] @ x[j] >= threshold - 1e-6:
                keep[i] = False
                break
    return keep


def test_semdedup_removes_planted_duplicates():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((8, 32))  # nearly orthogonal: cosine well below 0.9
    dups = np.stack(
        [
            base[0] + 0.05 * rng.standard_normal(32),
            base[3] * 2.5,  # same direction, other norm: an exact duplicate by cosine
            base[0] + 0.05 * rng.standard_normal(32),
            base[5].copy(),
        ]
    )
    x = np.concatenate([base, dups])
    expected = np.array([True] * 8 + [False] * 4)
    for k in (1, 3):
        np.testing.assert_array_equal(semdedup(x, 0.95, seed=0, n_clusters=k), expected)
    # threshold 1.0 still catches the exact copies (float32 tolerance), not the noisy ones
    keep = semdedup(x, 1.0, seed=0, n_clusters=1)
    assert keep.tolist() == [True] * 8 + [True, False, True, False]


def test_semdedup_matches_brute_force_in_one_cluster():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 3))  # low dimension: many pairs above the threshold
    for threshold in (0.9, 0.99):
        np.testing.assert_array_equal(
            semdedup(x, threshold, seed=0, n_clusters=1), _brute_force_keep(x, threshold)
        )


def test_semdedup_errors():
    for bad in (0.0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="threshold"):
            semdedup(np.ones((3, 2)), bad, seed=0)
    with pytest.raises(ValueError, match="2-D"):
        semdedup(np.ones(3), 0.9, seed=0)
