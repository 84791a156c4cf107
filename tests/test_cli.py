"""The command line: bad input exits 2 with one line per problem, no traceback, no Ray."""

import pytest

from pipeline.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr()


def test_bad_overrides_are_refused_together(capsys, tmp_path):
    code, out = _run(
        capsys,
        "run",
        "--run-dir",
        str(tmp_path / "r"),
        "mix.real_fraction=2",
        "loop.generatons=3",
        "train.deepspeed.zero_stage=5",
    )
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("genloop: config error:") for line in lines)
    assert "Traceback" not in out.err
    assert not (tmp_path / "r").exists()  # refused before any work


def test_missing_data_file(capsys, tmp_path):
    code, out = _run(
        capsys,
        "run",
        "--config",
        "ray_configs/text.yaml",
        f"task.path={tmp_path / 'missing.txt'}",
        "--run-dir",
        str(tmp_path / "r"),
    )
    assert code == 2
    assert "missing.txt: file not found" in out.err and "Traceback" not in out.err


def test_malformed_jsonl_is_named_by_line(capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    code, out = _run(
        capsys, "run", "task.name=pairs", f"task.path={data}", "--run-dir", str(tmp_path / "r")
    )
    assert code == 2 and "d.jsonl: line 2: not valid JSON" in out.err


def test_missing_config_and_unknown_preset(capsys, tmp_path):
    code, out = _run(capsys, "run", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "config file not found" in out.err


def test_resume_needs_a_run_dir(capsys, tmp_path):
    code, out = _run(capsys, "run", "--resume")
    assert code == 2 and "--resume needs --run-dir" in out.err
    code, out = _run(capsys, "run", "--resume", "--run-dir", str(tmp_path))
    assert code == 2 and "no config.yaml" in out.err


def test_an_existing_run_is_not_overwritten(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    code, out = _run(capsys, "run", "--run-dir", str(tmp_path))
    assert code == 2 and "already holds a run" in out.err


def test_resume_refuses_changing_history(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    code, out = _run(capsys, "run", "--resume", "--run-dir", str(tmp_path), "mix.real_fraction=1")
    assert code == 2 and "keeps its config" in out.err


def test_no_command_prints_help(capsys):
    assert main([]) == 2


@pytest.mark.parametrize("argv", [["run", "--help"], ["--help"]])
def test_help(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0


def test_overrides_may_follow_options(capsys, tmp_path):
    code, out = _run(
        capsys, "run", "loop.generations=1", "--run-dir", str(tmp_path / "r"), "mix.real_fraction=7"
    )
    assert code == 2 and "mix.real_fraction: must be in [0, 1], got 7" in out.err


def test_unknown_flag_is_a_usage_error():
    with pytest.raises(SystemExit) as info:
        main(["run", "--frobnicate"])
    assert info.value.code == 2


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["select", "--seed", "abc"],
            "genloop select: error: argument --seed: invalid int value: 'abc'; "
            "see genloop select --help",
        ),
        (
            ["jobs", "status"],
            "genloop jobs status: error: the following arguments are required: JOB_ID; "
            "see genloop jobs status --help",
        ),
    ],
)
def test_a_bad_flag_is_one_line_without_the_usage_block(capsys, argv, line):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err == line + "\n"


def _not_a_model(directory, kind: str):
    """A model.path that is missing, a file, or a directory with a config but no tokenizer."""
    if kind == "file":
        (directory / "weights.bin").write_bytes(b"")
        return directory / "weights.bin"
    if kind == "no tokenizer":
        (directory / "config.json").write_text("{}")
        return directory
    return directory / "missing"


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "model directory not found"),
        ("file", "a file, not a model directory"),
        ("no tokenizer", "no tokenizer in the model directory"),
    ],
)
def test_a_model_path_that_is_not_a_model_is_refused_before_any_work(
    capsys, tmp_path, kind, message
):
    import ray

    model = _not_a_model(tmp_path, kind)
    code, out = _run(capsys, "run", "--run-dir", str(tmp_path / "r"), f"model.path={model}")
    assert code == 2 and len(out.err.splitlines()) == 1
    assert out.err.startswith(f"genloop: config error: model.path: {model}: {message}")
    assert not ray.is_initialized() and not (tmp_path / "r").exists()


