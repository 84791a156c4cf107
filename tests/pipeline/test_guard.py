from pathlib import Path

from pipeline.config import load_config
from pipeline.loop import Generation, _set_aside, guard_verdict
from pipeline.tasks import make_task

ARITHMETIC = make_task(load_config().task, 0)


def test_accuracy_drop_beyond_tolerance_is_worse():
    cfg = load_config(None, ["guard.tolerance=0.02"])
    verdict = guard_verdict(cfg, ARITHMETIC, {"accuracy": 0.47}, {"accuracy": 0.40})
    assert verdict["worse"] and verdict["metric"] == "accuracy" and not verdict["stopped"]
    assert "0.470 -> 0.400" in verdict["reason"]
    assert not guard_verdict(cfg, ARITHMETIC, {"accuracy": 0.47}, {"accuracy": 0.46})["worse"]


def test_perplexity_is_relative_and_stop_stops():
    cfg = load_config(
        None, ["guard.metric=perplexity", "guard.tolerance=0.05", "guard.action=stop"]
    )
    assert not guard_verdict(cfg, ARITHMETIC, {"perplexity": 10.0}, {"perplexity": 10.4})["worse"]
    verdict = guard_verdict(cfg, ARITHMETIC, {"perplexity": 10.0}, {"perplexity": 10.6})
    assert verdict["worse"] and verdict["stopped"]


def test_off_and_first_generation_give_no_verdict():
    off = load_config(None, ["guard.action=none"])
    assert guard_verdict(off, ARITHMETIC, {"accuracy": 1.0}, {"accuracy": 0.0}) == {}
    assert guard_verdict(load_config(), ARITHMETIC, None, {"accuracy": 0.0}) == {}


def test_a_rejected_attempt_is_set_aside_and_its_markers_cleared(tmp_path: Path):
    gen = Generation(tmp_path, 1)
    for stage in ("generate", "score", "curate", "mix", "train", "evaluate"):
        gen.mark(stage)
    for name in ("mix.parquet", "metrics.json", "eval.parquet", "curated.parquet"):
        gen.path(name).write_text("x")
    gen.path("model").mkdir()
    _set_aside(gen, 0)
    kept = sorted(p.name for p in (gen.dir / ".done").iterdir())
    assert kept == ["curate", "generate", "score"]  # the retry reuses the curated samples
    assert sorted(p.name for p in gen.path("attempt_0").iterdir()) == [
        "eval.parquet",
        "metrics.json",
        "mix.parquet",
        "model",
    ]
    assert gen.path("curated.parquet").exists() and not gen.path("mix.parquet").exists()
