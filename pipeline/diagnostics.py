"""Why did held-out loss change? Per-token diagnostics between two models on the same data.

Implements the analysis of Oncel et al., "Adaptation Odyssey in LLMs: Why Does Additional
Pretraining Sometimes Fail to Improve?" (arXiv 2410.05581): score the same held-out real
tokens under a model before (A) and after (B) a round of training, and ask which tokens the
change in loss sits on. Their finding: most of a perplexity increase sits on a few
uninformative tokens (newlines, whitespace, punctuation). Also the similarity of two sets of
texts from their sentence embeddings (the paper relates degradation to that similarity).

Everything here is a pure numpy/pandas function over arrays, except `compare_models` (runs
two models with `pipeline.model`, no Ray) and `diagnose_generation` (reads two `eval.parquet`).

The accounting, for the masked (scored) token occurrences, each with a loss under A and B:

- per token id: `count` occurrences, mean losses `loss_a`, `loss_b`, `delta = loss_b - loss_a`
  and `delta_sum = count * delta`, the total loss that token id added (negative: removed);
- per category: `tokens` (occurrences), `share` of all occurrences, occurrence-weighted
  `loss_a` / `loss_b` / `mean_delta`, `delta_sum` (net), and `share_of_increase`: the part of
  the total *added* loss that falls in the category. A token id "rises" when its `delta_sum`
  is positive; the total added loss is the sum of `delta_sum` over the rising ids; a
  category's share is the sum over its rising ids divided by that total. Falling ids do not
  offset rising ones (a net sum could be near zero and make shares meaningless), the shares
  add up to 1 over the categories, and they are NaN when no token id rose. Aggregating per
  token id before clipping, rather than per occurrence, keeps sampling noise on individual
  occurrences from counting as an "increase" when the id as a whole did not get worse.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data import DataError
from pipeline.metrics import perplexity

# Token categories: name -> regex, matched in order against the whole decoded token text
# (re.fullmatch); the first match wins, and a token matching none is a FALLBACK word piece.
DEFAULT_CATEGORIES: dict[str, str] = {
    "whitespace/newline": r"\s+",
    "punctuation": r"\s*(?:[^\w\s]|_)+\s*",
    "digits": r"\s*\d+\s*",
}
FALLBACK = "word pieces"
SPECIAL = "special"  # the tokenizer's special tokens (<eos>, <pad>, ...), decided by id

TOKEN_COLUMNS = ["token_id", "token", "category", "count", "loss_a", "loss_b", "delta", "delta_sum"]
CATEGORY_COLUMNS = [
    "category",
    "tokens",
    "share",
    "loss_a",
    "loss_b",
    "mean_delta",
    "delta_sum",
    "share_of_increase",
]


# --------------------------------------------------------------------------- categories


def token_category(token_text: str, categories: Mapping[str, str] | None = None) -> str:
    """The category of one decoded token: the first pattern of `categories` that matches the
    whole text, else FALLBACK ("word pieces").

    >>> token_category("\\n"), token_category(" ,"), token_category("42"), token_category("the")
    ('whitespace/newline', 'punctuation', 'digits', 'word pieces')
    """
    for name, pattern in (DEFAULT_CATEGORIES if categories is None else categories).items():
        if re.fullmatch(pattern, token_text):
            return name
    return FALLBACK


def category_order(categories: Mapping[str, str] | None = None) -> list[str]:
    """Display order of the categories: the map's order, then FALLBACK, then SPECIAL."""
    return [*(DEFAULT_CATEGORIES if categories is None else categories), FALLBACK, SPECIAL]


def token_texts(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """The text of each token id: a HF tokenizer's decoding of the id alone, or a lookup when
    `tokenizer` is a mapping id -> text."""
    if isinstance(tokenizer, Mapping):
        return [tokenizer[int(i)] for i in token_ids]
    return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in token_ids]


def _special_ids(tokenizer) -> set[int]:
    if isinstance(tokenizer, Mapping):
        return set()
    return {int(i) for i in getattr(tokenizer, "all_special_ids", [])}


# --------------------------------------------------------------------------- accounting


