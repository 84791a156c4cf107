import numpy as np
import pandas as pd

from pipeline.config import CurateConfig, TaskConfig
from pipeline.curate import curate
from pipeline.tasks import make_task

TASK = make_task(TaskConfig(seed_examples=1, heldout_prompts=1, validation_prompts=1), 0)


def _scored(correct_per_prompt):
    """Prompt p has samples whose correctness is correct_per_prompt[p]."""
    rows = []
    for pid, flags in enumerate(correct_per_prompt):
        for k, flag in enumerate(flags):
            rows.append(
                {
                    "prompt_id": pid,
                    "prompt": f"00{pid}+000=",
                    "reference": f"{pid}000",
                    "sample": k,
                    "response": f"{pid}000" if flag else "9999",
                    "correct": flag,
                    "loss": 1.0,
                    "length": 4,
                }
            )
    frame = pd.DataFrame(rows)
    pool = frame.drop_duplicates("prompt_id")[["prompt_id", "prompt", "reference"]]
    return frame, pool.reset_index(drop=True)


def test_none_keeps_everything():
    scored, pool = _scored([[True, False], [False, False]])
    result = curate(scored, pool, CurateConfig(strategy="none"), TASK, np.random.default_rng(0))
    assert result.samples["kept"].all() and (result.samples["drop_reason"] == "").all()
    assert result.stats["kept"] == 4 and len(result.labels) == 0


def test_exact_filter_keeps_the_correct_and_names_the_reason():
    scored, pool = _scored([[True, False], [False, False]])
    result = curate(
        scored, pool, CurateConfig(strategy="filter", gamma=0.5), TASK, np.random.default_rng(0)
    )
    assert result.samples["kept"].tolist() == [True, False, False, False]
    assert result.samples["drop_reason"].tolist()[1:] == ["verifier rejected"] * 3
    assert result.stats["filter_precision"] == 1.0 and result.stats["hard_prompts"] == 1


def test_hard_first_labels_go_to_the_prompts_nothing_passed():
    scored, pool = _scored([[True, True], [False, False], [True, False], [False, False]])
    cfg = CurateConfig(strategy="filter+labels-hard", gamma=0.5, label_budget=2, beta=1.0)
    result = curate(scored, pool, cfg, TASK, np.random.default_rng(0))
    assert sorted(result.labels["prompt_id"]) == [1, 3]
    assert result.labels["correct"].all()  # beta = 1: every label right
    assert result.stats["labels_spent"] == 2 and result.stats["labels_correct"] == 2


def test_label_budget_as_a_fraction_and_a_weak_labeler():
    scored, pool = _scored([[False]] * 40)
    cfg = CurateConfig(strategy="filter+labels-uniform", label_budget=0.25, beta=0.0)
    result = curate(scored, pool, cfg, TASK, np.random.default_rng(1))
    assert len(result.labels) == 10 and not result.labels["correct"].any()
