import numpy as np
import pandas as pd
import pytest

from pipeline.config import MixConfig
from pipeline.mix import composition, mix


def _real(n):
    return pd.DataFrame({"prompt": [f"r{i}" for i in range(n)], "response": "x"})


def _synthetic(generation, n, labeled=0):
    rows = pd.DataFrame(
        {
            "prompt": [f"s{generation}-{i}" for i in range(n + labeled)],
            "response": "y",
            "source": ["synthetic"] * n + ["labeled"] * labeled,
        }
    )
    return rows.assign(origin_generation=generation)


def test_replace_uses_only_the_newest_synthetic_data():
    out = mix(
        _real(10),
        [_synthetic(1, 8), _synthetic(2, 6)],
        MixConfig(mode="replace"),
        np.random.default_rng(0),
    )
    assert set(out["origin_generation"]) == {2}
    assert len(out) == 6


def test_accumulate_keeps_every_generation():
    out = mix(
        _real(10),
        [_synthetic(1, 8), _synthetic(2, 6)],
        MixConfig(mode="accumulate"),
        np.random.default_rng(0),
    )
    assert composition(out) == {"real": 0, "synthetic": 14, "labeled": 0}


@pytest.mark.parametrize("fraction,expected_real", [(0.2, 2), (0.5, 8), (0.0, 0)])
def test_real_fraction_of_the_training_set(fraction, expected_real):
    out = mix(
        _real(100), [_synthetic(1, 8)], MixConfig(real_fraction=fraction), np.random.default_rng(0)
    )
    assert composition(out)["real"] == expected_real
    assert composition(out)["synthetic"] == 8


def test_fixed_size_and_labels_count_on_the_synthetic_side():
    out = mix(
        _real(5),
        [_synthetic(1, 3, labeled=2)],
        MixConfig(real_fraction=0.25, size=40),
        np.random.default_rng(0),
    )
    counts = composition(out)
    assert len(out) == 40 and counts["real"] == 10
    assert counts["synthetic"] + counts["labeled"] == 30
    # Real rows drawn with whole copies first: every real row appears exactly twice.
    assert out[out["source"] == "real"]["prompt"].value_counts().tolist() == [2] * 5


def test_all_real_and_empty_synthetic():
    rng = np.random.default_rng(0)
    assert composition(mix(_real(7), [], MixConfig(real_fraction=1.0), rng))["real"] == 7
    empty = _synthetic(1, 0)
    assert len(mix(_real(7), [empty], MixConfig(real_fraction=0.0), rng)) == 0
    assert len(mix(_real(7), [empty], MixConfig(real_fraction=0.5), rng)) == 7


def test_mix_is_shuffled_and_deterministic():
    args = (_real(50), [_synthetic(1, 50)], MixConfig(real_fraction=0.5))
    a = mix(*args, np.random.default_rng(3))
    b = mix(*args, np.random.default_rng(3))
    assert a.equals(b)
    assert a["source"].iloc[:50].nunique() == 2
