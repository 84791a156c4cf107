"""What every selection method returns (`Selection`), and budget parsing (`resolve_budget`).

Not a paper: the shared contract of `selection/` methods (S2L, ClusterClip, baselines).
A Selection holds, for M selected rows out of N input rows, arrays of shape (M,).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class Selection:
    """Rows chosen by a selection method, with why each was chosen.

    Attributes:
        indices: (M,) int64 row indices into the method's input, in selection order,
            no duplicates (except `clusterclip_draws` with max_repeats > 1, which lists a
            training order where a row can recur).
        cluster: (M,) int64 cluster id of each selected row; -1 when the method (or that
            row's path through it) has no cluster.
        reason: (M,) object array of short human-readable strings, one per selected row,
            e.g. "s2l: cluster 7 (size 12, budget 3)" or "random".
        cluster_sizes: cluster id -> number of input rows in it (empty without clusters).
        cluster_budget: cluster id -> number of rows selected from it (empty without
            clusters).
    """

    indices: np.ndarray
    cluster: np.ndarray
    reason: np.ndarray
    cluster_sizes: dict[int, int] = field(default_factory=dict)
    cluster_budget: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        indices = np.asarray(self.indices, dtype=np.int64).reshape(-1)
        cluster = np.asarray(self.cluster, dtype=np.int64).reshape(-1)
        reason = np.asarray(self.reason, dtype=object).reshape(-1)
        if not (len(indices) == len(cluster) == len(reason)):
            raise ValueError(
                "Selection arrays must have one entry per selected row; got "
                f"indices {len(indices)}, cluster {len(cluster)}, reason {len(reason)}"
            )
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "cluster", cluster)
        object.__setattr__(self, "reason", reason)

    def __len__(self) -> int:
        return len(self.indices)


def resolve_budget(budget: int | float, n_rows: int) -> int:
    """Turn a budget into a row count.

    Args:
        budget: an int count in [1, n_rows], or a float fraction in (0, 1] of n_rows
            (rounded half up, at least 1 row).
        n_rows: number of candidate rows, >= 1.

    Returns:
        The number of rows to select, in [1, n_rows].

    Raises:
        ValueError: bool, zero, negative, NaN/inf, a float above 1, an int above n_rows,
            or n_rows < 1.
    """
    if isinstance(n_rows, bool) or not isinstance(n_rows, numbers.Integral) or n_rows < 1:
        raise ValueError(f"cannot select from {n_rows!r} rows: need at least 1 row")
    n_rows = int(n_rows)
    valid = f"an int in [1, {n_rows}] or a float fraction in (0, 1]"
    if isinstance(budget, (bool, np.bool_)):
        raise ValueError(f"budget must be {valid}; got the bool {budget!r}")
    if isinstance(budget, numbers.Integral):
        if not 1 <= budget <= n_rows:
            raise ValueError(f"budget must be {valid}; got {int(budget)} with {n_rows} rows")
        return int(budget)
    if isinstance(budget, numbers.Real):
        value = float(budget)
        if not math.isfinite(value) or not 0.0 < value <= 1.0:
            hint = " (for a count, pass an int)" if math.isfinite(value) and value > 1 else ""
            raise ValueError(f"budget must be {valid}; got {budget!r}{hint}")
        return min(n_rows, max(1, math.floor(value * n_rows + 0.5)))
    raise ValueError(f"budget must be {valid}; got {budget!r} of type {type(budget).__name__}")
