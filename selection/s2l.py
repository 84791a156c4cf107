"""S2L (SmallToLarge) data selection: Yang et al., arXiv 2403.07384 (BigML-CS-UCLA/S2L).

A small proxy model is fine-tuned on all candidates; each candidate's mean response-token loss
at every saved checkpoint forms its loss trajectory. Candidates are clustered by trajectory
(Euclidean k-means, official default K=100, 20 iterations) and the budget is spread as evenly
as possible over the clusters, so examples that learn alike are represented alike.

Input: `trajectories` of shape (N examples, T checkpoints), optional `sources` of shape (N,).

Procedure, as in the official code:
1. NaN losses become 0; keep every `checkpoint_stride`-th checkpoint column.
2. Optional stratification by source: sources from smallest to largest, each gets
   remaining_budget // remaining_sources; a source no larger than its share is taken whole,
   otherwise steps 3-5 run inside it with its share.
3. k-means on the rows.
4. Clusters with <= 2 rows are left out of the first pass. The rest are visited from smallest
   to largest (ties by cluster id); each gets remaining_budget // remaining_clusters, is taken
   whole when no larger than that share, else sampled uniformly without replacement.
5. Leftover budget is drawn uniformly from the rows of the left-out small clusters (then, if
   ever needed, from the unselected rows of the other clusters).
The result has exactly `budget` distinct rows.
"""

from __future__ import annotations

import numpy as np

from selection.base import Selection, resolve_budget
from selection.kmeans import kmeans

# Official S2L leaves clusters of at most this many rows out of the first pass.
SMALL_CLUSTER_SIZE = 2


def balanced_allocation(
    cluster_sizes: np.ndarray,
    budget: int,
    *,
    small_cluster_size: int = SMALL_CLUSTER_SIZE,
    seed: int = 0,
) -> np.ndarray:
    """How many rows S2L takes from each cluster (steps 4-5 of the module docstring).

    Args:
        cluster_sizes: (K,) non-negative ints, rows per cluster.
        budget: rows to take in total, 0 <= budget <= sum(cluster_sizes).
        small_cluster_size: clusters with at most this many rows wait for the leftover fill.
        seed: only used by the leftover fill, which draws rows uniformly from the pooled small
            clusters (so which small clusters get them is random).

    Returns:
        (K,) int64 counts, count[k] <= cluster_sizes[k], summing to `budget`.

    Raises:
        ValueError: negative sizes, or a budget outside [0, sum(cluster_sizes)].
    """
    first, fill, _ = _allocate(cluster_sizes, budget, small_cluster_size, seed)
    return first + fill


