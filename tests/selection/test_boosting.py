import math

import numpy as np
import pytest

from selection.boosting import (
    CURATION_STRATEGIES,
    CurationPlan,
    Labeler,
    WeakLabeler,
    allocate_label_budget,
    filter_quality,
    near_miss,
    noisy_filter,
    parse_strategy,
    prompt_pass_rates,
    resolve_budget,
    score_filter,
)

# --- noisy_filter -------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.2, 0.4])
def test_noisy_filter_keep_rates_match_gamma(gamma):
    n = 200_000
    is_correct = np.arange(n) % 2 == 0
    kept = noisy_filter(is_correct, gamma, np.random.default_rng(0))
    assert kept.dtype == bool
    assert kept.shape == (n,)
    assert abs(kept[is_correct].mean() - (0.5 + gamma)) < 0.005
    assert abs(kept[~is_correct].mean() - (0.5 - gamma)) < 0.005


def test_noisy_filter_gamma_half_is_the_exact_verifier():
    is_correct = np.random.default_rng(1).random(10_000) < 0.3
    kept = noisy_filter(is_correct, 0.5, np.random.default_rng(2))
    np.testing.assert_array_equal(kept, is_correct)


def test_noisy_filter_is_deterministic_under_a_seed():
    is_correct = np.arange(100) % 3 == 0
    first = noisy_filter(is_correct, 0.2, np.random.default_rng(7))
    again = noisy_filter(is_correct, 0.2, np.random.default_rng(7))
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("gamma", [-0.1, 0.51, 1.0, math.nan])
def test_noisy_filter_rejects_gamma_out_of_range(gamma):
    with pytest.raises(ValueError, match="gamma"):
        noisy_filter(np.array([True, False]), gamma, np.random.default_rng(0))


def test_noisy_filter_rejects_non_bool_verdicts():
    with pytest.raises(ValueError, match="bool"):
        noisy_filter(np.array([1, 0]), 0.2, np.random.default_rng(0))


# --- score_filter -------------------------------------------------------------------------

SCORES = np.array([0.3, np.nan, 0.9, 0.5, 0.9, 0.1])


def test_score_filter_threshold_higher_is_better():
    kept = score_filter(SCORES, threshold=0.5)
    np.testing.assert_array_equal(kept, [False, False, True, True, True, False])


def test_score_filter_threshold_lower_is_better():
    kept = score_filter(SCORES, threshold=0.3, higher_is_better=False)
    np.testing.assert_array_equal(kept, [True, False, False, False, False, True])


def test_score_filter_top_fraction_higher_is_better():
    # 5 scored rows; top 0.4 -> 2 rows: the two 0.9s.
    kept = score_filter(SCORES, top_fraction=0.4)
    np.testing.assert_array_equal(kept, [False, False, True, False, True, False])


def test_score_filter_top_fraction_tie_at_cut_goes_to_earlier_row():
    # top 0.2 of 5 scored rows -> 1 row; rows 2 and 4 tie at 0.9, row 2 comes first.
    kept = score_filter(SCORES, top_fraction=0.2)
    np.testing.assert_array_equal(kept, [False, False, True, False, False, False])


def test_score_filter_top_fraction_lower_is_better():
    # top 0.6 of 5 scored rows -> 3 rows: 0.1, 0.3, 0.5.
    kept = score_filter(SCORES, top_fraction=0.6, higher_is_better=False)
    np.testing.assert_array_equal(kept, [True, False, False, True, False, True])


def test_score_filter_never_keeps_nan():
    assert not score_filter(SCORES, top_fraction=1.0)[1]
    assert score_filter(SCORES, top_fraction=1.0).sum() == 5
    assert not score_filter(np.array([np.nan, np.nan]), top_fraction=0.5).any()


def test_score_filter_keeps_at_least_one():
    np.testing.assert_array_equal(
        score_filter(np.array([1.0, 3.0, 2.0]), top_fraction=0.01), [False, True, False]
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"threshold": 0.5, "top_fraction": 0.5}, "exactly one"),
        ({"top_fraction": 0.0}, "top_fraction"),
        ({"top_fraction": 1.5}, "top_fraction"),
        ({"threshold": math.nan}, "NaN"),
    ],
)
def test_score_filter_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        score_filter(SCORES, **kwargs)


# --- prompt_pass_rates --------------------------------------------------------------------


def test_prompt_pass_rates_hand_computed():
    prompt_ids = np.array([7, 3, 7, 3, 7, 9, 3, 7])
    kept = np.array([True, False, False, False, True, True, True, False])
    ids, rates = prompt_pass_rates(prompt_ids, kept)
    np.testing.assert_array_equal(ids, [3, 7, 9])
    np.testing.assert_allclose(rates, [1 / 3, 2 / 4, 1.0])


def test_prompt_pass_rates_string_ids():
    ids, rates = prompt_pass_rates(np.array(["b", "a", "b"]), np.array([False, True, False]))
    np.testing.assert_array_equal(ids, ["a", "b"])
    np.testing.assert_allclose(rates, [1.0, 0.0])


