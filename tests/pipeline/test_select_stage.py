"""The loop's select stage on the synthetic pool, the real pool, or both (random: no Ray)."""

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.data import write_parquet
from pipeline.loop import Generation, mix_stage, select_stage
from pipeline.tasks import make_task


@pytest.fixture
def curated_generations(tmp_path):
    for index in (1, 2):
        rows = pd.DataFrame(
            {
                "prompt": [f"{i:03d}+000=" for i in range(40)],
                "response": ["0000"] * 40,
                "source": ["synthetic"] * 36 + ["labeled"] * 4,
                "origin_generation": index,
            }
        )
        write_parquet(rows, Generation(tmp_path, index).path("curated.parquet"))
    return tmp_path


@pytest.mark.parametrize("pool", ["synthetic", "real", "both"])
def test_select_keeps_the_budget_of_each_chosen_pool(curated_generations, pool):
    cfg = load_config(None, ["select.method=random", "select.budget=0.25", f"select.pool={pool}"])
    task = make_task(cfg.task, 0)
    gen = Generation(curated_generations, 1)
    summary = select_stage(cfg, task, gen, model=None)
    kept = pd.read_parquet(gen.path("selected.parquet"))
    assert (kept.source == "labeled").sum() == 4  # labels are always kept
    synthetic_kept = (kept.source == "synthetic").sum()
    assert synthetic_kept == (9 if pool != "real" else 36)
    real_file = gen.path("selected_real.parquet")
    assert real_file.exists() == (pool != "synthetic")
    if pool == "synthetic":
        return
    real = pd.read_parquet(real_file)
    assert len(real) == round(0.25 * len(task.real))
    assert set(real.prompt) <= set(task.real.prompt) and real.prompt.is_unique
    recorded = summary if pool == "real" else summary["real"]
    assert recorded["selected"] == len(real) and recorded["candidates"] == len(task.real)
    assert json.loads(gen.path("selection.json").read_text())["pool"] == pool

    # Every generation keeps the same real rows, and the mix draws real rows only from them.
    later = Generation(curated_generations, 2)
    select_stage(cfg, task, later, model=None)
    assert pd.read_parquet(later.path("selected_real.parquet")).prompt.tolist() == (
        real.prompt.tolist()
    )
    mixed = mix_stage(cfg, task, later, cfg.mix.__class__(real_fraction=0.5))
    assert set(mixed.loc[mixed.source == "real", "prompt"]) <= set(real.prompt)
    assert (mixed.source == "real").sum() > 0


def test_an_unknown_pool_is_a_config_error():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="select.pool"):
        load_config(None, ["select.pool=everything"])


def test_an_empty_mix_carries_the_model_over_and_says_why(tmp_path, tiny_model_dir):
    from pipeline.loop import _describe_mix, _describe_train, train_stage

    cfg = load_config(None, ["mix.real_fraction=0"])
    gen = Generation(tmp_path, 1)
    empty = pd.DataFrame(columns=["prompt", "response", "source", "origin_generation"])
    assert _describe_mix(empty) == "0 examples"  # it read "0 examples ()"
    model = train_stage(cfg, task=None, gen=gen, init_model=tiny_model_dir, training_set=empty)
    assert model == gen.ref("model")
    assert sorted(p.name for p in gen.path("model").iterdir()) == sorted(
        p.name for p in Path(tiny_model_dir).iterdir()
    )
    assert _describe_train(gen)(model) == (
        "skipped: empty training set: no curated sample reached the mix, and "
        "mix.real_fraction added no real rows; the previous model carries over"
    )
