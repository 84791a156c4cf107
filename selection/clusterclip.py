"""ClusterClip sampling: Shao et al., arXiv 2402.14526 (code: choosewhatulike/cluster-clip).

Documents are clustered by their L2-normalised embeddings with spherical k-means. Training
then draws a cluster uniformly among the non-empty clusters and a document uniformly inside
it, so rare topics are seen as often as common ones (cluster-balanced sampling). The
repetition clip removes a document from its cluster's pool once it has been drawn
`max_repeats` times; a cluster whose pool is empty leaves the draw, so late in training the
sampling drifts back toward random over the large clusters instead of over-fitting the
small ones.

Inputs: `embeddings` of shape (N, D); `labels` of shape (N,) (any integer cluster ids).

Each draw costs O(1): rows are grouped by cluster in one array, each cluster's live pool is a
prefix of its slice, and a clipped document is swap-removed to the end of that prefix.
"""

from __future__ import annotations

import numpy as np

from selection.base import Selection, resolve_budget
from selection.kmeans import kmeans

# Uniform random numbers are drawn this many at a time for the sequential clip loop.
_RANDOM_BATCH = 1 << 16


def embed_clusters(
    embeddings: np.ndarray, n_clusters: int, *, seed: int, n_iter: int = 20
) -> np.ndarray:
    """Spherical k-means cluster id of every embedding row.

    Args:
        embeddings: (N, D) sentence embeddings (normalised here, need not be already).
        n_clusters: K, clipped to N. The paper uses K in the thousands for large corpora.
        seed: k-means seed.
        n_iter: Lloyd iterations.

    Returns:
        (N,) int64 labels in [0, K).
    """
    return kmeans(embeddings, n_clusters, seed=seed, n_iter=n_iter, spherical=True).labels


def clusterclip_order(
    labels: np.ndarray, n_draws: int, *, max_repeats: int, seed: int
) -> np.ndarray:
    """The order in which ClusterClip feeds documents to training, over several epochs.

    Args:
        labels: (N,) integer cluster id per document.
        n_draws: number of draws (documents fed to training), >= 0.
        max_repeats: R >= 1; a document drawn R times leaves its cluster's pool (paper
            sweeps R = 2..5).
        seed: same seed, same order.

    Returns:
        (M,) int64 row indices with M = n_draws, or fewer when every document has been
        drawn R times (M = N * R then). No document appears more than R times.

    Raises:
        ValueError: labels not a non-empty 1-D integer array, n_draws < 0, max_repeats < 1.
    """
    inverse, sizes = _cluster_index(labels)
    _check_count("n_draws", n_draws, minimum=0)
    _check_count("max_repeats", max_repeats, minimum=1)
    rng = np.random.default_rng(seed)

    # Rows grouped by cluster; cluster c's live pool is pool[start[c] : start[c] + live[c]].
    pool = np.argsort(inverse, kind="stable").tolist()
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    live = sizes.tolist()
    active = list(range(len(live)))  # clusters with a non-empty pool
    drawn = [0] * len(pool)
    out: list[int] = []
    n_draws = int(n_draws)
    while len(out) < n_draws and active:
        batch = min(_RANDOM_BATCH, n_draws - len(out))
        for u_cluster, u_row in rng.random((batch, 2)).tolist():
            if not active:
                break
            a = min(int(u_cluster * len(active)), len(active) - 1)
            c = active[a]
            p = start[c] + min(int(u_row * live[c]), live[c] - 1)
            doc = pool[p]
            out.append(doc)
            drawn[doc] += 1
            if drawn[doc] == max_repeats:  # clip: swap-remove from the live pool
                last = start[c] + live[c] - 1
                pool[p], pool[last] = pool[last], doc
                live[c] -= 1
                if live[c] == 0:  # empty cluster leaves the draw
                    active[a] = active[-1]
                    active.pop()
    return np.asarray(out, dtype=np.int64)


def balanced_order(labels: np.ndarray, n_draws: int, *, seed: int) -> np.ndarray:
    """Cluster-balanced sampling without the clip (the paper's baseline).

    Draws a cluster uniformly, then a document uniformly inside it, with replacement; the
    pools never shrink, so this is vectorised.

    Args:
        labels: (N,) integer cluster id per document.
        n_draws: number of draws, >= 0.
        seed: same seed, same order.

    Returns:
        (n_draws,) int64 row indices.
    """
    inverse, sizes = _cluster_index(labels)
    _check_count("n_draws", n_draws, minimum=0)
    rng = np.random.default_rng(seed)
    grouped = np.argsort(inverse, kind="stable")
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    clusters = rng.integers(len(sizes), size=int(n_draws))
    offsets = np.minimum(
        (rng.random(int(n_draws)) * sizes[clusters]).astype(np.int64), sizes[clusters] - 1
    )
    return grouped[start[clusters] + offsets]


def clusterclip_subset(labels: np.ndarray, budget: int, *, seed: int) -> Selection:
    """A one-shot subset of exactly `budget` distinct rows, cluster-balanced (R = 1).

    Small clusters are taken whole once their pool runs out; the rest of the budget is
    spread evenly (in expectation) over the larger clusters.

    Args:
        labels: (N,) integer cluster id per document.
        budget: rows to select, an int in [1, N] (or a fraction, see `base.resolve_budget`).
        seed: same seed, same subset.

    Returns:
        Selection in draw order, with each row's cluster id and per-cluster sizes/budgets.
    """
    labels = np.asarray(labels)
    _cluster_index(labels)  # validate before reading len(labels)
    budget = resolve_budget(budget, len(labels))
    return clusterclip_draws(labels, budget, max_repeats=1, seed=seed)


def clusterclip_draws(
    labels: np.ndarray, n_draws: int, *, max_repeats: int, seed: int
) -> Selection:
    """`clusterclip_order` as a Selection: row i may appear up to `max_repeats` times.

    With max_repeats = 1 this is `clusterclip_subset` (distinct rows). Reasons read
    "clusterclip: cluster 7 (size 12)"; cluster_budget counts draws per cluster.
    """
    labels = np.asarray(labels)
    inverse, sizes = _cluster_index(labels)
    order = clusterclip_order(labels, n_draws, max_repeats=max_repeats, seed=seed)
    ids = labels[np.unique(inverse, return_index=True)[1]]  # label of each compact cluster
    text = np.empty(len(ids), dtype=object)
    text[:] = [f"clusterclip: cluster {c} (size {n})" for c, n in zip(ids, sizes, strict=True)]
    taken = np.bincount(inverse[order], minlength=len(ids))
    return Selection(
        indices=order,
        cluster=labels[order].astype(np.int64),
        reason=text[inverse[order]],
        cluster_sizes={int(c): int(n) for c, n in zip(ids, sizes, strict=True)},
        cluster_budget={int(c): int(n) for c, n in zip(ids, taken, strict=True)},
    )


def _cluster_index(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(compact cluster index per row in [0, K), rows per compact cluster)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array; got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer cluster ids; got dtype {labels.dtype}")
    _, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), sizes


def _check_count(name: str, value: int, *, minimum: int) -> None:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
