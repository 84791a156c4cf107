import pandas as pd
import pytest

from pipeline.cli import UsageError, main
from pipeline.compare import METRICS, summarize, summary_markdown, variant_name, variants
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