TUNE_PRESET = "ray_configs/tune/arithmetic_fraction_budget.yaml"
SELECT = ["select", "--data", "x.jsonl", "--method", "random", "--budget", "3"]


@pytest.mark.parametrize(
    "flag, argv",
    [
        ("--run-dir", ["run", "--run-dir", "{file}"]),
        ("--run-dir", ["run", "--run-dir", "{file}/run"]),
        ("--out", ["bench", "--out", "{file}"]),
        ("--out", ["compare", "--out", "{file}/exp"]),
        ("--out", ["tune", "--config", TUNE_PRESET, "--out", "{file}"]),
        (
            "--runs-dir",
            ["tune", "--config", TUNE_PRESET, "--out", "{dir}/t", "--runs-dir", "{file}/r"],
        ),
        ("--out", [*SELECT, "--out", "{dir}"]),
        ("--out", [*SELECT, "--out", "{file}/s.jsonl"]),
        ("--work-dir", [*SELECT, "--out", "{dir}/s.jsonl", "--work-dir", "{file}"]),
        ("--out", ["report", "{dir}", "--out", "{file}/report.html"]),
    ],
)
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(
    capsys, tmp_path, flag, argv
):
    """A file where the output directory goes (or on its way), or a directory where the output
    file goes: one line naming the flag, exit 2, before minutes of work end in a traceback."""
    import ray

    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory\n")
    code, out = _run(capsys, *[a.format(file=blocker, dir=tmp_path) for a in argv])
    assert code == 2, out.err
    assert out.err.startswith(f"genloop: error: {flag} ") and len(out.err.splitlines()) == 1
    assert "Traceback" not in out.err
    assert not ray.is_initialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]  # nothing created


def test_workers_that_do_not_fit_the_local_ray_are_refused_before_it_starts(capsys, tmp_path):
    """Found after Ray started, the run directory was left behind, and a corrected rerun was
    refused ('already holds a run') while --resume could not change the workers."""
    import ray

    run_dir = tmp_path / "r"
    code, out = _run(
        capsys,
        "run",
        "--run-dir",
        str(run_dir),
        "ray.num_cpus=2",
        "train.workers=3",
        "train.batch_size=63",
    )
    assert code == 2 and out.err == (
        "genloop: error: train.workers=3: 3 worker(s) x 1 CPU(s) do not fit on the local Ray's "
        "2 CPUs; lower train.workers, or raise ray.num_cpus\n"
    )
    assert not ray.is_initialized() and not run_dir.exists()