def _flat(values, dtype) -> np.ndarray:
    """A 2-D array, or ragged rows (a list / Series of 1-D arrays), as one flat array."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values.astype(dtype, copy=False).reshape(-1)
    rows = [np.asarray(row, dtype=dtype).reshape(-1) for row in values]
    return np.concatenate(rows) if rows else np.zeros(0, dtype=dtype)


def token_loss_table(
    token_ids,
    losses_a,
    losses_b,
    mask,
    tokenizer,
    *,
    categories: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Per token id: how its loss changed from model A to model B.

    Args:
        token_ids, losses_a, losses_b, mask: the same shape, (N, L) arrays or N ragged 1-D
            rows; position j holds a target token, its loss under A and B, and whether it is
            scored (as `pipeline.model.token_losses` returns them, ids = input_ids[:, 1:]).
        tokenizer: a HF tokenizer, or a mapping token id -> text.
        categories: name -> regex (see `token_category`); None: DEFAULT_CATEGORIES.

    Returns:
        One row per token id that occurs in a scored position, by id: token_id, token (its
        text), category, count, loss_a, loss_b (mean losses), delta = loss_b - loss_a,
        delta_sum = count * delta.
    """
    ids = _flat(token_ids, np.int64)
    a, b = _flat(losses_a, np.float64), _flat(losses_b, np.float64)
    keep = _flat(mask, bool)
    if not (len(ids) == len(a) == len(b) == len(keep)):
        raise ValueError(
            "token_ids, losses_a, losses_b and mask must have the same shape; got "
            f"{len(ids)}, {len(a)}, {len(b)} and {len(keep)} positions"
        )
    ids, a, b = ids[keep], a[keep], b[keep]
    unique, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    sum_a = np.bincount(inverse, weights=a, minlength=len(unique))
    sum_b = np.bincount(inverse, weights=b, minlength=len(unique))
    texts = token_texts(tokenizer, unique)
    special = _special_ids(tokenizer)
    table = pd.DataFrame(
        {
            "token_id": unique,
            "token": texts,
            "category": [
                SPECIAL if int(i) in special else token_category(t, categories)
                for i, t in zip(unique, texts)
            ],
            "count": counts.astype(np.int64),
            "loss_a": sum_a / np.maximum(counts, 1),
            "loss_b": sum_b / np.maximum(counts, 1),
        }
    )
    table["delta"] = table["loss_b"] - table["loss_a"]
    table["delta_sum"] = sum_b - sum_a
    return table[TOKEN_COLUMNS]


