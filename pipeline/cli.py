"""`genloop`: the command line.

    genloop run [--config PRESET.yaml] [--run-dir DIR] [--resume] [key=value ...]
    genloop compare --out DIR [--seeds 0,1,2] [--vary KEY=V1,V2 ...] [key=value ...]
    genloop select --data FILE --method NAME --budget N|FRACTION --out FILE [key=value ...]
    genloop diagnose --model A --model B --data FILE
    genloop report RUN_DIR
    genloop tune --config ray_configs/tune/PRESET.yaml [--resume EXPERIMENT_DIR] [key=value ...]
    genloop bench [--out DIR] [--quick] [--only NAME,...] [--repeats N] [key=value ...]
    genloop submit --address URL -- <genloop args>;  genloop jobs status|logs|stop JOB_ID

A mistake a person can fix (bad config, bad data, missing file) is printed as one line per
problem and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    """A command-line mistake: wrong flags together, a run dir that is not what was asked."""


def parse_seeds(text: str) -> tuple[int, ...]:
    """`--seeds 0,1,2` as integers; UsageError for anything else."""
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected integers like 0,1,2") from None
    if len(set(seeds)) < len(seeds):
        raise UsageError(f"--seeds {text!r}: each seed once")
    return seeds


def check_output(path: str | Path, flag: str, *, file: bool = False) -> Path:
    """Refuse, before any work, a local output path that cannot be written: a directory
    (`file=False`) or file (`file=True`) that the command could not create or replace,
    because a file or directory is in its place, a file is on its way, or its nearest
    existing directory is not writable. Creates nothing; returns the path."""
    if not str(path).strip():
        raise UsageError(f"{flag}: empty; give a path")
    path = Path(path)
    if file and path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; give a file name")
    if not file and path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    existing = path.absolute() if not file else path.absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} is not writable")
    return path


def path_or_default(value: str | None, flag: str, default: str) -> str:
    """The path a flag gave, or `default` when the flag was not given. An empty one (an unset
    variable in a script, `--out "$OUT"`) is refused, not taken for the default."""
    if value is None:
        return default
    if not value.strip():
        raise UsageError(f"{flag}: empty; give a path")
    return value


def make_output_dir(path: str | Path, flag: str) -> Path:
    """`check_output`, then create the directory (for a command that writes into it as it
    goes, or whose results come after minutes of work); an OS refusal is a UsageError."""
    path = check_output(path, flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create the directory ({e.strerror})") from None
    return path


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_command(argv)
    except ArgumentError as e:
        print(e, file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    if not getattr(args, "command", None):
        _parser().print_help()
        return EXIT_BAD_INPUT
    from cluster.connect import ClusterError
    from pipeline.config import ConfigError
    from pipeline.data import DataError

    try:
        return args.handler(args)
    except ConfigError as e:
        for message in e.errors:
            print(f"genloop: config error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (DataError, UsageError, ClusterError) as e:
        print(f"genloop: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("genloop: interrupted; continue with --resume", file=sys.stderr)
        return 130


class ArgumentError(Exception):
    """A bad command line: the parser's `prog` (genloop, genloop CMD) and what is wrong."""

    def __init__(self, prog: str, message: str):
        super().__init__(f"{prog}: error: {message}; see {prog} --help")
        self.prog, self.message = prog, message


class _OneLineErrors(argparse.ArgumentParser):
    """argparse, raising ArgumentError where argparse would print its usage block and exit;
    sub-command parsers inherit it."""

    def error(self, message: str):
        raise ArgumentError(self.prog, message)


def parse_command(argv: list[str] | None) -> argparse.Namespace:
    """genloop's command line, parsed; parsing runs nothing (`--help` prints and exits).
    Overrides may come before, between or after the options (`run --config X a=1 --run-dir
    Y b=2`): argparse leaves the later ones over, and they join the first ones here.

    Raises:
        ArgumentError: an unknown command or flag, a bad value, a missing argument.
    """
    args, extra = _parser().parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        prog = f"genloop {args.command}" if getattr(args, "command", None) else "genloop"
        raise ArgumentError(prog, f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(
        prog="genloop",
        description="Train language models on their own synthetic data, without collapse, on Ray.",
    )
    commands = parser.add_subparsers(dest="command")

    run = commands.add_parser(
        "run",
        help="run the generational loop",
        description="Run the generational loop. With no arguments: the embedded default "
        "(arithmetic task, tiny GPT-2, local Ray).",
    )
    run.add_argument("--config", help="a preset YAML, e.g. ray_configs/text.yaml")
    run.add_argument("--run-dir", help="where artefacts go (default: runs/<time>-<task>)")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir after its last completed stage",
    )
    run.add_argument("--verbose", action="store_true", help="show Ray's own worker logs")
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted config overrides, e.g. loop.generations=6 mix.real_fraction=0.2",
    )
    run.set_defaults(handler=cmd_run)
    from pipeline import diagnose_cmd, report_cmd

    diagnose_cmd.register(commands)
    report_cmd.register(commands)
    from pipeline import select_cmd

    select_cmd.register(commands)
    from pipeline import compare

    compare.register(commands)
    from pipeline import tune

    tune.register(commands)
    from pipeline import selection_study

    selection_study.register(commands)
    from pipeline import bench

    bench.register(commands)
    from cluster import submit

    submit.register(commands)
    return parser


