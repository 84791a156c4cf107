"""`genloop tune`: search-space parsing and validation, trial resources, the result writers,
and a tiny search (3 trials, 2 generations, ASHA) on a real local Ray, then its resume."""

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.cli import UsageError, main
from pipeline.config import ConfigError, RunConfig, dump_yaml, load_config
from pipeline.loop import copy_generation_zero
from pipeline.tune import (
    load_search,
    max_concurrent_trials,
    pareto_front,
    parse_search,
    reported_metrics,
    search_needs,
    summary_text,
    trial_needs,
    write_outputs,
)

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "ray_configs" / "tune").glob("*.yaml"))


def _preset(tmp_path: Path, tune: dict, **sections) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(
        yaml.safe_dump(
            {"base": str(ROOT / "ray_configs" / "arithmetic.yaml"), **sections, "tune": tune}
        )
    )
    return path


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_shipped_tune_preset_is_valid(path):
    search = load_search(path)
    assert search.space and search.num_samples >= 1
    assert f"genloop tune --config ray_configs/tune/{path.name}" in path.read_text()


def test_closing_experiment_preset_fits_one_two_core_machine():
    search = load_search(ROOT / "ray_configs" / "tune" / "arithmetic_fraction_budget.yaml")
    assert search.num_samples >= 8 and search.scheduler is not None
    assert 4 <= search.generations <= 5
    assert search.space["mix.real_fraction"].args == [0.0, 1.0]
    assert "curate.label_budget" in search.space and search.base.train.workers == 1
    assert search.shares_generation_zero  # generation 0 is trained once, not per trial
    assert max_concurrent_trials({"CPU": 2.0}, search_needs(search)) == 2


def test_grid_preset_tries_every_combination():
    search = load_search(ROOT / "ray_configs" / "tune" / "arithmetic_strategy_grid.yaml")
    sizes = [len(p.args) for p in search.space.values()]
    assert all(p.kind == "grid" for p in search.space.values()) and np.prod(sizes) == 8
    assert search.total_trials == 8


# --------------------------------------------------------------------------- parsing


def test_space_distributions_and_overrides(tmp_path):
    path = _preset(
        tmp_path,
        {
            "search": "random",
            "space": {
                "mix.real_fraction": {"uniform": [0.0, 1.0]},  # overridden below
                "train.lr": {"loguniform": [1e-4, 1e-2]},
                "select.budget": {"quniform": [10, 100, 10]},
                "curate.label_budget": {"int": [0, 20]},
                "curate": {"choice": ["filter", "none"]},  # the shorthand for curate.strategy
                "mix.mode": {"grid": ["replace", "accumulate"]},
            },
        },
        loop={"generations": 3},
    )
    search = load_search(
        path,
        [
            "tune.num_samples=2",
            "task.pool_prompts=100",
            "tune.space.mix.real_fraction={uniform: [0.0, 0.5]}",
        ],
    )
    assert search.num_samples == 2 and search.base.task.pool_prompts == 100
    assert search.base.loop.generations == 3 and search.generations == 3
    assert set(search.space) == {
        "mix.real_fraction",
        "train.lr",
        "select.budget",
        "curate.label_budget",
        "curate.strategy",
        "mix.mode",
    }
    assert search.space["mix.real_fraction"].args == [0.0, 0.5]
    assert search.space["curate.label_budget"].probes() == [0, 10, 20]
    assert search.space["select.budget"].probes()[1] % 10 == 0
    assert search.metrics == ["accuracy"] and search.modes == ["max"]
    assert not search.shares_generation_zero  # train.lr changes generation 0
    domains = {k: p.domain() for k, p in search.space.items()}
    assert domains["mix.mode"] == {"grid_search": ["replace", "accumulate"]}
    assert 0 <= domains["curate.label_budget"].sample() <= 20


