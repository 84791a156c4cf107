import numpy as np
import pytest

from selection.base import Selection, resolve_budget
from selection.selectors import SELECTORS, required_features, select

N = 30
RNG = np.random.default_rng(0)
FEATURES = {
    "trajectories": RNG.random((N, 4)),
    "embeddings": RNG.standard_normal((N, 8)),
    "losses": RNG.random(N),
    "sources": np.array(["x", "y", "z"] * 10),
}


def test_registry_names_and_required_features():
    assert set(SELECTORS) == {
        "random",
        "s2l",
        "clusterclip",
        "loss-highest",
        "loss-lowest",
        "loss-middle",
        "semdedup-random",
    }
    assert required_features("random") == set()
    assert required_features("s2l") == {"trajectories"}
    assert required_features("clusterclip") == {"embeddings"}
    assert required_features("semdedup-random") == {"embeddings"}
    for mode in ("highest", "lowest", "middle"):
        assert required_features(f"loss-{mode}") == {"losses"}


@pytest.mark.parametrize("method", sorted(SELECTORS))
@pytest.mark.parametrize("budget, count", [(7, 7), (0.5, 15)])
def test_every_method_meets_the_budget(method, budget, count):
    sel = select(method, budget, n_rows=N, seed=1, **FEATURES)
    assert isinstance(sel, Selection) and len(sel) == count
    assert len(np.unique(sel.indices)) == count
    assert sel.indices.min() >= 0 and sel.indices.max() < N
    assert len(sel.reason) == count and all(isinstance(r, str) and r for r in sel.reason)
    again = select(method, budget, n_rows=N, seed=1, **FEATURES)
    np.testing.assert_array_equal(sel.indices, again.indices)


def test_params_are_forwarded():
    sel = select("s2l", 6, n_rows=N, trajectories=FEATURES["trajectories"], n_clusters=3)
    assert len(sel.cluster_sizes) <= 3
    sel = select("s2l", 6, n_rows=N, **FEATURES)  # sources given: stratified, 2 per source
    assert sorted(np.unique(FEATURES["sources"][sel.indices], return_counts=True)[1]) == [2, 2, 2]
    sel = select("clusterclip", 30, n_rows=N, embeddings=FEATURES["embeddings"], max_repeats=2)
    assert len(sel) == 30 and np.bincount(sel.indices).max() <= 2
    same = np.ones((10, 4))  # all duplicates: one row survives, the rest fill the budget
    sel = select("semdedup-random", 4, n_rows=10, embeddings=same, threshold=0.99, n_clusters=2)
    assert sum("fills budget" in r for r in sel.reason) == 3


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown selection method 'best'.*'random'"):
        select("best", 3, n_rows=N)
    with pytest.raises(ValueError, match="unknown selection method"):
        required_features("best")
    with pytest.raises(ValueError, match="method 's2l' needs trajectories"):
        select("s2l", 3, n_rows=N, embeddings=FEATURES["embeddings"])
    with pytest.raises(ValueError, match="method 'loss-lowest' needs losses"):
        select("loss-lowest", 3, n_rows=N)
    with pytest.raises(ValueError, match=r"feature 'losses' must have one row per candidate"):
        select("loss-lowest", 3, n_rows=N, losses=np.ones(N - 1))
    with pytest.raises(ValueError, match=r"does not take parameter\(s\) \['n_clusters'\]"):
        select("random", 3, n_rows=N, n_clusters=4)
    with pytest.raises(ValueError, match="budget"):
        select("random", 0, n_rows=N)


@pytest.mark.parametrize(
    "budget, n_rows, expected",
    [(1, 10, 1), (10, 10, 10), (0.5, 10, 5), (0.25, 10, 3), (1.0, 7, 7), (0.001, 10, 1)],
)
def test_resolve_budget(budget, n_rows, expected):
    assert resolve_budget(budget, n_rows) == expected
    assert isinstance(resolve_budget(np.int64(3), 10), int)


@pytest.mark.parametrize("bad", [0, -3, 11, 0.0, -0.5, 1.5, float("nan"), float("inf"), True])
def test_resolve_budget_errors(bad):
    with pytest.raises(ValueError, match=r"budget must be an int in \[1, 10\]"):
        resolve_budget(bad, 10)
    with pytest.raises(ValueError, match="at least 1 row"):
        resolve_budget(1, 0)
