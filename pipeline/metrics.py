"""Evaluation metrics: accuracy, perplexity, and collapse signals of generated text."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams / all word n-grams over `texts` (0 when there are none)."""
    grams: Counter = Counter()
    for text in texts:
        words = text.split()
        grams.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def entropy_bits(counts: Counter) -> float:
    """Shannon entropy in bits of a frequency table."""
    total = sum(counts.values())
    if not total:
        return 0.0
    p = np.array(list(counts.values()), dtype=np.float64) / total
    return float(-(p * np.log2(p)).sum())


def collapse_signals(texts: list[str]) -> dict[str, float]:
    """Diversity of generated text; falling values signal collapse.

    Returns distinct-1/2 (word n-grams), character and word entropy (bits), vocabulary
    (distinct words) and mean length in characters.
    """
    words = Counter(w for t in texts for w in t.split())
    chars = Counter(c for t in texts for c in t)
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "char_entropy": entropy_bits(chars),
        "word_entropy": entropy_bits(words),
        "vocabulary": len(words),
        "mean_length": float(np.mean([len(t) for t in texts])) if texts else 0.0,
    }


def perplexity(loss_sum: np.ndarray, tokens: np.ndarray) -> tuple[float, float]:
    """(mean per-token loss, perplexity) over all tokens of all examples."""
    total = float(np.sum(tokens))
    if total == 0:
        return float("nan"), float("nan")
    loss = float(np.sum(loss_sum)) / total
    return loss, math.exp(loss)