def test_every_problem_is_reported_at_once(tmp_path):
    path = _preset(
        tmp_path,
        {
            "metric": "accuracy",
            "search": "grid",
            "colour": "blue",
            "space": {
                "mix.foo": {"choice": [1, 2]},
                "mix.real_fraction": {"grid": [0.0, 1.5]},
                "curate.gamma": {"uniform": [0.0, 0.4]},
                "curate.beta": {"normal": [0.5, 0.1]},
                "curate.label_budget": {"choice": 50},
            },
        },
    )
    with pytest.raises(ConfigError) as caught:
        load_search(path)
    text = "\n".join(caught.value.errors)
    with pytest.raises(ConfigError) as caught:  # a bad base config: the search's form, too
        load_search(path, ["train.steps=0"])
    assert caught.value.errors[0] == "train.steps: must be > 0, got 0"
    assert "unknown distribution 'normal'" in "\n".join(caught.value.errors)
    assert "unknown key 'tune.colour'" in text
    assert "unknown key 'mix.foo'" in text
    assert "mix.real_fraction: must be in [0, 1], got 1.5" in text
    assert "grid search tries listed values" in text
    assert "unknown distribution 'normal'" in text
    assert "choice takes a list" in text


@pytest.mark.parametrize(
    "tune, message",
    [
        ({"space": {"mix.real_fraction": {"uniform": [0.8, 0.2]}}}, "low must be below high"),
        ({"space": {"train.lr": {"loguniform": [0, 0.1]}}}, "low must be > 0"),
        ({"space": {"curate.label_budget": {"uniform": [0, 100]}}}, "a count (integer)"),
        ({"space": {"train.steps": {"uniform": [10, 20]}}}, "expected an integer"),
        ({"space": {"ray.num_cpus": {"choice": [1, 2]}}}, "ray.* belongs to the experiment"),
        ({"space": {}}, "tune.space: a mapping"),
        ({"metric": "accurasy", "space": {"mix.mode": {"choice": ["replace"]}}}, "not reported"),
        (
            {"search": "optuna", "space": {"mix.mode": {"grid": ["replace"]}}},
            "use {choice: [...]} instead of grid",
        ),
        (
            {
                "metric": ["accuracy", "labels_total"],
                "search": "random",
                "scheduler": "asha",
                "space": {"curate.label_budget": {"choice": [0, 10]}},
            },
            "need search: optuna",
        ),
        (
            {
                "metric": ["accuracy", "labels_total"],
                "search": "optuna",
                "scheduler": "asha",
                "space": {"curate.label_budget": {"choice": [0, 10]}},
            },
            "ASHA stops trials on one metric",
        ),
        (
            {
                "scheduler": {"name": "asha", "grace_period": 9},
                "space": {"mix.mode": {"choice": ["replace"]}},
            },
            "grace_period",
        ),
        ({"space": {"mix.mode": {"grid": ["replace", "replace"]}}}, "lists 'replace' twice"),
        (
            {"space": {"curate": {"choice": ["none"]}, "curate.strategy": {"choice": ["filter"]}}},
            "tune.space.curate.strategy: the same key as tune.space.curate; give it once",
        ),
    ],
)
def test_invalid_searches_are_refused(tune, message):
    with pytest.raises(ConfigError) as caught:
        parse_search(tune, RunConfig())
    assert message in "\n".join(caught.value.errors)


def test_a_metric_no_trial_records_is_refused_unless_the_space_can_change_that():
    unembedded = load_config(None, ["diagnostics.mix_embedding_rows=0", "curate=none"])
    with pytest.raises(ConfigError) as caught:
        parse_search(
            {"metric": "mix_real_mmd", "space": {"mix.mode": {"choice": ["replace"]}}}, unembedded
        )
    assert caught.value.errors == [
        "tune.metric: no trial records mix_real_mmd (diagnostics.mix_embedding_rows=0 embeds "
        "no mix)"
    ]
    with pytest.raises(ConfigError, match="curate.strategy=none uses no filter"):
        parse_search(
            {"metric": "filter_precision", "space": {"mix.mode": {"choice": ["replace"]}}},
            unembedded,
        )
    searched = {"metric": "filter_precision", "space": {"curate": {"choice": ["none", "filter"]}}}
    assert parse_search(searched, unembedded).metrics == ["filter_precision"]


def test_multi_objective_defaults_and_modes():
    search = parse_search(
        {
            "metric": ["accuracy", "labels_total"],
            "search": "optuna",
            "space": {"curate.label_budget": {"int": [0, 10]}},
        },
        RunConfig(),
    )
    assert search.modes == ["max", "min"] and search.scheduler is None
    assert {"accuracy", "labels_total", "perplexity", "generation"} <= set(reported_metrics())


