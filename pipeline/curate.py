"""Curate: the scored pool in, what to train on out, with the reason for every drop.

The strategies are the pure functions of `selection.boosting`; this module applies them to
the scored frame and records the funnel (kept / dropped by reason, labels spent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.config import CurateConfig
from pipeline.tasks import Task
from selection.boosting import (
    WeakLabeler,
    allocate_label_budget,
    filter_quality,
    noisy_filter,
    parse_strategy,
    prompt_pass_rates,
    resolve_budget,
    score_filter,
)


@dataclass
class Curated:
    samples: pd.DataFrame  # every scored sample plus `kept` and `drop_reason`
    labels: pd.DataFrame  # weak labels bought this generation: prompt_id, prompt, response, correct
    stats: dict


def curate(
    scored: pd.DataFrame,
    pool: pd.DataFrame,
    cfg: CurateConfig,
    task: Task,
    rng: np.random.Generator,
) -> Curated:
    """Apply `cfg.strategy` to the scored samples of one generation.

    Args:
        scored: one row per sample: prompt_id, prompt, reference, response, correct, loss, length.
        pool: the generation's prompts (prompt_id, prompt, reference); labels are bought for these.
    """
    plan = parse_strategy(cfg.strategy)
    samples = scored.copy()
    correct = samples["correct"].to_numpy(dtype=bool)
    if not plan.use_filter:
        kept = np.ones(len(samples), dtype=bool)
        reason = ""
    elif task.verifiable:
        kept = noisy_filter(correct, cfg.gamma, rng)
        reason = "verifier rejected" if cfg.gamma == 0.5 else f"noisy filter (gamma={cfg.gamma})"
    else:
        kept = score_filter(
            samples[cfg.filter_column].to_numpy(dtype=float),
            top_fraction=cfg.filter_top_fraction,
            higher_is_better=cfg.filter_higher_is_better,
        )
        reason = f"{cfg.filter_column} outside the best {cfg.filter_top_fraction:.0%}"
    samples["kept"] = kept
    samples["drop_reason"] = np.where(kept, "", reason)

    prompt_ids, pass_rate = prompt_pass_rates(samples["prompt_id"].to_numpy(), kept)
    labels = pd.DataFrame({"prompt_id": [], "prompt": [], "response": [], "correct": []})
    if plan.label_allocation is not None:
        budget = resolve_budget(_as_count_or_fraction(cfg.label_budget), len(prompt_ids))
        chosen = allocate_label_budget(prompt_ids, pass_rate, budget, plan.label_allocation, rng)
        rows = pool.set_index("prompt_id").loc[chosen]
        answers = WeakLabeler(beta=cfg.beta).label(
            rows["prompt"].tolist(), rows["reference"].tolist(), rng
        )
        labels = pd.DataFrame(
            {
                "prompt_id": chosen,
                "prompt": rows["prompt"].to_numpy(),
                "response": answers,
                "correct": task.verify(answers, rows["reference"].tolist()),
            }
        )

    stats = {
        "samples": len(samples),
        "kept": int(kept.sum()),
        "dropped": int((~kept).sum()),
        "sample_accuracy": float(correct.mean()) if len(correct) else float("nan"),
        "prompts": len(prompt_ids),
        "hard_prompts": int((pass_rate == 0).sum()),
        "labels_spent": len(labels),
        "labels_correct": int(labels["correct"].sum()) if len(labels) else 0,
    }
    if task.verifiable and plan.use_filter:
        quality = filter_quality(kept, correct)
        stats.update(filter_precision=quality["precision"], filter_recall=quality["recall"])
    return Curated(samples, labels, stats)


def _as_count_or_fraction(budget: float) -> int | float:
    """The config holds one number: >= 1 is a count of prompts, below 1 a fraction."""
    return int(budget) if budget >= 1 else float(budget)
