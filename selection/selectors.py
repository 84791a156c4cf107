"""One registry of selection methods, so the pipeline and CLI can pick one by name.

Not a paper of its own: it dispatches to S2L (Yang et al., arXiv 2403.07384), ClusterClip
(Shao et al., arXiv 2402.14526), SemDeDup (Abbas et al., arXiv 2303.09540) and the baselines.

Features, each with one row per candidate (N = n_rows):
    trajectories (N, T)  proxy-model loss per checkpoint        -> s2l
    embeddings   (N, D)  sentence embeddings                    -> clusterclip, semdedup-random
    losses       (N,)    one loss per row                       -> loss-highest/lowest/middle
    sources      (N,)    source/category label (optional)       -> s2l stratification

Usage:
    required_features("s2l")  # {"trajectories"}
    select("s2l", 0.1, n_rows=n, seed=0, trajectories=traj, n_clusters=100)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np

from selection.base import Selection, resolve_budget
from selection.baselines import loss_select, random_select, semdedup
from selection.clusterclip import clusterclip_draws, embed_clusters
from selection.kmeans import default_n_clusters
from selection.s2l import s2l_select

FEATURES = ("trajectories", "embeddings", "losses", "sources")


def _random(budget: int, *, n_rows: int, seed: int) -> Selection:
    return random_select(n_rows, budget, seed=seed)


def _s2l(
    budget: int,
    *,
    n_rows: int,
    seed: int,
    trajectories: np.ndarray,
    sources: np.ndarray | None = None,
    n_clusters: int = 100,
    n_iter: int = 20,
    checkpoint_stride: int = 1,
) -> Selection:
    return s2l_select(
        trajectories,
        budget,
        n_clusters=n_clusters,
        seed=seed,
        n_iter=n_iter,
        sources=sources,
        checkpoint_stride=checkpoint_stride,
    )


def _clusterclip(
    budget: int,
    *,
    n_rows: int,
    seed: int,
    embeddings: np.ndarray,
    n_clusters: int | None = None,
    n_iter: int = 20,
    max_repeats: int = 1,
) -> Selection:
    """Cluster-balanced subset; with max_repeats > 1, `budget` clipped draws (rows may recur)."""
    k = default_n_clusters(n_rows) if n_clusters is None else n_clusters
    labels = embed_clusters(embeddings, k, seed=seed, n_iter=n_iter)
    return clusterclip_draws(labels, budget, max_repeats=max_repeats, seed=seed)


def _loss(mode: str) -> Callable[..., Selection]:
    def select_by_loss(budget: int, *, n_rows: int, seed: int, losses: np.ndarray) -> Selection:
        return loss_select(losses, budget, mode=mode)

    return select_by_loss


def _semdedup_random(
    budget: int,
    *,
    n_rows: int,
    seed: int,
    embeddings: np.ndarray,
    threshold: float = 0.95,
    n_clusters: int | None = None,
    n_iter: int = 10,
) -> Selection:
    """SemDeDup, then uniform random among the kept rows.

    When fewer rows survive than the budget, the rest is drawn at random from the removed
    near-duplicates (their reason says so), so the budget is always met exactly.
    """
    keep = semdedup(embeddings, threshold, seed=seed, n_clusters=n_clusters, n_iter=n_iter)
    kept, removed = np.flatnonzero(keep), np.flatnonzero(~keep)
    rng = np.random.default_rng(seed)
    n_kept = min(budget, len(kept))
    chosen = [rng.choice(kept, n_kept, replace=False)]
    reasons = [f"semdedup-random: random among {len(kept)} rows kept at threshold {threshold}"]
    counts = [n_kept]
    if budget > n_kept:
        chosen.append(rng.choice(removed, budget - n_kept, replace=False))
        reasons.append(f"semdedup-random: near-duplicate (threshold {threshold}), fills budget")
        counts.append(budget - n_kept)
    reason = np.empty(budget, dtype=object)
    reason[:] = [text for text, n in zip(reasons, counts, strict=True) for _ in range(n)]
    return Selection(indices=np.concatenate(chosen), cluster=np.full(budget, -1), reason=reason)


# Each selector: (budget: int, *, n_rows, seed, <its features>, <its parameters>) -> Selection.
SELECTORS: dict[str, Callable[..., Selection]] = {
    "random": _random,
    "s2l": _s2l,
    "clusterclip": _clusterclip,
    "loss-highest": _loss("highest"),
    "loss-lowest": _loss("lowest"),
    "loss-middle": _loss("middle"),
    "semdedup-random": _semdedup_random,
}


def _signature(method: str) -> tuple[set[str], set[str], set[str]]:
    """(required features, optional features, tunable parameters) of a registered method."""
    required, optional, params = set(), set(), set()
    for name, p in inspect.signature(SELECTORS[method]).parameters.items():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or name in ("n_rows", "seed"):
            continue
        if name in FEATURES:
            (required if p.default is inspect.Parameter.empty else optional).add(name)
        else:
            params.add(name)
    return required, optional, params


def _check_method(method: str) -> None:
    if method not in SELECTORS:
        raise ValueError(f"unknown selection method {method!r}; valid methods: {list(SELECTORS)}")


def required_features(method: str) -> set[str]:
    """Features `method` cannot run without, e.g. {"trajectories"} for "s2l", set() for "random".

    Raises:
        ValueError: unknown method (the message lists the valid ones).
    """
    _check_method(method)
    return _signature(method)[0]


def select(
    method: str,
    budget: int | float,
    *,
    n_rows: int,
    seed: int = 0,
    trajectories: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    losses: np.ndarray | None = None,
    sources: np.ndarray | None = None,
    **params: object,
) -> Selection:
    """Run selection method `method` on `n_rows` candidates.

    Args:
        method: a key of SELECTORS.
        budget: int count in [1, n_rows] or float fraction in (0, 1] (`base.resolve_budget`).
        n_rows: number of candidates; every feature given must have n_rows rows.
        seed: same seed, same selection.
        trajectories, embeddings, losses, sources: features (see the module docstring);
            those the method does not use are ignored.
        **params: method parameters, e.g. n_clusters, n_iter, max_repeats, threshold,
            checkpoint_stride.

    Raises:
        ValueError: unknown method, bad budget, a needed feature missing or of the wrong
            length, or a parameter the method does not take.
    """
    _check_method(method)
    n = resolve_budget(budget, n_rows)
    required, optional, accepted = _signature(method)
    given = dict(trajectories=trajectories, embeddings=embeddings, losses=losses, sources=sources)
    missing = sorted(f for f in required if given[f] is None)
    if missing:
        raise ValueError(f"method {method!r} needs {' and '.join(missing)}")
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(
            f"method {method!r} does not take parameter(s) {unknown}; "
            f"it takes: {sorted(accepted) or 'none'}"
        )
    features = {}
    for name in sorted(required | optional):
        value = given[name]
        if value is None:
            continue
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] != n_rows:
            raise ValueError(
                f"feature {name!r} must have one row per candidate ({n_rows} rows); "
                f"got shape {value.shape}"
            )
        features[name] = value
    return SELECTORS[method](n, n_rows=n_rows, seed=seed, **features, **params)