def test_cli_prints_config_errors_and_usage_errors(tmp_path, capsys):
    bad = _preset(tmp_path, {"space": {"mix.real_fraction": {"uniform": [0, 2]}}})
    assert main(["tune", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert (
        "config error: tune.space: mix.real_fraction: must be in [0, 1]" in capsys.readouterr().err
    )
    good = _preset(tmp_path, {"space": {"mix.real_fraction": {"uniform": [0, 1]}}})
    assert main(["tune", "--config", str(good), "mix.real_fraction=0.5"]) == 2
    assert "is searched" in capsys.readouterr().err
    assert main(["tune", "--config", str(good), "mix={real_fraction: 0.5}"]) == 2
    assert "mix={real_fraction: 0.5}: this key is searched" in capsys.readouterr().err
    assert load_search(good, ["mix={mode: accumulate}"]).base.mix.mode == "accumulate"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "results.md").write_text("my notes")
    assert main(["tune", "--config", str(good), "--out", str(tmp_path / "mine")]) == 2
    assert f"--out {tmp_path / 'mine'}: not empty" in capsys.readouterr().err
    assert (tmp_path / "mine" / "results.md").read_text() == "my notes"
    assert main(["tune"]) == 2
    assert main(["tune", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no tune.yaml here" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _config_errors(capsys, *argv) -> list[str]:
    """The lines `genloop` printed, after checking it printed only config errors, exit 2."""
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and all(line.startswith("genloop: config error: ") for line in lines)
    return lines


def test_a_preset_that_is_not_utf8_is_one_config_error(tmp_path, capsys):
    preset = tmp_path / "preset.yaml"
    preset.write_bytes(bytes(range(256)) * 10)
    assert _config_errors(capsys, "tune", "--config", str(preset)) == [
        f"genloop: config error: {preset}: line 2: not UTF-8 text"
    ]


def test_a_missing_base_names_the_preset_and_its_base_key(tmp_path, capsys):
    (tmp_path / "presets").mkdir()
    preset = tmp_path / "presets" / "p.yaml"
    preset.write_text("base: ../arithmetic.yaml\ntune: {space: {mix.mode: {choice: [replace]}}}\n")
    assert _config_errors(capsys, "tune", "--config", str(preset)) == [
        f"genloop: config error: {preset}: base: ../arithmetic.yaml: no such file "
        f"({tmp_path / 'arithmetic.yaml'}; a base is relative to the preset)"
    ]


def test_a_bound_out_of_range_is_one_error_about_the_bound(tmp_path, capsys):
    preset = _preset(tmp_path, {"space": {"mix.real_fraction": {"uniform": [0, 5]}}})
    assert _config_errors(capsys, "tune", "--config", str(preset)) == [
        "genloop: config error: tune.space: mix.real_fraction: must be in [0, 1], got 5.0"
    ]
    # Both bounds wrong: one error each; a value inside is named as a sample of the range.
    with pytest.raises(ConfigError) as caught:
        parse_search({"space": {"mix.real_fraction": {"uniform": [-1, 5]}}}, RunConfig())
    assert caught.value.errors == [
        "tune.space: mix.real_fraction: must be in [0, 1], got -1.0",
        "tune.space: mix.real_fraction: must be in [0, 1], got 5.0",
    ]
    with pytest.raises(ConfigError) as caught:
        parse_search({"space": {"train.steps": {"uniform": [10, 20]}}}, RunConfig())
    assert caught.value.errors == [
        "tune.space: train.steps: expected an integer, got 13.77 "
        "(a value uniform: [10, 20] samples)"
    ]


@pytest.mark.parametrize(
    "content", [b"{bad", bytes(range(256)), b"a: 1\n", b"base: {}\ntune: []\n"]
)
def test_resuming_from_a_damaged_tune_yaml_is_one_config_error(tmp_path, capsys, content):
    (tmp_path / "tune.yaml").write_bytes(content)
    assert _config_errors(capsys, "tune", "--resume", str(tmp_path)) == [
        f"genloop: config error: {tmp_path}/tune.yaml: damaged; genloop tune writes it as YAML "
        "with base, tune, runs_dir, gen0_dir, and --resume needs it as written"
    ]


def test_resuming_after_tune_yaml_was_edited_is_refused(tmp_path, capsys):
    from pipeline.tune import _read_spec, _spec_digest

    spec = {"base": {"seed": 0}, "tune": {"num_samples": 2}, "runs_dir": "r", "gen0_dir": None}
    spec["digest"] = _spec_digest(spec)
    (tmp_path / "tune.yaml").write_text("# a comment may be added\n" + yaml.safe_dump(spec))
    assert _read_spec(str(tmp_path))["tune"] == {"num_samples": 2}
    spec["tune"]["num_samples"] = 9
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(spec))
    assert _config_errors(capsys, "tune", "--resume", str(tmp_path)) == [
        f"genloop: config error: {tmp_path}/tune.yaml: edited since the experiment started, and "
        "--resume needs it as written; undo the edit, or start a new experiment with --config"
    ]


def test_a_runs_dir_holding_another_generation_0_is_refused_before_ray(tmp_path, capsys):
    import ray

    good = _preset(tmp_path, {"space": {"mix.real_fraction": {"uniform": [0, 1]}}})
    earlier = tmp_path / "runs" / "generation_0"
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text(dump_yaml(load_config(None, ["model.n_embd=32"])))
    argv = ["tune", "--config", str(good), "--out", str(tmp_path / "x")]
    assert main([*argv, "--runs-dir", str(tmp_path / "runs")]) == 2
    assert f"{earlier} ran with model.n_embd=32, not 128" in capsys.readouterr().err
    assert not ray.is_initialized()


# --------------------------------------------------------------------------- resources


def test_max_concurrent_trials_is_what_the_cluster_holds():
    assert max_concurrent_trials({"CPU": 2.0}, {"CPU": 2, "GPU": 0}) == 1
    assert max_concurrent_trials({"CPU": 2.0}, {"CPU": 1, "GPU": 0}) == 2
    assert max_concurrent_trials({"CPU": 9.0}, {"CPU": 2, "GPU": 0}) == 4
    assert max_concurrent_trials({"CPU": 9.0}, {"CPU": 2, "GPU": 0}, requested=3) == 3
    assert max_concurrent_trials({"CPU": 9.0}, {"CPU": 2, "GPU": 0}, requested=10) == 4
    assert max_concurrent_trials({"CPU": 16.0, "GPU": 4.0}, {"CPU": 0, "GPU": 2}) == 2
    with pytest.raises(UsageError, match="one trial needs 4 CPUs"):
        max_concurrent_trials({"CPU": 2.0}, {"CPU": 4, "GPU": 0})


def test_trials_take_one_cpu_per_worker_unless_told():
    """A lone run's stage takes its share of the whole cluster; trials run side by side."""
    tiny = ROOT / "ray_configs" / "tune" / "arithmetic_fraction_budget.yaml"
    assert load_search(tiny, []).base.ray.cpus_per_worker == 1
    assert load_search(tiny, ["ray.cpus_per_worker=2"]).base.ray.cpus_per_worker == 2


def test_a_trial_needs_its_largest_stage():
    assert trial_needs(RunConfig()) == {"CPU": 2, "GPU": 0}  # 2 train workers, 2 actors
    one = load_config(
        None,
        [
            "train.workers=1",
            "generate.workers=1",
            "score.workers=1",
            "eval.workers=1",
            "train.batch_size=16",
        ],
    )
    assert trial_needs(one) == {"CPU": 1, "GPU": 0}
    s2l = load_config(None, ["generate.workers=1", "score.workers=1", "train.workers=1"])
    s2l.select.method = "s2l"  # trains a proxy on 2 workers
    assert trial_needs(s2l)["CPU"] == 2
    gpu = load_config(None, ["train.use_gpu=true", "train.workers=4"])
    assert trial_needs(gpu) == {"CPU": 2, "GPU": 4}  # inference actors take 1 CPU + 1 GPU
    search = parse_search(
        {"space": {"train.workers": {"choice": [1, 2, 4]}}},
        load_config(None, ["train.batch_size=16"]),
    )
    assert search_needs(search)["CPU"] == 4
    two_each = load_config(None, ["ray.cpus_per_worker=2"])
    assert trial_needs(two_each) == {"CPU": 4, "GPU": 0}


# --------------------------------------------------------------------------- outputs


def _results() -> pd.DataFrame:
    rows = []
    trials = {
        "t1": (0.2, 0, [0.30, 0.35, 0.40], "finished"),
        "t2": (0.8, 50, [0.30, 0.45, 0.50], "finished"),
        "t3": (0.5, 100, [0.30, 0.60], "stopped by ASHA"),  # best value, but stopped early
    }
    for trial, (fraction, budget, accuracies, status) in trials.items():
        for generation, accuracy in enumerate(accuracies):
            rows.append(
                dict(
                    trial=trial,
                    status=status,
                    **{"mix.real_fraction": fraction, "curate.label_budget": budget},
                    generation=generation,
                    accuracy=accuracy,
                    perplexity=2.0 - accuracy,
                    labels_spent=budget if generation else 0,
                    labels_total=budget * generation,
                )
            )
    return pd.DataFrame(rows)


def _search(**tune) -> object:
    space = {
        "mix.real_fraction": {"uniform": [0, 1]},
        "curate.label_budget": {"choice": [0, 50, 100]},
    }
    return parse_search(
        {"space": space, "scheduler": "asha", **tune}, load_config(None, ["loop.generations=2"])
    )


def test_outputs_table_best_config_and_frontier(tmp_path):
    results, search = _results(), _search()
    write_outputs(results, search, str(tmp_path))
    table = pd.read_csv(tmp_path / "results.csv")
    assert len(table) == 8 and set(table["trial"]) == {"t1", "t2", "t3"}
    assert "| t3 | stopped by ASHA | 0.5 | 100 | 1 | 0.6 |" in (tmp_path / "results.md").read_text()
    best = load_config(tmp_path / "best.yaml")  # the best *finished* trial: t2
    assert best.mix.real_fraction == 0.8 and best.curate.label_budget == 50
    assert best.loop.generations == 2
    assert "genloop run --config best.yaml" in (tmp_path / "best.yaml").read_text()
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    summary = summary_text(results, search)
    assert summary.splitlines()[4].startswith("| t3 |")  # best first: 0.60 at generation 1


def test_a_search_with_a_failed_trial_exits_1_naming_the_error(tmp_path, capsys):
    """It used to print "finished" and exit 0."""
    from pipeline.tune import conclude

    search, experiment = _search(), str(tmp_path)
    assert conclude(search, experiment, _results(), 0, [], time.perf_counter()) == 0
    assert "genloop tune: finished in" in capsys.readouterr().out
    failed = ["pipeline.data.DataError: /data/b.jsonl: file not found", "ValueError: x"]
    assert conclude(search, experiment, _results(), 0, failed, time.perf_counter()) == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        "genloop tune: 2 trial(s) failed, the first with: pipeline.data.DataError: "
        f"/data/b.jsonl: file not found; --resume {experiment} runs them again"
    )
    assert (tmp_path / "results.csv").exists()  # the trials that finished are still reported
    assert conclude(search, experiment, _results().iloc[:0], 2, failed[:1], 0.0) == 1
    assert "no trial reported a generation; 2 trial(s) still to run" in capsys.readouterr().out


def test_multi_objective_outputs_pick_from_the_pareto_front(tmp_path):
    search = _search(metric=["accuracy", "labels_total"], search="optuna", scheduler="none")
    results = _results().assign(status="finished")
    write_outputs(results, search, str(tmp_path))
    best = load_config(tmp_path / "best.yaml")
    assert best.curate.label_budget == 100  # accuracy 0.60: the best on the first metric
    assert (tmp_path / "frontier.png").stat().st_size > 1000


def test_pareto_front():
    values = np.array([[0.5, 10], [0.6, 20], [0.4, 30], [0.6, 20]])  # accuracy max, labels min
    assert pareto_front(values, ["max", "min"]).tolist() == [True, True, False, True]


def test_generation_zero_is_copied_without_its_training_directory(tmp_path):
    source, trial = tmp_path / "gen0", tmp_path / "trial"
    assert not copy_generation_zero(source, trial)  # nothing finished to copy
    for name in (
        "gen_00/.done/evaluate",
        "gen_00/.done/tracked",
        "gen_00/model/config.json",
        "gen_00/train/x",
        "base_model/a",
    ):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("x")
    (trial / "gen_00/model").mkdir(parents=True)
    (trial / "gen_00/model/half-copied").write_text("x")  # an interrupted earlier copy
    assert copy_generation_zero(source, trial)
    assert (trial / "gen_00/model/config.json").exists() and (trial / "base_model/a").exists()
    assert not (trial / "gen_00/train").exists()
    assert not (trial / "gen_00/model/half-copied").exists()
    assert not (trial / "gen_00/.done/tracked").exists()  # each run tracks its own copy
    (trial / "gen_00/model/config.json").write_text("kept")
    copy_generation_zero(source, trial)  # already there: left alone
    assert (trial / "gen_00/model/config.json").read_text() == "kept"


def test_experiment_files_through_a_filesystem_uri(tmp_path):
    from pipeline.tune import _exists, _name, _parent, _read_text, _write_bytes

    uri = f"file://{tmp_path}/exp"
    assert not _exists(uri, "tune.yaml")
    _write_bytes(uri, "tune.yaml", b"tune: {}\n")
    assert _exists(uri, "tune.yaml") and _read_text(uri, "tune.yaml") == "tune: {}\n"
    assert (tmp_path / "exp" / "tune.yaml").is_file()
    assert (_parent("s3://bucket/tune/exp"), _name("s3://bucket/tune/exp/")) == (
        "s3://bucket/tune",
        "exp",
    )


# --------------------------------------------------------------------------- Ray Tune wiring


def _stand_in_trial(config):
    """Reports like a loop run, without one: accuracy grows with the real fraction."""
    from ray import tune

    for generation in range(3):
        fraction, budget = config["mix.real_fraction"], config["curate.label_budget"]
        tune.report(
            {
                "generation": generation,
                "accuracy": fraction * generation,
                "labels_spent": budget if generation else 0,
                "labels_total": budget * generation,
            }
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "section, statuses",
    [
        (  # in order, one at a time: the two weaker trials are below the first at generation 1
            {"search": "grid", "scheduler": {"name": "asha", "grace_period": 1}},
            ["finished", "stopped by ASHA", "stopped by ASHA"],
        ),
        ({"search": "optuna", "num_samples": 3, "scheduler": "asha"}, None),
        (
            {"search": "optuna", "num_samples": 3, "metric": ["accuracy", "labels_total"]},
            ["finished"] * 3,
        ),
    ],
    ids=["grid-asha", "optuna-asha", "optuna-multi-objective"],
)
def test_search_algorithms_and_asha_drive_ray_tune(ray_local, tmp_path, section, statuses):
    from ray import tune

    from pipeline.tune import _trial_resources, _tune_config, collect_results

    values = [0.9, 0.1, 0.05] if section["search"] == "grid" else [0.0, 1.0]
    kind = "grid" if section["search"] == "grid" else "uniform"
    space = {
        "mix.real_fraction": {kind: values},
        "curate.label_budget": {"grid" if kind == "grid" else "choice": [10]},
    }
    search = parse_search({**section, "space": space}, load_config(None, ["loop.generations=2"]))
    tuner = tune.Tuner(
        _trial_resources(_stand_in_trial),  # the trial itself reserves no CPU
        param_space={key: p.domain() for key, p in search.space.items()},
        tune_config=_tune_config(search, concurrent=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="exp", verbose=0),
    )
    grid = tuner.fit()
    results = collect_results(grid.experiment_path, grid.filesystem, search)
    final = results.groupby("trial", sort=False).tail(1)
    assert len(final) == 3 and not grid.errors
    if statuses:
        assert final.sort_values("trial")["status"].tolist() == statuses
    write_outputs(results, search, str(tmp_path / "exp"))
    assert load_config(tmp_path / "exp" / "best.yaml").loop.generations == 2


# --------------------------------------------------------------------------- a real search

TINY = {
    "task": {
        "seed_examples": 200,
        "pool_prompts": 24,
        "heldout_prompts": 24,
        "validation_prompts": 24,
    },
    "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "max_length": 32},
    "loop": {"generations": 2, "gen0_steps": 20, "gen0_target_accuracy": None},
    "train": {"steps": 6, "batch_size": 16, "lr": 3e-3, "workers": 1},
    "generate": {"batch_size": 64, "workers": 1},
    "score": {"workers": 1},
    "eval": {"batch_size": 24, "workers": 1},
    "diagnostics": {"mix_embedding_rows": 0},
    # A loose filter keeps samples even from a model that gets nothing right.
    "curate": {"strategy": "filter+labels-hard", "gamma": 0.1},
}


def _markers(runs: Path) -> dict[str, int]:
    return {
        str(p.relative_to(runs)): p.stat().st_mtime_ns for p in sorted(runs.glob("*/gen_*/.done/*"))
    }


def _reports(experiment: Path) -> dict[str, int]:
    """Rows of Tune's own record (progress.csv) per trial."""
    return {p.parent.name: len(pd.read_csv(p)) for p in experiment.glob("_trial_*/progress.csv")}


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tune")
    preset = directory / "tiny.yaml"
    preset.write_text(
        yaml.safe_dump(
            {
                "base": str(ROOT / "ray_configs" / "arithmetic.yaml"),
                **TINY,
                "tune": {
                    "metric": "perplexity",
                    "search": "random",
                    "num_samples": 3,
                    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
                    "space": {
                        "mix.real_fraction": {"uniform": [0.2, 0.8]},
                        "curate.label_budget": {"choice": [4, 8]},
                    },
                },
            }
        )
    )
    experiment = directory / "experiment"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["tune", "--config", str(preset), "--out", str(experiment)])
    return experiment, status, out.getvalue()


