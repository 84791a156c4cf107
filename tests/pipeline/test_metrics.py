import math
from collections import Counter

import numpy as np
import pytest

from pipeline.metrics import collapse_signals, distinct_n, entropy_bits, perplexity


def test_distinct_n_by_hand():
    texts = ["a b a b", "a b"]
    # unigrams: a b a b a b -> 2 unique of 6; bigrams: ab ba ab ab -> 2 unique of 4
    assert distinct_n(texts, 1) == pytest.approx(2 / 6)
    assert distinct_n(texts, 2) == pytest.approx(2 / 4)
    assert distinct_n(["single"], 2) == 0.0


def test_entropy_by_hand():
    assert entropy_bits(Counter({"a": 1, "b": 1})) == pytest.approx(1.0)
    assert entropy_bits(Counter({"a": 4})) == 0.0
    assert entropy_bits(Counter({"a": 2, "b": 1, "c": 1})) == pytest.approx(1.5)


def test_collapse_signals_fall_for_repetitive_text():
    diverse = collapse_signals(["the cat sat on the mat", "a dog ran in the park"])
    collapsed = collapse_signals(["the the the the", "the the the the"])
    for key in ("distinct_1", "distinct_2", "char_entropy", "word_entropy", "vocabulary"):
        assert collapsed[key] < diverse[key]
    assert collapsed["mean_length"] == 15


def test_perplexity_is_token_weighted():
    loss, ppl = perplexity(np.array([2.0, 1.0]), np.array([2, 1]))
    assert loss == pytest.approx(1.0) and ppl == pytest.approx(math.e)
    assert math.isnan(perplexity(np.array([0.0]), np.array([0]))[0])


def test_text_tables_align_numbers_and_print_nan_as_a_dash():
    import pandas as pd

    from pipeline.report import format_rows, format_table

    frame = pd.DataFrame({"name": ["a", "longer"], "n": [3.0, 1200.0], "x": [0.5, float("nan")]})
    columns = [("name", "name", "{}"), ("n", "count", "{:,d}"), ("x", "x", "{:.2f}")]
    assert format_rows(frame, columns, label_first=True, indent="  ").splitlines() == [
        "  name    count     x",
        "  a           3  0.50",
        "  longer  1,200     -",
    ]
    table = pd.DataFrame({"generation": [0, 1], "accuracy": [0.25, 0.5], "perplexity": [None] * 2})
    assert format_table(table).splitlines()[0].split() == ["gen", "accuracy"]
