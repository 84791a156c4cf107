"""Boosting-style curation of self-generated data.

Implements the weak curation signals of "Escaping Collapse: The Strength of Weak Data for
LLM Training" (Amin et al., arXiv 2502.08924):

- a gamma-noisy filter that keeps correct samples slightly more often than wrong ones
  (`noisy_filter`), or a score-based filter where no verifier exists (`score_filter`);
- a beta-weak labeler whose calls are the labeling budget (`WeakLabeler`);
- the boosting step: spend the budget on the prompts none of whose samples passed the
  filter (`allocate_label_budget` with strategy "hard-first").

Shapes: per-sample arrays (`is_correct`, `kept`, `scores`, `prompt_ids` of the samples) are
1-D of length n_samples; per-prompt arrays (`pass_rate` and its `prompt_ids`) are 1-D of
length n_prompts. Everything is deterministic for a given `np.random.Generator`.
"""

from __future__ import annotations

import math
import numbers
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

LABEL_ALLOCATIONS = ("uniform", "hard-first")
CURATION_STRATEGIES = ("none", "filter", "filter+labels-uniform", "filter+labels-hard")

_DIGITS = "0123456789"


def _as_1d(name: str, values: np.ndarray, *, require_bool: bool = False) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {array.shape}")
    if require_bool and array.dtype != np.bool_:
        raise ValueError(f"{name} must be a bool array, got dtype {array.dtype}")
    return array


def _check_same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have the same length, got {lengths}")


def _count_from_fraction(fraction: float, n: int) -> int:
    # The epsilon keeps 0.29 * 100 = 28.999999999999996 from rounding down to 28.
    return math.floor(fraction * n + 1e-9)


def noisy_filter(is_correct: np.ndarray, gamma: float, rng: np.random.Generator) -> np.ndarray:
    """Gamma-noisy filter over verifier results.

    A correct sample is kept with probability 1/2 + gamma, a wrong one with 1/2 - gamma.
    gamma = 0.5 is the exact verifier, gamma = 0 a coin flip.

    Args:
        is_correct: bool, shape (n_samples,): the verifier's verdict per sample.
        gamma: the filter's edge over chance, in [0, 0.5].
        rng: source of the filter's noise.

    Returns:
        bool keep-mask, shape (n_samples,).

    Raises:
        ValueError: gamma outside [0, 0.5], or `is_correct` not a 1-D bool array.
    """
    if not 0.0 <= gamma <= 0.5:
        raise ValueError(f"gamma must be in [0, 0.5] (0.5 = exact verifier), got {gamma}")
    is_correct = _as_1d("is_correct", is_correct, require_bool=True)
    u = rng.random(len(is_correct))
    # u is in [0, 1): with gamma = 0.5 a correct sample is always kept, a wrong one never.
    return np.where(is_correct, u < 0.5 + gamma, u < 0.5 - gamma)


def score_filter(
    scores: np.ndarray,
    *,
    threshold: float | None = None,
    top_fraction: float | None = None,
    higher_is_better: bool = True,
) -> np.ndarray:
    """Filter for tasks without a verifier: keep samples by a score column.

    The score can be a loss under a reference model, a length or a reward. Give exactly
    one of `threshold` (keep scores >= threshold, or <= when lower is better) and
    `top_fraction` (keep the best floor(top_fraction * n_scored) samples, at least one,
    where n_scored counts the non-NaN scores). NaN scores are never kept. Ties at the
    top-fraction cut go to the earlier row (stable sort).

    Args:
        scores: float, shape (n_samples,).
        threshold: inclusive cut-off on the score.
        top_fraction: fraction of the scored samples to keep, in (0, 1].
        higher_is_better: False for losses and other lower-is-better scores.

    Returns:
        bool keep-mask, shape (n_samples,).
    """
    if (threshold is None) == (top_fraction is None):
        raise ValueError("give exactly one of threshold or top_fraction")
    scores = _as_1d("scores", scores).astype(float)
    scored = ~np.isnan(scores)

    if threshold is not None:
        if math.isnan(threshold):
            raise ValueError("threshold must be a number, got NaN")
        # Comparisons with NaN are False, so NaN scores drop out here.
        return scores >= threshold if higher_is_better else scores <= threshold

    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    keep = np.zeros(len(scores), dtype=bool)
    scored_rows = np.flatnonzero(scored)
    if len(scored_rows) == 0:
        return keep
    n_keep = max(1, _count_from_fraction(top_fraction, len(scored_rows)))
    values = scores[scored_rows]
    order = np.argsort(-values if higher_is_better else values, kind="stable")
    keep[scored_rows[order[:n_keep]]] = True
    return keep