@pytest.mark.slow
def test_a_tiny_search_runs_every_trial_generation_by_generation(tiny_experiment):
    experiment, status, out = tiny_experiment
    assert status == 0, out
    assert "2 trial(s) at a time" in out  # 1 CPU per trial, 2 CPUs
    results = pd.read_csv(experiment / "results.csv")
    assert results["trial"].nunique() == 3
    for trial, rows in results.groupby("trial"):
        # One report per generation, in order, none twice.
        assert rows["generation"].tolist() == list(range(len(rows))), trial
        status = rows["status"].iloc[-1]
        assert status in ("finished", "stopped by ASHA"), trial
        assert (rows["generation"].max() == 2) == (status == "finished")
        assert out.count(f"[trial {trial}] gen ") == len(rows)
        assert (rows["labels_total"].iloc[-1]) == rows["labels_spent"].sum()
    assert (results["status"] == "finished").any()
    # Generation 0 was trained once and shared: every trial starts from the same model.
    assert results[results["generation"] == 0]["perplexity"].nunique() == 1
    assert sorted(_reports(experiment).values()) == sorted(results.groupby("trial").size())
    best = load_config(experiment / "best.yaml")
    final = results.groupby("trial").tail(1)
    winner = final[final["status"] == "finished"].sort_values("perplexity").iloc[0]
    assert best.mix.real_fraction == pytest.approx(winner["mix.real_fraction"])
    assert best.curate.label_budget == winner["curate.label_budget"]
    assert (experiment / "frontier.png").stat().st_size > 1000
    assert "perplexity per generation (best first)" in out
    spec = yaml.safe_load((experiment / "tune.yaml").read_text())
    assert json.dumps(spec["tune"]["space"]) and Path(spec["runs_dir"]) == experiment / "runs"