def check_before_ray(cfg) -> None:
    """What can be wrong with a run and be found in a second, before Ray starts and the run
    directory is made, instead of minutes into the run: the data, the models, the MLflow
    server, the cluster address, and for a local Ray its CPUs and GPU.

    Raises:
        DataError, ConfigError, ClusterError: the first problem found.
    """
    from cluster.connect import preflight
    from pipeline.config import ConfigError
    from pipeline.data import DataError
    from pipeline.diagnostics import check_model_path
    from pipeline.tasks import make_task
    from pipeline.tracking import check_mlflow_server

    make_task(cfg.task, cfg.seed)
    models = {"model.path": cfg.model.path}
    if cfg.diagnostics.mix_embedding_rows > 0:
        models["diagnostics.embedding_model"] = cfg.diagnostics.embedding_model
    for key, path in models.items():
        if path is None:
            continue
        try:
            check_model_path(path)
        except DataError as e:
            raise ConfigError([f"{key}: {e}"]) from None
    if cfg.diagnostics.mlflow_uri:
        check_mlflow_server(cfg.diagnostics.mlflow_uri)
    if preflight(cfg.ray.address).kind == "local":
        check_local_resources(cfg)


def check_local_resources(cfg) -> None:
    """Before a local Ray starts: every CPU stage's workers fit on the CPUs it will have, and
    a GPU run has a GPU.

    Raises:
        ClusterError: a stage does not fit.
        ConfigError: train.use_gpu without a GPU here.
    """
    from cluster.connect import check_fit
    from pipeline.config import ConfigError
    from pipeline.loop import cpu_stages

    if cfg.train.use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                [
                    "train.use_gpu=true: no GPU here for the local Ray (torch sees no CUDA "
                    "device); give ray.address= of a cluster with GPUs"
                ]
            )
        return
    from ray._private.utils import get_num_cpus  # what a local Ray counts as its CPUs

    check_fit(cpu_stages(cfg), cfg.ray.cpus_per_worker, [cfg.ray.num_cpus or get_num_cpus()])


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.storage import RemoteRun, is_uri

    # A storage URI (s3://..., gs://..., file:///...) is mirrored locally; see pipeline/storage.
    remote = RemoteRun(args.run_dir) if args.run_dir and is_uri(args.run_dir) else None
    if args.resume:
        if not args.run_dir:
            raise UsageError("--resume needs --run-dir DIR (the run to continue)")
        if remote is not None:
            remote.pull()
        run_dir = remote.local if remote is not None else Path(args.run_dir)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise UsageError(f"{run_dir}: no config.yaml here, so no run to resume")
        if args.config:
            raise UsageError("--resume takes the run's own config.yaml; drop --config")
        # Overrides on resume may only lengthen the run; anything else would change history.
        for item in args.overrides:
            if not item.startswith(("loop.generations=", "ray.")):
                raise UsageError(
                    f"{item!r}: a resumed run keeps its config "
                    "(only loop.generations and ray.* may change)"
                )
        cfg = load_config(saved, args.overrides)
        planned = load_config(saved).loop.generations
        if cfg.loop.generations < planned:
            raise UsageError(
                f"loop.generations={cfg.loop.generations}: a resumed run may only grow; this "
                f"one has loop.generations={planned}"
            )
        from pipeline.loop import check_finished_stages, check_same_settings

        check_same_settings(run_dir, cfg)  # a hand edit of config.yaml
        check_finished_stages(run_dir)
    else:
        cfg = load_config(args.config, args.overrides)
        default = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.task.name}"
        run_dir = Path(path_or_default(args.run_dir, "--run-dir", default))
        if remote is None:
            check_output(run_dir, "--run-dir")
        if (
            remote.holds_a_run()
            if remote is not None
            else run_dir.exists() and any(run_dir.iterdir())
        ):
            raise UsageError(
                f"{args.run_dir or run_dir} already holds a run; continue it with --resume "
                "or choose another --run-dir"
            )
    check_before_ray(cfg)
    if remote is None:  # a directory the OS refuses (/proc, a full disk) fails here, not in Ray
        make_output_dir(run_dir, "--run-dir")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not cfg.train.use_gpu else "cuda")
    if not args.verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    from pipeline.loop import Progress, run_loop
    from pipeline.report import format_table

    started = time.perf_counter()
    print(
        f"genloop: task {cfg.task.name}, {cfg.loop.generations} generations after generation 0, "
        f"curate={cfg.curate.strategy}, mix {cfg.mix.mode} real_fraction={cfg.mix.real_fraction}",
        flush=True,
    )
    where = args.run_dir if remote is not None else run_dir.resolve()
    print(f"genloop: run directory {where}", flush=True)
    progress = Progress(cfg.loop.generations, echo=lambda line: print(line, flush=True))
    try:
        table = run_loop(cfg, remote or run_dir, progress, log_to_driver=args.verbose)
    finally:
        import ray

        ray.shutdown()
    print()
    print(format_table(table))
    print(f"\ngenloop: finished in {time.perf_counter() - started:.0f}s; run directory {where}")
    return 0


if __name__ == "__main__":
    # Under `python -m`, this file is `__main__`; use the importable module so that the
    # sub-commands' exception classes are the ones `main` catches.
    from pipeline.cli import main as _main

    sys.exit(_main())