def prompt_pass_rates(prompt_ids: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt, the fraction of its samples that passed the filter.

    Args:
        prompt_ids: shape (n_samples,): the prompt each sample answers (ints or strings).
        kept: bool, shape (n_samples,): the filter's keep-mask.

    Returns:
        (unique prompt ids sorted, pass rate per prompt), both shape (n_prompts,).
    """
    prompt_ids = _as_1d("prompt_ids", prompt_ids)
    kept = _as_1d("kept", kept, require_bool=True)
    _check_same_length(prompt_ids=prompt_ids, kept=kept)
    unique_ids, prompt_index = np.unique(prompt_ids, return_inverse=True)
    prompt_index = prompt_index.reshape(-1)
    n_samples = np.bincount(prompt_index, minlength=len(unique_ids))
    n_passed = np.bincount(prompt_index, weights=kept.astype(float), minlength=len(unique_ids))
    return unique_ids, n_passed / n_samples


def resolve_budget(budget: int | float, n_prompts: int) -> int:  # noqa: PYI041
    """Turn a label budget into a number of prompts.

    Args:
        budget: a count (int >= 0) or a fraction of the prompts (float in [0, 1]).
        n_prompts: number of prompts this round.

    Returns:
        The count, never more than n_prompts; a fraction is rounded down.

    Raises:
        ValueError: bool, negative, NaN, a float above 1, or not a number.
    """
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, numbers.Integral) or n_prompts < 0:
        raise ValueError(f"n_prompts must be an int >= 0, got {n_prompts!r}")
    # bool is an int subclass: `true` in a config is a mistake, reported like any bad value.
    if isinstance(budget, (bool, np.bool_)):
        raise ValueError(  # noqa: TRY004
            f"label budget must be an int count or a float fraction, got {budget!r}"
        )
    if isinstance(budget, numbers.Integral):
        if budget < 0:
            raise ValueError(f"label budget must be a count >= 0, got {budget}")
        return min(int(budget), n_prompts)
    if isinstance(budget, numbers.Real):
        if math.isnan(budget):
            raise ValueError("label budget must be a number, got NaN")
        if not 0.0 <= budget <= 1.0:
            raise ValueError(
                f"label budget given as a float is a fraction of the prompts and must be in "
                f"[0, 1], got {budget}; give a count as an int (e.g. 100)"
            )
        return min(_count_from_fraction(float(budget), n_prompts), n_prompts)
    raise ValueError(
        f"label budget must be an int count or a float fraction, got {budget!r} "
        f"({type(budget).__name__})"
    )


def allocate_label_budget(
    prompt_ids: np.ndarray,
    pass_rate: np.ndarray,
    budget: int,
    strategy: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """Choose which prompts get a label this round.

    Strategies:
        "uniform": `budget` prompts uniformly at random without replacement.
        "hard-first" (the boosting step): prompts by pass rate ascending, so the hard ones
            (pass rate 0) come first; ties broken at random; take the first `budget`.

    Args:
        prompt_ids: shape (n_prompts,), unique (as returned by `prompt_pass_rates`).
        pass_rate: float, shape (n_prompts,).
        budget: number of labels, int >= 0 (see `resolve_budget`).
        strategy: one of LABEL_ALLOCATIONS.
        rng: source of the random choice and of the tie-breaking.

    Returns:
        The chosen prompt ids, length min(budget, n_prompts), no duplicates; for
        "hard-first" in the order they were ranked.
    """
    if strategy not in LABEL_ALLOCATIONS:
        raise ValueError(f"unknown label allocation {strategy!r}; valid: {LABEL_ALLOCATIONS}")
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 0:
        raise ValueError(f"budget must be an int >= 0 (see resolve_budget), got {budget!r}")
    prompt_ids = _as_1d("prompt_ids", prompt_ids)
    pass_rate = _as_1d("pass_rate", pass_rate).astype(float)
    _check_same_length(prompt_ids=prompt_ids, pass_rate=pass_rate)
    if len(np.unique(prompt_ids)) != len(prompt_ids):
        raise ValueError("prompt_ids must be unique (one entry per prompt)")
    if np.isnan(pass_rate).any():
        raise ValueError("pass_rate must not contain NaN")

    n_chosen = min(int(budget), len(prompt_ids))
    if strategy == "uniform":
        chosen = rng.choice(len(prompt_ids), size=n_chosen, replace=False)
    else:
        # Shuffle first, then a stable sort: equal pass rates end up in random order.
        shuffled = rng.permutation(len(prompt_ids))
        ranked = shuffled[np.argsort(pass_rate[shuffled], kind="stable")]
        chosen = ranked[:n_chosen]
    return prompt_ids[chosen]


def near_miss(answer: str, rng: np.random.Generator) -> str:
    """A plausible wrong answer: `answer` with exactly one character changed.

    One digit is changed to a different digit; an answer without digits has one ASCII
    letter changed to a different letter of the same case. A near miss, not a random
    string, is what makes a weak labeler's mistakes realistic (see docs/CALIBRATION.md).

    Raises:
        ValueError: the answer has no digit and no ASCII letter (e.g. empty).
    """
    positions = [i for i, char in enumerate(answer) if char in _DIGITS]
    if positions:
        alphabet = _DIGITS
    else:
        positions = [i for i, char in enumerate(answer) if char in string.ascii_letters]
        if not positions:
            raise ValueError(f"cannot make a near miss of {answer!r}: no digit or ASCII letter")
        alphabet = None  # chosen per position below, to keep the letter's case

    position = positions[rng.integers(len(positions))]
    old = answer[position]
    if alphabet is None:
        alphabet = string.ascii_lowercase if old.islower() else string.ascii_uppercase
    replacements = [char for char in alphabet if char != old]
    new = replacements[rng.integers(len(replacements))]
    return answer[:position] + new + answer[position + 1 :]


class Labeler(Protocol):
    """What the loop asks of any labeler (a weak simulated one here; a bigger model or a
    human queue later). One call per prompt is one unit of the labeling budget."""

    def label(
        self, prompts: Sequence[str], references: Sequence[str], rng: np.random.Generator
    ) -> list[str]: ...


@dataclass(frozen=True)
class WeakLabeler:
    """Beta-weak labeler: the reference answer with probability beta, otherwise a plausible
    wrong one (`near_miss` by default). One call per prompt is one unit of the budget.

    Attributes:
        beta: probability that a label is correct, in [0, 1].
        wrong_answer: makes a wrong answer from the reference.
    """

    beta: float
    wrong_answer: Callable[[str, np.random.Generator], str] = near_miss

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")

    def label(
        self, prompts: Sequence[str], references: Sequence[str], rng: np.random.Generator
    ) -> list[str]:
        """Label each prompt; `references` holds the true answers, used only to simulate.

        Returns:
            One label per prompt, in order.
        """
        if len(prompts) != len(references):
            raise ValueError(
                f"need one reference per prompt, got {len(prompts)} prompts and "
                f"{len(references)} references"
            )
        correct = rng.random(len(references)) < self.beta
        return [
            reference if is_right else self.wrong_answer(reference, rng)
            for reference, is_right in zip(references, correct, strict=True)
        ]


def filter_quality(kept: np.ndarray, is_correct: np.ndarray) -> dict[str, float]:
    """The filter measured against the verifier.

    Args:
        kept: bool, shape (n_samples,): the filter's keep-mask.
        is_correct: bool, shape (n_samples,): the verifier's verdict.

    Returns:
        precision (correct among kept), recall (kept among correct), kept_fraction,
        keep_rate_correct (equal to recall) and keep_rate_wrong; NaN where the
        denominator is zero.
    """
    kept = _as_1d("kept", kept, require_bool=True)
    is_correct = _as_1d("is_correct", is_correct, require_bool=True)
    _check_same_length(kept=kept, is_correct=is_correct)

    def ratio(numerator: int, denominator: int) -> float:
        return float(numerator / denominator) if denominator else math.nan

    n_kept_correct = int(np.sum(kept & is_correct))
    n_kept_wrong = int(np.sum(kept & ~is_correct))
    n_correct = int(np.sum(is_correct))
    recall = ratio(n_kept_correct, n_correct)
    return {
        "precision": ratio(n_kept_correct, int(np.sum(kept))),
        "recall": recall,
        "kept_fraction": ratio(int(np.sum(kept)), len(kept)),
        "keep_rate_correct": recall,
        "keep_rate_wrong": ratio(n_kept_wrong, len(kept) - n_correct),
    }


@dataclass(frozen=True)
class CurationPlan:
    """What a curation strategy does.

    Attributes:
        use_filter: run the filter over the synthetic samples and keep what passes.
        label_allocation: None (no labels), "uniform" or "hard-first".
    """

    use_filter: bool
    label_allocation: str | None

    def __post_init__(self) -> None:
        if self.label_allocation is not None and self.label_allocation not in LABEL_ALLOCATIONS:
            raise ValueError(
                f"label_allocation must be None or one of {LABEL_ALLOCATIONS}, "
                f"got {self.label_allocation!r}"
            )

    @property
    def uses_labels(self) -> bool:
        return self.label_allocation is not None


_PLANS = {
    "none": CurationPlan(use_filter=False, label_allocation=None),
    "filter": CurationPlan(use_filter=True, label_allocation=None),
    "filter+labels-uniform": CurationPlan(use_filter=True, label_allocation="uniform"),
    "filter+labels-hard": CurationPlan(use_filter=True, label_allocation="hard-first"),
}


def parse_strategy(name: str) -> CurationPlan:
    """Curation strategy name -> what it does.

    Raises:
        ValueError: unknown name; the message lists CURATION_STRATEGIES.
    """
    if name not in _PLANS:
        raise ValueError(f"unknown curation strategy {name!r}; valid: {CURATION_STRATEGIES}")
    return _PLANS[name]