@pytest.mark.slow
def test_resuming_a_finished_search_reruns_nothing(tiny_experiment):
    experiment, status, _ = tiny_experiment
    assert status == 0
    markers, reports = _markers(experiment / "runs"), _reports(experiment)
    results = pd.read_csv(experiment / "results.csv")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["tune", "--resume", str(experiment)]) == 0
    assert "[trial " not in out.getvalue()  # no trial reported again
    assert _markers(experiment / "runs") == markers and _reports(experiment) == reports
    pd.testing.assert_frame_equal(pd.read_csv(experiment / "results.csv"), results)


def test_each_task_file_of_the_space_is_read_before_any_trial(tmp_path, capsys):
    """A missing file in a task.path grid used to fail its trial after Ray had started."""
    import ray

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 500)
    missing = tmp_path / "nosuch.txt"
    preset = tmp_path / "preset.yaml"
    preset.write_text(
        yaml.safe_dump(
            {
                "base": str(ROOT / "ray_configs" / "text.yaml"),
                "task": {"path": str(text)},
                "tune": {
                    "metric": "perplexity",
                    "space": {"task.path": {"grid": [str(text), str(missing)]}},
                },
            }
        )
    )
    out = tmp_path / "experiment"
    assert main(["tune", "--config", str(preset), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"genloop: error: tune.space: task.path: {missing}: file not found\n"
    )
    assert not ray.is_initialized() and not out.exists()
