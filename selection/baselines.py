"""Baseline selection methods: random, loss-based, and SemDeDup near-duplicate removal.

- `random_select`: uniform without replacement (the control every method must beat).
- `loss_select`: by one loss per row (e.g. a proxy model's final loss): the highest-loss rows
  (hard/informative, or noisy), the lowest (easy/clean), or the middle around the median.
- `semdedup`: SemDeDup, Abbas et al., arXiv 2303.09540: cluster L2-normalised embeddings
  with spherical k-means and, inside each cluster, drop rows whose cosine similarity to a
  kept row is >= threshold, keeping one representative per near-duplicate group.

Inputs: `losses` of shape (N,); `embeddings` of shape (N, D).
"""

from __future__ import annotations

import math

import numpy as np

from selection.base import Selection, resolve_budget
from selection.kmeans import default_n_clusters, kmeans, l2_normalize

LOSS_MODES = ("highest", "lowest", "middle")
# Cosine similarities are computed in float32: an exact duplicate can score 1 - 1e-7.
_SIM_TOLERANCE = 1e-6
# Similarity blocks inside a cluster are kept near this many floats.
_BLOCK_FLOATS = 1 << 22


def random_select(n_rows: int, budget: int | float, *, seed: int) -> Selection:
    """`budget` distinct rows of `n_rows`, uniformly at random (same seed, same rows)."""
    budget = resolve_budget(budget, n_rows)
    rng = np.random.default_rng(seed)
    indices = rng.choice(int(n_rows), budget, replace=False).astype(np.int64)
    reason = np.empty(budget, dtype=object)
    reason[:] = "random"
    return Selection(indices=indices, cluster=np.full(budget, -1), reason=reason)


def loss_select(losses: np.ndarray, budget: int | float, *, mode: str) -> Selection:
    """Select rows by their loss.

    Args:
        losses: (N,) one loss per row. NaN means "no loss"; +-inf are ordinary values.
        budget: rows to select (see `base.resolve_budget`).
        mode: "highest" (largest losses first), "lowest" (smallest first), or "middle"
            (the `budget` rows whose rank in increasing loss is centred on the median,
            listed in increasing loss).

    Returns:
        Selection; ties are broken by row index (lower first). NaN rows are chosen only when
        the budget exceeds the rows with a loss, then in row order, after all the others.

    Raises:
        ValueError: unknown mode, losses not a non-empty 1-D array, bad budget.
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"loss mode must be one of {list(LOSS_MODES)}; got {mode!r}")
    values = np.asarray(losses, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"losses must be a non-empty 1-D array (N,); got shape {values.shape}")
    budget = resolve_budget(budget, len(values))
    has_loss = np.flatnonzero(~np.isnan(values))
    n_loss = len(has_loss)
    ascending = has_loss[np.argsort(values[has_loss], kind="stable")]
    if mode == "highest":
        ranked = has_loss[np.argsort(-values[has_loss], kind="stable")]
        chosen = ranked[:budget]
        ranks = np.arange(1, len(chosen) + 1)
        how = "by decreasing loss"
    elif mode == "lowest":
        chosen = ascending[:budget]
        ranks = np.arange(1, len(chosen) + 1)
        how = "by increasing loss"
    else:
        start = max(0, (n_loss - budget) // 2)
        chosen = ascending[start : start + budget]
        ranks = np.arange(start + 1, start + len(chosen) + 1)
        how = f"by increasing loss, median rank {(n_loss + 1) / 2:g}"
    reasons = [
        f"loss-{mode}: loss {values[i]:.4g} (rank {r} of {n_loss} {how})"
        for i, r in zip(chosen.tolist(), ranks.tolist(), strict=True)
    ]
    n_nan = budget - len(chosen)
    if n_nan > 0:
        chosen = np.concatenate([chosen, np.flatnonzero(np.isnan(values))[:n_nan]])
        reasons += [f"loss-{mode}: NaN loss, fills the budget"] * n_nan
    reason = np.empty(budget, dtype=object)
    reason[:] = reasons
    return Selection(indices=chosen, cluster=np.full(budget, -1), reason=reason)


def semdedup(
    embeddings: np.ndarray,
    threshold: float,
    *,
    seed: int,
    n_clusters: int | None = None,
    n_iter: int = 10,
) -> np.ndarray:
    """Near-duplicate removal by cosine similarity inside spherical k-means clusters.

    Rows are visited in index order inside each cluster; a row is dropped when its cosine
    similarity to an earlier kept row of the same cluster is >= threshold (minus 1e-6 for
    float32 rounding). So every dropped row has a kept near-duplicate, no two kept rows of a
    cluster are near-duplicates, and the lowest-index row of a duplicate group is kept.
    Near-duplicates split across two clusters are not compared (SemDeDup's approximation;
    more rows per cluster means fewer misses). All-zero rows are never duplicates.

    Cost: k-means O(N * K * D * n_iter) plus O(N * (N / K) * D) for the pairwise step.

    Args:
        embeddings: (N, D) embeddings (normalised here).
        threshold: cosine similarity in (0, 1] at or above which two rows are duplicates
            (SemDeDup's 1 - eps, e.g. 0.95).
        seed: k-means seed.
        n_clusters: K; default round(sqrt(N)) capped at 1000, clipped to N.
        n_iter: k-means iterations.

    Returns:
        (N,) bool mask, True for rows to keep.

    Raises:
        ValueError: bad threshold or embeddings.
    """
    if isinstance(threshold, bool) or not (
        isinstance(threshold, (int, float, np.floating, np.integer))
        and math.isfinite(threshold)
        and 0.0 < threshold <= 1.0
    ):
        raise ValueError(f"threshold must be a cosine similarity in (0, 1]; got {threshold!r}")
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty 2-D array (N, D); got {x.shape}")
    x = l2_normalize(x)
    n_rows = x.shape[0]
    k = default_n_clusters(n_rows) if n_clusters is None else n_clusters
    labels = kmeans(x, k, seed=seed, n_iter=n_iter, spherical=True).labels
    cut = float(threshold) - _SIM_TOLERANCE
    keep = np.ones(n_rows, dtype=bool)
    sizes = np.bincount(labels)
    for members in np.split(np.argsort(labels, kind="stable"), np.cumsum(sizes)[:-1]):
        if len(members) > 1:
            keep[members] = _greedy_keep(x[members], cut)
    return keep


def _greedy_keep(x: np.ndarray, cut: float) -> np.ndarray:
    """Keep-mask for one cluster's unit rows: drop a row similar (>= cut) to an earlier kept one."""
    m = len(x)
    keep = np.ones(m, dtype=bool)
    block = max(1, min(m, _BLOCK_FLOATS // m))
    for b0 in range(0, m, block):
        rows = x[b0 : b0 + block]
        end = b0 + len(rows)
        dup = (rows @ x[:end].T) >= cut
        # Only earlier rows count: column j must be < the row's own position b0 + r.
        dup &= np.arange(end)[None, :] < np.arange(b0, end)[:, None]
        for r in np.flatnonzero(dup.any(axis=1)):
            i = b0 + r
            if (dup[r, :i] & keep[:i]).any():
                keep[i] = False
    return keep