def test_prompt_pass_rates_rejects_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        prompt_pass_rates(np.array([1, 2, 3]), np.array([True, False]))


# --- resolve_budget -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "n_prompts", "expected"),
    [
        (0, 10, 0),
        (3, 10, 3),
        (25, 10, 10),
        (np.int64(4), 10, 4),
        (0.0, 10, 0),
        (0.05, 2000, 100),
        (0.29, 100, 29),
        (0.5, 7, 3),
        (1.0, 10, 10),
    ],
)
def test_resolve_budget_counts_and_fractions(budget, n_prompts, expected):
    assert resolve_budget(budget, n_prompts) == expected


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (True, "int count"),
        (False, "int count"),
        (-1, ">= 0"),
        (-0.1, r"\[0, 1\]"),
        (1.5, r"\[0, 1\]"),
        (100.0, "as an int"),
        (math.nan, "NaN"),
        ("5", "int count"),
    ],
)
def test_resolve_budget_rejects_bad_values(budget, message):
    with pytest.raises(ValueError, match=message):
        resolve_budget(budget, 10)


# --- allocate_label_budget ----------------------------------------------------------------

IDS = np.array([10, 11, 12, 13, 14, 15])
RATES = np.array([0.5, 0.0, 1.0, 0.0, 0.25, 0.0])


def test_hard_first_takes_hard_prompts_first():
    chosen = allocate_label_budget(IDS, RATES, 3, "hard-first", np.random.default_rng(0))
    assert set(chosen) == {11, 13, 15}
    chosen = allocate_label_budget(IDS, RATES, 4, "hard-first", np.random.default_rng(0))
    assert set(chosen[:3]) == {11, 13, 15}
    assert chosen[3] == 14


def test_hard_first_budget_above_prompt_count_gives_all_in_pass_rate_order():
    chosen = allocate_label_budget(IDS, RATES, 100, "hard-first", np.random.default_rng(0))
    assert sorted(chosen) == sorted(IDS)
    rate_of = dict(zip(IDS, RATES, strict=True))
    assert [rate_of[i] for i in chosen] == sorted(RATES)


def test_hard_first_chosen_never_easier_than_unchosen():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        ids = np.arange(50)
        rates = rng.integers(0, 5, size=50) / 4  # many ties, several zeros
        budget = int(rng.integers(0, 60))
        chosen = allocate_label_budget(ids, rates, budget, "hard-first", rng)
        assert len(chosen) == min(budget, 50)
        assert len(set(chosen)) == len(chosen)
        assert np.all(np.diff(rates[chosen]) >= 0)
        unchosen = np.setdiff1d(ids, chosen)
        if len(chosen) and len(unchosen):
            assert rates[chosen].max() <= rates[unchosen].min()


def test_hard_first_breaks_ties_at_random():
    orders = {
        tuple(allocate_label_budget(IDS, RATES, 3, "hard-first", np.random.default_rng(seed)))
        for seed in range(20)
    }
    assert len(orders) > 1


@pytest.mark.parametrize("strategy", ["uniform", "hard-first"])
def test_allocation_is_deterministic_under_a_seed(strategy):
    ids = np.arange(100)
    rates = np.random.default_rng(3).integers(0, 3, size=100) / 2
    first = allocate_label_budget(ids, rates, 10, strategy, np.random.default_rng(5))
    again = allocate_label_budget(ids, rates, 10, strategy, np.random.default_rng(5))
    np.testing.assert_array_equal(first, again)


def test_uniform_allocation():
    ids = np.arange(100)
    rates = np.zeros(100)
    first = allocate_label_budget(ids, rates, 10, "uniform", np.random.default_rng(5))
    other = allocate_label_budget(ids, rates, 10, "uniform", np.random.default_rng(6))
    assert len(first) == 10
    assert len(set(first)) == 10
    assert set(first) != set(other)
    everything = allocate_label_budget(ids, rates, 500, "uniform", np.random.default_rng(5))
    assert sorted(everything) == list(ids)


@pytest.mark.parametrize("strategy", ["uniform", "hard-first"])
def test_allocation_with_zero_budget_is_empty(strategy):
    chosen = allocate_label_budget(IDS, RATES, 0, strategy, np.random.default_rng(0))
    assert len(chosen) == 0


def test_allocation_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="hard-first"):
        allocate_label_budget(IDS, RATES, 2, "hardest", rng)
    with pytest.raises(ValueError, match="unique"):
        allocate_label_budget(np.array([1, 1]), np.array([0.0, 0.5]), 1, "uniform", rng)
    with pytest.raises(ValueError, match="budget"):
        allocate_label_budget(IDS, RATES, -1, "uniform", rng)
    with pytest.raises(ValueError, match="same length"):
        allocate_label_budget(IDS, RATES[:3], 1, "uniform", rng)


# --- near_miss and WeakLabeler ------------------------------------------------------------


def _differences(a: str, b: str) -> list[int]:
    assert len(a) == len(b)
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


def test_near_miss_changes_exactly_one_digit():
    rng = np.random.default_rng(0)
    answer = "0321"
    seen = set()
    for _ in range(300):
        wrong = near_miss(answer, rng)
        (position,) = _differences(answer, wrong)
        assert wrong[position].isdigit()
        seen.add((position, wrong[position]))
    assert len(seen) == 4 * 9  # every position and every other digit turns up


