import pandas as pd
import pytest

from pipeline.cli import UsageError, main
from pipeline.compare import (
    METRICS,
    check_metric,
    check_rerun,
    format_table_final,
    summarize,
    summary_markdown,
    variant_name,
    variants,
)
from pipeline.config import dump_yaml, load_config
from pipeline.data import DataError
from pipeline.loop import summary_row
from tests.tiny import TINY_RUN


def test_variants_form_a_grid():
    grid = variants(["curate.gamma=0.1,0.2", "curate.beta=0.5"])
    assert grid == [
        {"curate.gamma": "0.1", "curate.beta": "0.5"},
        {"curate.gamma": "0.2", "curate.beta": "0.5"},
    ]
    assert variant_name(grid[0]) == "gamma=0.1__beta=0.5"
    assert len(variants([])) == 4
    with pytest.raises(UsageError):
        variants(["curate.gamma"])


@pytest.mark.parametrize(
    "vary, says",
    [
        (["curate.gamma=0.1,0.2", "curate.gamma=0.3"], "curate.gamma is varied twice"),
        (["curate.gamma=0.1,"], "every value once, none empty"),
        (["curate.gamma=0.1,0.1"], "every value once, none empty"),
        (["seed=1,2"], "compare sets the seed; give --seeds 1,2"),
    ],
)
def test_a_grid_that_would_run_something_twice_or_not_at_all_is_refused(vary, says):
    with pytest.raises(UsageError, match=says):
        variants(vary)


def test_seeds_are_set_by_seeds_alone(tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path / "x"), "--seeds", "0,0"]) == 2
    assert "--seeds '0,0': each seed once" in capsys.readouterr().err
    assert main(["compare", "--out", str(tmp_path / "x"), "seed=3"]) == 2
    assert "'seed=3': compare sets the seed of each run; give --seeds" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_metric_no_run_records_is_refused():
    plain = load_config(None, ["curate=none", "diagnostics.mix_embedding_rows=0"])
    filtered = load_config(None, ["curate=filter", "diagnostics.mix_embedding_rows=0"])
    check_metric("accuracy", [plain])
    check_metric("filter_precision", [plain, filtered])  # one variant records it
    with pytest.raises(UsageError, match="curate.strategy=none uses no filter"):
        check_metric("filter_precision", [plain])
    with pytest.raises(UsageError, match="diagnostics.mix_embedding_rows=0 embeds no mix"):
        check_metric("mix_real_mmd", [plain, filtered])


def test_a_rerun_resumes_only_with_the_settings_its_runs_had(tmp_path):
    out = tmp_path / "exp"
    cfg = load_config(None, ["train.steps=10"])
    check_rerun(out, [("strategy=none", 0, cfg)])  # nothing there yet
    (out / "strategy=none" / "seed_0").mkdir(parents=True)
    (out / "strategy=none" / "seed_0" / "config.yaml").write_text(dump_yaml(cfg))
    check_rerun(out, [("strategy=none", 0, cfg), ("strategy=none", 1, cfg)])
    longer = load_config(None, ["train.steps=10", "loop.generations=9", "ray.num_cpus=2"])
    check_rerun(out, [("strategy=none", 0, longer)])
    changed = load_config(None, ["train.steps=20"])
    with pytest.raises(DataError) as caught:
        check_rerun(out, [("strategy=none", 0, changed)])
    assert str(caught.value) == (
        f"{out}/strategy=none/seed_0 ran with train.steps=10, not 20; continue it with its own "
        "settings, or use a new directory"
    )
    shorter = load_config(None, ["train.steps=10", "loop.generations=1"])
    with pytest.raises(DataError, match="ran with loop.generations=5, not 1"):
        check_rerun(out, [("strategy=none", 0, shorter)])
    mapped = load_config(None, ["train.steps=10", "task.fields.prompt=question"])
    with pytest.raises(DataError, match="ran with task.fields.prompt=None, not question"):
        check_rerun(out, [("strategy=none", 0, mapped)])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty and not a genloop compare experiment"):
        check_rerun(other, [("strategy=none", 0, cfg)])


def test_summary_over_seeds():
    results = pd.DataFrame(
        {
            "variant": ["b", "b", "a", "a"],
            "seed": [0, 1, 0, 1],
            "generation": [1, 1, 1, 1],
            "accuracy": [0.5, 0.7, 0.2, 0.2],
        }
    )
    summary = summarize(results, "accuracy")
    assert summary["variant"].tolist() == ["b", "a"]  # order of first appearance
    assert summary["mean"].tolist() == pytest.approx([0.6, 0.2])
    assert "| b | 0.600 ± 0.141 |" in summary_markdown(summary, "accuracy")
    one_seed = summarize(results[results["seed"] == 0], "accuracy")
    assert "| b | 0.500 |" in summary_markdown(one_seed, "accuracy")  # no spread to show
    final = format_table_final(one_seed, "accuracy").splitlines()
    assert final[0].split() == ["b", "0.500", "(min", "0.500,", "max", "0.500,", "1", "seed)"]


def test_every_metric_is_a_column_of_a_runs_table():
    needed = ("perplexity", "heldout_loss", "distinct_1", "distinct_2", "char_entropy")
    row = summary_row(1, dict.fromkeys((*needed, "word_entropy", "vocabulary"), 1.0))
    assert set(METRICS) <= set(row)


def test_an_unknown_metric_is_refused_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["compare", "--out", str(tmp_path / "exp"), "--metric", "bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("genloop compare: error: argument --metric: invalid choice: 'bogus'")
    assert len(err.splitlines()) == 1 and not (tmp_path / "exp").exists()


def test_bad_values_are_refused_before_any_run(tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path), "--vary", "curate.gamma=0.1,0.9"]) == 2
    assert "curate.gamma: must be in [0, 0.5], got 0.9" in capsys.readouterr().err
    assert main(["compare", "--out", str(tmp_path), "--seeds", "a,b"]) == 2


TINY = [
    *TINY_RUN,
    "task.pool_prompts=40",
    "loop.gen0_steps=20",
    "loop.generations=1",
    "train.steps=8",
    "curate.label_budget=4",
]


@pytest.mark.slow
def test_compare_two_strategies_two_seeds(tmp_path, capsys):
    out = tmp_path / "exp"
    argv = [
        "compare",
        "--out",
        str(out),
        "--seeds",
        "0,1",
        "--vary",
        "curate.strategy=none,filter+labels-hard",
        *TINY,
    ]
    assert main(argv) == 0
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 2 * 2 * 2  # variants x seeds x generations 0..1
    assert set(results["variant"]) == {"strategy=none", "strategy=filter+labels-hard"}
    hard = results[
        (results["variant"] == "strategy=filter+labels-hard") & (results["generation"] == 1)
    ]
    assert (hard["labels_spent"] == 4).all() and (hard["labeled"] > 0).all()
    # Generation 0 is shared by the variants of a seed: identical held-out results.
    gen0 = results[results["generation"] == 0].groupby("seed")["perplexity"].nunique()
    assert (gen0 == 1).all()
    assert (out / "accuracy.png").stat().st_size > 1000
    assert "gen 1" in (out / "summary.md").read_text()