def test_resume_may_lengthen_a_run_but_not_shorten_it(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("loop:\n  generations: 2\n")
    code, out = _run(capsys, "run", "--resume", "--run-dir", str(tmp_path), "loop.generations=1")
    assert code == 2 and out.err == (
        "genloop: error: loop.generations=1: a resumed run may only grow; this one has "
        "loop.generations=2\n"
    )


def test_a_missing_embedding_model_is_refused_before_any_work(capsys, tmp_path):
    """It was found after generation 0 had trained, and --resume could not change it."""
    missing = tmp_path / "encoder"
    code, out = _run(
        capsys, "run", "--run-dir", str(tmp_path / "r"), f"diagnostics.embedding_model={missing}"
    )
    assert code == 2 and out.err == (
        f"genloop: config error: diagnostics.embedding_model: {missing}: model directory not "
        "found\n"
    )
    assert not (tmp_path / "r").exists()


def test_a_gpu_run_without_a_gpu_is_refused_before_the_local_ray_starts(capsys, tmp_path):
    """It used to wait forever for a GPU that the local Ray did not have."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, out = _run(capsys, "run", "--run-dir", str(tmp_path / "r"), "train.use_gpu=true")
    assert code == 2 and out.err == (
        "genloop: config error: train.use_gpu=true: no GPU here for the local Ray (torch sees no "
        "CUDA device); give ray.address= of a cluster with GPUs\n"
    )
    assert not (tmp_path / "r").exists()


def test_resume_refuses_a_finished_stage_whose_files_are_gone(capsys, tmp_path):
    """It used to load the marked stage and fail with a traceback, after Ray had started."""
    import ray

    from pipeline.config import dump_yaml, load_config
    from pipeline.loop import Generation

    (tmp_path / "config.yaml").write_text(dump_yaml(load_config()))
    gen = Generation(tmp_path, 1)
    gen.dir.mkdir()
    gen.path("scored.parquet").write_bytes(b"PAR1")
    gen.mark("score", ("scored.parquet",))
    gen.path("scored.parquet").unlink()
    code, out = _run(capsys, "run", "--resume", "--run-dir", str(tmp_path))
    assert code == 2 and out.err == (
        f"genloop: error: {gen.dir}/scored.parquet: missing, yet gen_01/.done/score says the "
        f"score stage finished; restore the file, or delete {gen.dir} and the generations after "
        "it to redo them\n"
    )
    assert not ray.is_initialized()


def test_resume_refuses_a_hand_edited_config(capsys, tmp_path):
    """--resume reads config.yaml, so an edit there passed for the run's own settings: the
    next generation ran with them, beside generations made with others."""
    import ray

    from pipeline.config import dump_yaml, load_config
    from pipeline.loop import SETTINGS_RECORD

    settings = dump_yaml(load_config())
    (tmp_path / "config.yaml").write_text(
        settings.replace("real_fraction: 0.0", "real_fraction: 0.5")
    )
    (tmp_path / SETTINGS_RECORD).write_text(settings)
    code, out = _run(capsys, "run", "--resume", "--run-dir", str(tmp_path))
    assert code == 2 and out.err == (
        f"genloop: error: {tmp_path} ran with mix.real_fraction=0.0, not 0.5; its config.yaml "
        "was edited since: put back mix.real_fraction: 0.0\n"
    )
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--run-dir", ""],
        ["bench", "--quick", "--out", ""],
        ["diagnose", "--model", "a", "--model", "b", "--data", "d.jsonl", "--out", ""],
        ["tune", "--config", "ray_configs/tune/arithmetic_strategy_grid.yaml", "--out", ""],
        ["tune", "--config", "ray_configs/tune/arithmetic_strategy_grid.yaml", "--runs-dir", ""],
    ],
)
def test_an_empty_output_path_is_refused_not_taken_for_the_default(capsys, argv):
    """`--run-dir "$DIR"` with DIR unset wrote a run under ./runs/ and exited 0."""
    code, out = _run(capsys, *argv)
    flag = argv[argv.index("") - 1]
    assert code == 2 and out.err == f"genloop: error: {flag}: empty; give a path\n"


def test_a_run_directory_the_os_refuses_is_one_line_before_ray(capsys, tmp_path):
    """A place os.access calls writable but mkdir refuses (/proc, for root) failed with a
    FileNotFoundError traceback after Ray had started."""
    import ray

    code, out = _run(capsys, "run", "--run-dir", "/proc/genloop-test-run")
    assert code == 2 and out.err.startswith("genloop: error: --run-dir /proc/genloop-test-run: ")
    assert len(out.err.splitlines()) == 1 and not ray.is_initialized()


def test_bench_refuses_an_output_directory_that_holds_files(capsys, tmp_path):
    """It wrote beside them, replacing an earlier bench.json."""
    (tmp_path / "bench.json").write_text("{}")
    code, out = _run(capsys, "bench", "--quick", "--out", str(tmp_path))
    assert (
        code == 2
        and out.err == f"genloop: error: --out {tmp_path}: not empty; choose a new directory\n"
    )
    assert (tmp_path / "bench.json").read_text() == "{}"
