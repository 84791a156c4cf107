"""Mix: real data and synthetic data into one training set.

`replace` trains on the newest generation's synthetic data only; `accumulate` keeps every
earlier generation's as well (Gerstgrasser et al.). `mix.real_fraction` of the training set
is real data (Shumailov; Fu et al.). Weak labels (curation) count on the synthetic side.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.config import MixConfig

COLUMNS = ["prompt", "response", "source", "origin_generation"]


def mix(
    real: pd.DataFrame, synthetic: list[pd.DataFrame], cfg: MixConfig, rng: np.random.Generator
) -> pd.DataFrame:
    """Build one generation's training set.

    Args:
        real: real examples (prompt, response).
        synthetic: per earlier generation, oldest first, its curated rows (prompt, response,
            source, origin_generation); the last entry is this generation's.
        cfg: real fraction, replace/accumulate, size.

    Returns:
        Shuffled rows with COLUMNS; `source` is real, synthetic or labeled.
    """
    pools = synthetic[-1:] if cfg.mode == "replace" else synthetic
    side = pd.concat([p[COLUMNS] for p in pools], ignore_index=True) if pools else _empty()
    real = real.assign(source="real", origin_generation=-1)[COLUMNS]
    r = cfg.real_fraction
    if cfg.size is not None:
        n_real = int(round(cfg.size * r))
        n_side = cfg.size - n_real if len(side) else 0
    elif r >= 1.0 or len(side) == 0:
        n_real, n_side = (len(real) if r > 0 else 0), 0
    else:
        n_side = len(side)
        n_real = int(round(n_side * r / (1.0 - r)))
    parts = [_draw(real, n_real, rng), _draw(side, n_side, rng)]
    out = pd.concat(parts, ignore_index=True)
    return out.iloc[rng.permutation(len(out))].reset_index(drop=True)


def _draw(frame: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """n rows: without replacement while the frame has enough, otherwise whole copies + rest."""
    if n <= 0 or len(frame) == 0:
        return frame.iloc[:0]
    whole, rest = divmod(n, len(frame))
    index = np.concatenate(
        [np.tile(np.arange(len(frame)), whole), rng.choice(len(frame), rest, replace=False)]
    )
    return frame.iloc[index]


def _empty() -> pd.DataFrame:
    return pd.DataFrame(
        {c: pd.Series(dtype="int64" if c == "origin_generation" else "object") for c in COLUMNS}
    )


def composition(training_set: pd.DataFrame) -> dict[str, int]:
    """Rows per source, e.g. {"real": 400, "synthetic": 3600, "labeled": 400}."""
    counts = training_set["source"].value_counts()
    return {source: int(counts.get(source, 0)) for source in ("real", "synthetic", "labeled")}
