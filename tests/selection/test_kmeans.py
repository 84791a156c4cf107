import numpy as np
import pytest

from selection.kmeans import default_n_clusters, kmeans, l2_normalize


def _blobs(rng, centers, n_per, scale):
    x = np.concatenate([c + scale * rng.standard_normal((n_per, len(c))) for c in centers])
    truth = np.repeat(np.arange(len(centers)), n_per)
    order = rng.permutation(len(x))
    return x[order], truth[order]


def _same_partition(labels, truth):
    pairs = set(zip(labels.tolist(), truth.tolist(), strict=True))
    return len(pairs) == len(set(truth.tolist())) == len(set(labels.tolist()))


@pytest.mark.parametrize("spherical", [False, True])
def test_labels_are_brute_force_nearest_centroid(spherical):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5))
    result = kmeans(x, 7, seed=1, n_iter=5, spherical=spherical)
    assert result.centroids.shape == (7, 5) and result.centroids.dtype == np.float32
    assert result.labels.shape == (200,) and result.labels.dtype == np.int64
    c = result.centroids.astype(np.float64)
    if spherical:
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = xn @ c.T
        assigned = sim[np.arange(200), result.labels]
        assert np.all(assigned >= sim.max(axis=1) - 1e-5)
        assert result.inertia == pytest.approx(np.sum(1 - assigned), rel=1e-4)
        np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    else:
        dist = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        assigned = dist[np.arange(200), result.labels]
        assert np.all(assigned <= dist.min(axis=1) + 1e-4)
        assert result.inertia == pytest.approx(assigned.sum(), rel=1e-4)


def test_euclidean_recovers_separated_blobs():
    rng = np.random.default_rng(1)
    centers = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0], [-8.0, -8.0, 8.0]])
    x, truth = _blobs(rng, centers, 25, 0.3)
    assert _same_partition(kmeans(x, 4, seed=0).labels, truth)


def test_spherical_recovers_directions_regardless_of_norm():
    rng = np.random.default_rng(2)
    centers = np.eye(4)[:3] * 5.0
    x, truth = _blobs(rng, centers, 20, 0.2)
    scaled = x * rng.uniform(0.1, 10.0, size=(len(x), 1))  # norms must not matter
    a = kmeans(x, 3, seed=0, spherical=True).labels
    b = kmeans(scaled, 3, seed=0, spherical=True).labels
    assert _same_partition(a, truth) and _same_partition(b, truth)


def test_n_clusters_clipped_to_rows_and_duplicates_do_not_crash():
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    result = kmeans(x, 10, seed=0)
    assert result.centroids.shape == (3, 2)
    assert sorted(result.labels.tolist()) == [0, 1, 2]
    same = np.ones((6, 3))
    for spherical in (False, True):
        res = kmeans(same, 3, seed=0, spherical=spherical)
        assert res.labels.min() >= 0 and res.labels.max() < 3
        assert res.inertia == pytest.approx(0.0, abs=1e-6)


def test_deterministic_for_a_seed():
    x = np.random.default_rng(3).standard_normal((120, 4))
    a, b = kmeans(x, 5, seed=7), kmeans(x, 5, seed=7)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        kmeans(np.ones(5), 2, seed=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        kmeans(np.array([[0.0], [np.nan]]), 1, seed=0)
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans(np.ones((3, 2)), 0, seed=0)


def test_helpers():
    assert default_n_clusters(1) == 1 and default_n_clusters(10_000) == 100
    assert default_n_clusters(10**8) == 1000
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