def test_near_miss_leaves_non_digits_alone():
    rng = np.random.default_rng(1)
    for _ in range(50):
        wrong = near_miss("x = 42.", rng)
        (position,) = _differences("x = 42.", wrong)
        assert position in (4, 5)


def test_near_miss_without_digits_changes_one_letter_keeping_case():
    rng = np.random.default_rng(2)
    for _ in range(50):
        wrong = near_miss("Yes!", rng)
        (position,) = _differences("Yes!", wrong)
        assert wrong[position].isalpha()
        assert wrong[position].isupper() == "Yes!"[position].isupper()


@pytest.mark.parametrize("answer", ["", "+-*", " "])
def test_near_miss_rejects_text_it_cannot_change(answer):
    with pytest.raises(ValueError, match="near miss"):
        near_miss(answer, np.random.default_rng(0))


@pytest.mark.parametrize("beta", [0.3, 0.7])
def test_weak_labeler_correct_rate_matches_beta(beta):
    rng = np.random.default_rng(0)
    references = [f"{i:04d}" for i in range(10_000)]
    labels = WeakLabeler(beta).label(["p"] * len(references), references, rng)
    correct = [label == reference for label, reference in zip(labels, references, strict=True)]
    assert abs(np.mean(correct) - beta) < 0.015
    for label, reference in zip(labels, references, strict=True):
        if label != reference:
            (position,) = _differences(reference, label)
            assert label[position].isdigit()


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_weak_labeler_extreme_betas_are_exact(beta):
    references = [f"{i:04d}" for i in range(1_000)]
    labels = WeakLabeler(beta).label(references, references, np.random.default_rng(0))
    n_correct = sum(label == reference for label, reference in zip(labels, references, strict=True))
    assert n_correct == beta * len(references)


def test_weak_labeler_is_deterministic_and_accepts_a_custom_wrong_answer():
    references = ["12", "34", "56"]
    labeler = WeakLabeler(0.5)
    first = labeler.label(references, references, np.random.default_rng(9))
    assert first == labeler.label(references, references, np.random.default_rng(9))

    always_wrong = WeakLabeler(0.0, wrong_answer=lambda answer, rng: "wrong")
    assert always_wrong.label(references, references, np.random.default_rng(0)) == ["wrong"] * 3


def test_weak_labeler_satisfies_the_labeler_protocol():
    labeler: Labeler = WeakLabeler(0.5)
    assert labeler.label([], [], np.random.default_rng(0)) == []


@pytest.mark.parametrize("beta", [-0.1, 1.1, math.nan])
def test_weak_labeler_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        WeakLabeler(beta)


def test_weak_labeler_rejects_length_mismatch():
    with pytest.raises(ValueError, match="one reference per prompt"):
        WeakLabeler(0.5).label(["a", "b"], ["1"], np.random.default_rng(0))


# --- filter_quality -----------------------------------------------------------------------


def test_filter_quality_hand_computed():
    kept = np.array([True, True, True, False, False, False, True, False])
    is_correct = np.array([True, True, False, True, False, False, False, False])
    quality = filter_quality(kept, is_correct)
    # kept: 4, of which correct: 2; correct: 3; wrong: 5, of which kept: 2.
    assert quality == pytest.approx(
        {
            "precision": 2 / 4,
            "recall": 2 / 3,
            "kept_fraction": 4 / 8,
            "keep_rate_correct": 2 / 3,
            "keep_rate_wrong": 2 / 5,
        }
    )


def test_filter_quality_is_nan_where_undefined():
    quality = filter_quality(np.array([False, False]), np.array([False, False]))
    assert math.isnan(quality["precision"])
    assert math.isnan(quality["recall"])
    assert math.isnan(quality["keep_rate_correct"])
    assert quality["kept_fraction"] == 0.0
    assert quality["keep_rate_wrong"] == 0.0


# --- parse_strategy -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "use_filter", "label_allocation"),
    [
        ("none", False, None),
        ("filter", True, None),
        ("filter+labels-uniform", True, "uniform"),
        ("filter+labels-hard", True, "hard-first"),
    ],
)
def test_parse_strategy(name, use_filter, label_allocation):
    plan = parse_strategy(name)
    assert plan == CurationPlan(use_filter=use_filter, label_allocation=label_allocation)
    assert plan.uses_labels == (label_allocation is not None)


def test_parse_strategy_covers_every_listed_strategy():
    assert [parse_strategy(name).label_allocation for name in CURATION_STRATEGIES] == [
        None,
        None,
        "uniform",
        "hard-first",
    ]


def test_parse_strategy_rejects_unknown_name_listing_valid_ones():
    with pytest.raises(ValueError, match="filter\\+labels-hard") as error:
        parse_strategy("boosting")
    assert "'none'" in str(error.value)


def test_curation_plan_rejects_unknown_allocation():
    with pytest.raises(ValueError, match="label_allocation"):
        CurationPlan(use_filter=True, label_allocation="random")