def category_breakdown(
    table: pd.DataFrame, categories: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Per category, from a `token_loss_table`: where the change in loss sits.

    Returns:
        One row per category that occurs, in `category_order`: category, tokens
        (occurrences), share (of all occurrences), loss_a, loss_b, mean_delta (weighted by
        occurrence), delta_sum (net added loss) and share_of_increase (the category's part of
        the loss added by rising token ids; see the module docstring; NaN if none rose).
    """
    rising = table["delta_sum"].clip(lower=0.0)
    grouped = (
        table.assign(
            weighted_a=table["loss_a"] * table["count"],
            weighted_b=table["loss_b"] * table["count"],
            increase=rising,
        )
        .groupby("category", sort=False)[
            ["count", "weighted_a", "weighted_b", "delta_sum", "increase"]
        ]
        .sum()
    )
    order = category_order(categories)
    known = [c for c in order if c in grouped.index]
    grouped = grouped.loc[known + sorted(c for c in grouped.index if c not in order)]
    tokens = grouped["count"].to_numpy(dtype=np.int64)
    total_tokens, total_increase = tokens.sum(), rising.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        out = pd.DataFrame(
            {
                "category": grouped.index.astype(str),
                "tokens": tokens,
                "share": tokens / total_tokens if total_tokens else np.nan,
                "loss_a": grouped["weighted_a"].to_numpy() / tokens,
                "loss_b": grouped["weighted_b"].to_numpy() / tokens,
                "mean_delta": grouped["delta_sum"].to_numpy() / tokens,
                "delta_sum": grouped["delta_sum"].to_numpy(),
                "share_of_increase": (
                    grouped["increase"].to_numpy() / total_increase
                    if total_increase > 0
                    else np.nan
                ),
            }
        )
    return out.reset_index(drop=True)[CATEGORY_COLUMNS]


def top_risers(table: pd.DataFrame, n: int = 10, by: str = "delta_sum") -> pd.DataFrame:
    """The `n` token ids whose loss rose most, by `by`: "delta_sum" (total added loss, the
    default: a frequent token that rose a little can matter more than a rare one that rose a
    lot) or "delta" (mean rise per occurrence). Only ids with delta > 0; ties by token id."""
    if by not in ("delta_sum", "delta"):
        raise ValueError(f"by must be 'delta_sum' or 'delta', got {by!r}")
    risers = table[table["delta"] > 0]
    risers = risers.sort_values([by, "token_id"], ascending=[False, True], kind="stable")
    return risers.head(n).reset_index(drop=True)


@dataclass
class Diagnosis:
    """Per-token comparison of model A (before) and model B (after) on the same tokens."""

    tokens: pd.DataFrame  # token_loss_table: one row per token id
    categories: pd.DataFrame  # category_breakdown
    risers: pd.DataFrame  # top_risers
    loss_a: float  # mean loss per scored token under A
    loss_b: float
    perplexity_a: float  # exp(loss_a)
    perplexity_b: float
    n_tokens: int  # scored token occurrences
    n_rows: int  # examples

    def summary(self) -> dict:
        """The scalar results, for a JSON file or a log line."""
        return {
            "rows": self.n_rows,
            "tokens": self.n_tokens,
            "loss_a": self.loss_a,
            "loss_b": self.loss_b,
            "perplexity_a": self.perplexity_a,
            "perplexity_b": self.perplexity_b,
        }


def diagnose(
    token_ids,
    losses_a,
    losses_b,
    mask,
    tokenizer,
    *,
    categories: Mapping[str, str] | None = None,
    top: int = 10,
) -> Diagnosis:
    """The full comparison from per-position arrays (see `token_loss_table` for the shapes)."""
    table = token_loss_table(token_ids, losses_a, losses_b, mask, tokenizer, categories=categories)
    count = table["count"].to_numpy()
    loss_a, ppl_a = perplexity(table["loss_a"].to_numpy() * count, count)
    loss_b, ppl_b = perplexity(table["loss_b"].to_numpy() * count, count)
    return Diagnosis(
        tokens=table,
        categories=category_breakdown(table, categories),
        risers=top_risers(table, top),
        loss_a=loss_a,
        loss_b=loss_b,
        perplexity_a=ppl_a,
        perplexity_b=ppl_b,
        n_tokens=int(count.sum()),
        n_rows=len(token_ids),
    )


# --------------------------------------------------------------------------- two evaluations


def compare_evals(
    eval_a: pd.DataFrame,
    eval_b: pd.DataFrame,
    tokenizer,
    *,
    categories: Mapping[str, str] | None = None,
    top: int = 10,
) -> Diagnosis:
    """Compare two `eval.parquet` frames of the same held-out rows (token_ids, token_losses,
    token_mask per row), e.g. generation g-1 against generation g, without running a model.

    Rows may be padded to different lengths (they were batched differently); only the scored
    positions are compared, and they must hold the same token ids row by row.

    Raises:
        DataError: a column is missing, or the two frames did not score the same tokens.
    """
    columns = ("token_ids", "token_losses", "token_mask")
    for name, frame in (("A", eval_a), ("B", eval_b)):
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DataError(f"evaluation {name}: missing per-token column(s) {', '.join(missing)}")
    if len(eval_a) != len(eval_b):
        raise DataError(
            f"the evaluations hold {len(eval_a)} and {len(eval_b)} rows; "
            "they must score the same held-out rows"
        )
    ids, la, lb = [], [], []
    a = eval_a[list(columns)].itertuples(index=False)
    b = eval_b[list(columns)].itertuples(index=False)
    for row, ((ids_a, loss_a, mask_a), (ids_b, loss_b, mask_b)) in enumerate(zip(a, b)):
        mask_a, mask_b = np.asarray(mask_a, bool), np.asarray(mask_b, bool)
        scored_a, scored_b = np.asarray(ids_a)[mask_a], np.asarray(ids_b)[mask_b]
        if not np.array_equal(scored_a, scored_b):
            raise DataError(
                f"row {row + 1}: the two evaluations scored different tokens "
                "(different held-out data or tokenizer)"
            )
        ids.append(scored_a)
        la.append(np.asarray(loss_a)[mask_a])
        lb.append(np.asarray(loss_b)[mask_b])
    masks = [np.ones(len(r), dtype=bool) for r in ids]
    return diagnose(ids, la, lb, masks, tokenizer, categories=categories, top=top)


def diagnose_generation(
    previous_dir: str | Path,
    current_dir: str | Path,
    *,
    trust_remote_code: bool = False,
    categories: Mapping[str, str] | None = None,
    top: int = 10,
) -> Diagnosis:
    """Generation g (`current_dir`, e.g. RUN/gen_03) against generation g-1 (`previous_dir`)
    on the held-out data, from their `eval.parquet`; the tokenizer is `current_dir/model`'s.
    The loop writes `diagnosis.categories` to `current_dir/diagnostics.parquet`."""
    from transformers import AutoTokenizer

    previous_dir, current_dir = Path(previous_dir), Path(current_dir)
    frames = []
    for directory in (previous_dir, current_dir):
        path = directory / "eval.parquet"
        if not path.is_file():
            raise DataError(f"{path}: not found (the generation has not been evaluated)")
        frames.append(pd.read_parquet(path, columns=["token_ids", "token_losses", "token_mask"]))
    tokenizer = AutoTokenizer.from_pretrained(
        str(current_dir / "model"), trust_remote_code=trust_remote_code
    )
    return compare_evals(*frames, tokenizer, categories=categories, top=top)


# --------------------------------------------------------------------------- two models


def compare_models(
    model_a: str | Path,
    model_b: str | Path,
    frame: pd.DataFrame,
    *,
    max_length: int,
    add_eos: bool,
    batch_size: int,
    device: str = "cpu",
    trust_remote_code: bool = False,
    categories: Mapping[str, str] | None = None,
    top: int = 10,
) -> Diagnosis:
    """Score the responses of `frame` (prompt, response) under two models and compare.

    Both models score exactly the same encoded rows (the loss is on the response tokens,
    as in training); one model is in memory at a time.

    Raises:
        DataError: a model cannot be loaded, the two tokenizers differ, or the rows are longer
            than a model's context.
    """
    from pipeline.model import encode_examples, token_losses

    for column in ("prompt", "response"):
        if column not in frame.columns:
            raise DataError(f"the examples need a {column!r} column")
    paths = [check_model_path(model_a), check_model_path(model_b)]
    tokenizers = [_load_tokenizer(p, trust_remote_code) for p in paths]
    if tokenizers[0].get_vocab() != tokenizers[1].get_vocab():
        raise DataError(
            f"{model_a} and {model_b} have different tokenizers "
            f"({len(tokenizers[0])} and {len(tokenizers[1])} tokens); per-token losses can "
            "only be compared between models that share a vocabulary"
        )
    encode = dict(max_length=max_length, add_eos=add_eos)
    prompts, responses = frame["prompt"].tolist(), frame["response"].tolist()
    encoded = encode_examples(tokenizers[0], prompts, responses, **encode)
    if not np.array_equal(
        encoded.input_ids, encode_examples(tokenizers[1], prompts, responses, **encode).input_ids
    ):
        raise DataError(
            f"{model_a} and {model_b}: the tokenizers share a vocabulary but encode the "
            "examples differently (special tokens or normalisation differ)"
        )
    losses = []
    for path in paths:
        model = _load_model(path, trust_remote_code, device)
        limit = _context_length(model)
        if limit is not None and encoded.input_ids.shape[1] > limit:
            raise DataError(
                f"{path}: takes at most {limit} tokens, the examples are "
                f"{encoded.input_ids.shape[1]}; set max_length={limit}"
            )
        scored, mask = token_losses(model, encoded, batch_size)
        losses.append(scored)
        del model
        gc.collect()
    return diagnose(
        encoded.input_ids[:, 1:],
        losses[0],
        losses[1],
        mask,
        tokenizers[0],
        categories=categories,
        top=top,
    )


# What `tokenizer.save_pretrained` leaves; a directory with none of them has no tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def check_model_path(path: str | Path) -> str:
    """`path` as a string, or a DataError when it was meant as a local model directory and
    is not one: missing, a file, no config.json or no tokenizer in it. A hub id such as
    "gpt2" or "org/name", or a storage URI, passes; loading it is checked later."""
    from pipeline.storage import is_uri

    text = str(path)
    if is_uri(text):
        return text
    local = Path(text).expanduser()
    if local.is_file():
        raise DataError(f"{text}: a file, not a model directory")
    if local.exists():
        if not (local / "config.json").is_file():
            raise DataError(f"{text}: not a model directory (no config.json in it)")
        if not any((local / name).is_file() for name in TOKENIZER_FILES):
            raise DataError(
                f"{text}: no tokenizer in the model directory (no tokenizer.json or "
                "tokenizer_config.json; save one there with tokenizer.save_pretrained)"
            )
        return str(local)
    parts = Path(text).parts
    # A hub id is "name" or "org/name"; anything else, or a path whose first folder exists
    # here, was meant as a local directory.
    looks_local = (
        local.is_absolute()
        or text.startswith((".", "~"))
        or len(parts) > 2
        or (len(parts) == 2 and Path(parts[0]).is_dir())
    )
    if looks_local:
        raise DataError(f"{text}: model directory not found")
    return text


def _load_tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    with _loading(path):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(path: str, trust_remote_code: bool, device: str):
    from pipeline.model import load_model

    with _loading(path):
        model, _ = load_model(path, trust_remote_code=trust_remote_code, device=device)
    return model


@contextmanager
def _loading(path: str) -> Iterator[None]:
    """Turn a loading failure (not a model, no such hub id, offline) into a DataError."""
    try:
        yield
    except (OSError, ValueError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: cannot load the model ({first_line})") from None


def _context_length(model) -> int | None:
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# --------------------------------------------------------------------------- embeddings


def _as_matrix(name: str, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name}: expected a non-empty (n, d) array of embeddings, got {x.shape}")
    return x


def mean_embedding_cosine(a, b) -> float:
    """Cosine similarity of the centroids of two sets of embeddings, in [-1, 1].

    Each row is scaled to unit length first, so every text weighs the same whatever its norm
    (sentence embeddings are compared by direction). 1: the two sets point the same way on
    average. Coarse: two different distributions can share a centroid (see `embedding_mmd`).

    Args:
        a: (n, d) embeddings of one set of texts; b: (m, d) of the other.
    """
    a, b = _as_matrix("a", a), _as_matrix("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding widths differ: {a.shape[1]} and {b.shape[1]}")

    def centroid(x: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return (x / np.where(norms > 0, norms, 1.0)).mean(axis=0)

    ca, cb = centroid(a), centroid(b)
    denominator = np.linalg.norm(ca) * np.linalg.norm(cb)
    return float(ca @ cb / denominator) if denominator > 0 else float("nan")


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.maximum(d, 0.0)


def median_bandwidth(a, b) -> float:
    """The median heuristic: the median distance between distinct rows of a and b pooled.

    Fix it once (e.g. on generation 0's data) to compare `embedding_mmd` across generations:
    MMD values computed with different bandwidths are not on the same scale.
    """
    pooled = np.concatenate([_as_matrix("a", a), _as_matrix("b", b)])
    distances = np.sqrt(_squared_distances(pooled, pooled)[np.triu_indices(len(pooled), 1)])
    positive = distances[distances > 0]
    return float(np.median(positive)) if len(positive) else 1.0


def embedding_mmd(a, b, *, bandwidth: float | None = None) -> float:
    """Distance between two distributions of embeddings: the unbiased squared Maximum Mean
    Discrepancy with a Gaussian kernel k(x, y) = exp(-|x - y|^2 / (2 bandwidth^2)) (Gretton
    et al., JMLR 2012).

    Why MMD rather than a Fréchet distance: the Fréchet distance fits one Gaussian per set and
    needs a d x d covariance and its matrix square root; with sentence embeddings (d = 384 or
    more) and a few hundred texts per set the covariance is rank-deficient and the estimate is
    biased by the sample size. MMD is non-parametric, has an unbiased estimator that works
    from tens of samples, and with a Gaussian kernel is zero exactly when the distributions
    are equal. Cost O((n + m)^2 d): subsample to a few thousand rows.

    Args:
        a: (n, d) embeddings, n >= 2; b: (m, d), m >= 2.
        bandwidth: kernel width; None: `median_bandwidth(a, b)`.

    Returns:
        MMD^2 estimate: about 0 (it can be slightly negative) when a and b come from the same
        distribution, up to 2 for completely separated ones.
    """
    a, b = _as_matrix("a", a), _as_matrix("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding widths differ: {a.shape[1]} and {b.shape[1]}")
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        raise ValueError(f"embedding_mmd needs at least 2 rows per set, got {n} and {m}")
    sigma = median_bandwidth(a, b) if bandwidth is None else float(bandwidth)
    if not sigma > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    gamma = 1.0 / (2.0 * sigma * sigma)
    k_aa = np.exp(-gamma * _squared_distances(a, a))
    k_bb = np.exp(-gamma * _squared_distances(b, b))
    k_ab = np.exp(-gamma * _squared_distances(a, b))
    within_a = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within_a + within_b - 2.0 * k_ab.mean())