def _allocate(
    cluster_sizes: np.ndarray, budget: int, small_cluster_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (first-pass counts, leftover-fill counts, visiting order of the first pass)."""
    sizes = np.asarray(cluster_sizes, dtype=np.int64).reshape(-1)
    if (sizes < 0).any():
        raise ValueError(f"cluster sizes must be >= 0; got {sizes.tolist()}")
    total = int(sizes.sum())
    if isinstance(budget, bool) or int(budget) != budget or not 0 <= budget <= total:
        raise ValueError(f"budget must be an int in [0, {total}] (total rows); got {budget!r}")
    first = np.zeros_like(sizes)
    big = sizes > small_cluster_size
    order = np.flatnonzero(big)
    order = order[np.argsort(sizes[order], kind="stable")]  # smallest first, ties by id
    remaining = int(budget)
    for position, k in enumerate(order):
        share = remaining // (len(order) - position)
        first[k] = min(int(sizes[k]), share)
        remaining -= int(first[k])
    fill = np.zeros_like(sizes)
    if remaining > 0:
        rng = np.random.default_rng(seed)
        # Small clusters first, then whatever the first pass left in the others; uniform
        # over rows means multivariate-hypergeometric counts over clusters.
        for small_only in (True, False):
            pool = sizes - first - fill
            if small_only:
                pool[big] = 0
            take = min(remaining, int(pool.sum()))
            if take > 0:
                fill += rng.multivariate_hypergeometric(pool, take)
                remaining -= take
    return first, fill, order


def s2l_select(
    trajectories: np.ndarray,
    budget: int,
    *,
    n_clusters: int = 100,
    seed: int = 0,
    n_iter: int = 20,
    sources: np.ndarray | None = None,
    checkpoint_stride: int = 1,
) -> Selection:
    """Select `budget` rows by S2L (see the module docstring for the procedure).

    Args:
        trajectories: (N, T) per-example mean response loss at each of T proxy checkpoints.
            NaN becomes 0; +-inf is refused.
        budget: rows to select, an int in [1, N] (or a fraction in (0, 1], see
            `base.resolve_budget`).
        n_clusters: k-means K (official default 100), clipped to the rows clustered.
        seed: seeds k-means and the uniform sampling inside clusters.
        n_iter: k-means iterations (official default 20).
        sources: optional (N,) source/category labels to stratify by.
        checkpoint_stride: keep every k-th checkpoint column (1 keeps all).

    Returns:
        Selection of exactly `budget` distinct rows, in selection order; cluster ids are
        global across sources; rows of a source taken whole have cluster -1.

    Raises:
        ValueError: bad shapes, infinite losses, bad budget / stride / n_clusters.
    """
    traj = np.asarray(trajectories, dtype=np.float64)
    if traj.ndim != 2 or traj.shape[0] == 0 or traj.shape[1] == 0:
        raise ValueError(
            f"trajectories must be a non-empty 2-D array (N examples, T checkpoints); "
            f"got shape {traj.shape}"
        )
    n_rows = traj.shape[0]
    budget = resolve_budget(budget, n_rows)
    if isinstance(checkpoint_stride, bool) or int(checkpoint_stride) != checkpoint_stride:
        raise ValueError(f"checkpoint_stride must be an int >= 1; got {checkpoint_stride!r}")
    if checkpoint_stride < 1:
        raise ValueError(f"checkpoint_stride must be an int >= 1; got {checkpoint_stride!r}")
    if isinstance(n_clusters, bool) or int(n_clusters) != n_clusters or n_clusters < 1:
        raise ValueError(f"n_clusters must be an int >= 1; got {n_clusters!r}")
    if np.isinf(traj).any():
        bad = int(np.flatnonzero(np.isinf(traj).any(axis=1))[0])
        raise ValueError(f"trajectories row {bad} has an infinite loss; only NaN is mapped to 0")
    traj = np.nan_to_num(traj[:, :: int(checkpoint_stride)], nan=0.0)

    rng = np.random.default_rng(seed)
    if sources is None:
        groups = [(None, np.arange(n_rows))]
    else:
        groups = _source_groups(np.asarray(sources), n_rows)

    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    cluster_sizes: dict[int, int] = {}
    cluster_budget: dict[int, int] = {}
    remaining, next_cluster_id = budget, 0
    for position, (name, rows) in enumerate(groups):
        share = remaining // (len(groups) - position)
        prefix = "s2l:" if sources is None else f"s2l: source {name!r}"
        if sources is not None and len(rows) <= share:
            parts.append(
                (
                    rows,
                    np.full(len(rows), -1),
                    _reasons(len(rows), f"{prefix} taken whole (size {len(rows)}, share {share})"),
                )
            )
            remaining -= len(rows)
            continue
        if share == 0:
            continue
        part, sizes, taken = _select_in_group(
            traj[rows],
            share,
            n_clusters,
            n_iter,
            int(rng.integers(2**31)),
            rng,
            prefix,
            next_cluster_id,
        )
        local, labels, reason = part
        parts.append((rows[local], labels, reason))
        cluster_sizes.update(sizes)
        cluster_budget.update(taken)
        next_cluster_id = max(sizes) + 1
        remaining -= share
    return Selection(  # budget >= 1, so `parts` is never empty
        indices=np.concatenate([p[0] for p in parts]),
        cluster=np.concatenate([p[1] for p in parts]),
        reason=np.concatenate([p[2] for p in parts]),
        cluster_sizes=cluster_sizes,
        cluster_budget=cluster_budget,
    )


def _source_groups(sources: np.ndarray, n_rows: int) -> list[tuple[object, np.ndarray]]:
    """(source name, row indices) per source, smallest source first (ties by name)."""
    if sources.shape != (n_rows,):
        raise ValueError(
            f"sources must have one label per trajectory row, shape ({n_rows},); "
            f"got shape {sources.shape}"
        )
    names, inverse, counts = np.unique(sources, return_inverse=True, return_counts=True)
    rows_by_source = np.argsort(inverse, kind="stable")
    splits = np.split(rows_by_source, np.cumsum(counts)[:-1])
    order = np.argsort(counts, kind="stable")
    return [(names[i].item() if hasattr(names[i], "item") else names[i], splits[i]) for i in order]


def _select_in_group(
    traj: np.ndarray,
    budget: int,
    n_clusters: int,
    n_iter: int,
    kmeans_seed: int,
    rng: np.random.Generator,
    prefix: str,
    cluster_offset: int,
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict[int, int], dict[int, int]]:
    """Cluster one group's trajectories and spend `budget` over its clusters.

    Returns ((local row indices, global cluster ids, reasons), cluster sizes, cluster budgets),
    where the dicts are keyed by global cluster id (local id + cluster_offset).
    """
    labels = kmeans(traj, n_clusters, seed=kmeans_seed, n_iter=n_iter).labels
    sizes = np.bincount(labels)
    members = np.split(np.argsort(labels, kind="stable"), np.cumsum(sizes)[:-1])
    nonempty = np.flatnonzero(sizes)  # k-means can leave clusters empty; they play no part
    first, fill, order = _allocate(
        sizes[nonempty], budget, SMALL_CLUSTER_SIZE, int(rng.integers(2**31))
    )
    picked: dict[int, np.ndarray] = {}  # position in `nonempty` -> rows taken so far
    parts: list[tuple[np.ndarray, int, str]] = []  # (local rows, global id, reason)
    for j in order:
        if first[j] > 0:
            rows = members[nonempty[j]]
            chosen = rows if first[j] == len(rows) else rng.choice(rows, first[j], replace=False)
            picked[j] = chosen
            gid = cluster_offset + int(nonempty[j])
            parts.append(
                (chosen, gid, f"{prefix} cluster {gid} (size {len(rows)}, budget {first[j]})")
            )
    for j in np.argsort(sizes[nonempty], kind="stable"):
        if fill[j] > 0:
            rows = members[nonempty[j]]
            if j in picked:  # a first-pass cluster topped up: only its unpicked rows
                rows = np.setdiff1d(rows, picked[j])
            chosen = rng.choice(rows, fill[j], replace=False)
            gid = cluster_offset + int(nonempty[j])
            parts.append(
                (chosen, gid, f"{prefix} leftover fill, cluster {gid} (size {sizes[nonempty[j]]})")
            )
    counts = first + fill
    return (
        (
            np.concatenate([rows for rows, _, _ in parts]),
            np.concatenate([np.full(len(rows), gid, dtype=np.int64) for rows, gid, _ in parts]),
            np.concatenate([_reasons(len(rows), text) for rows, _, text in parts]),
        ),
        {cluster_offset + int(c): int(sizes[c]) for c in nonempty},
        {cluster_offset + int(c): int(n) for c, n in zip(nonempty, counts, strict=True)},
    )


def _reasons(count: int, text: str) -> np.ndarray:
    """`count` copies of one reason string (one shared str object)."""
    out = np.empty(count, dtype=object)
    out[:] = text
    return out
