"""`genloop submit` and `genloop jobs`: run genloop on a Ray cluster through its job server.

    genloop submit --address http://HEAD:8265 [--runtime-env FILE] [--follow] -- run [args]
    genloop jobs status|logs|stop|list [JOB_ID] [--address URL] [--follow]

The project directory is uploaded as the job's `working_dir` (without .venv, .git, runs/,
caches and model weights); the job runs `python -m pipeline.cli <args>` on the head node,
where the run joins the cluster (`ray.address=auto` is implied inside a job). The nodes need
genloop's dependencies: installed in their image, or through a runtime env that installs
them (`--runtime-env ray_configs/runtime_env/pip.yaml`). A `--runtime-env` YAML/JSON file
overrides the defaults key by key (`env_vars` merged, `excludes` added).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import sys
import time
from pathlib import Path

import yaml

from cluster.connect import ClusterError, job_client, job_server_url
from pipeline.storage import is_uri

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# gitignore-style patterns, relative to the project root; .gitignore is honoured as well.
UPLOAD_EXCLUDES = [
    ".git/",
    ".venv/",
    "venv/",
    "runs/",
    "**/__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    "build/",
    "dist/",
    "**/tensorboard/",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
]
EXIT_BAD_INPUT = 2
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def register(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser(
        "submit",
        help="run a genloop command on a Ray cluster (job submission)",
        description="Submit `genloop <args>` as a Ray job: the project directory is the job's "
        "working_dir, the command runs on the head node and joins the cluster. Example: "
        "genloop submit --address http://HEAD:8265 -- run --config ray_configs/gpu.yaml "
        "--run-dir /mnt/shared/runs/gpu-1",
    )
    _address_argument(submit)
    submit.add_argument(
        "--runtime-env",
        metavar="FILE",
        help="YAML/JSON runtime env whose keys override the defaults (pip, env_vars, ...)",
    )
    submit.add_argument("--submission-id", help="the job's id (default: one Ray makes up)")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    submit.add_argument(
        "genloop_args",
        nargs=argparse.REMAINDER,
        metavar="-- GENLOOP_ARGS",
        help="the genloop command to run, after `--`, e.g. -- run --config ray_configs/gpu.yaml",
    )
    submit.set_defaults(handler=_handle(cmd_submit))

    jobs = commands.add_parser("jobs", help="status, logs or stop of a submitted job")
    actions = jobs.add_subparsers(dest="action", required=True)
    for name, handler, text in (
        ("status", cmd_status, "the job's status and message"),
        ("logs", cmd_logs, "the job's output so far (--follow: until it ends)"),
        ("stop", cmd_stop, "stop the job"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("job_id", metavar="JOB_ID")
        _address_argument(action)
        if name == "logs":
            action.add_argument("--follow", action="store_true", help="stream until the job ends")
        action.set_defaults(handler=_handle(handler))
    listing = actions.add_parser("list", help="the cluster's jobs, newest last")
    _address_argument(listing)
    listing.set_defaults(handler=_handle(cmd_list))


def _address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="the cluster's job server, http://HEAD:8265 (also ray://HEAD:10001, HEAD:6379 "
        "or auto); default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS",
    )


def _handle(command):
    """Cluster problems print one line and exit 2, like every other input mistake."""

    def handler(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ClusterError as e:
            print(f"genloop: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT

    return handler


# --------------------------------------------------------------------------- submit


def cmd_submit(args: argparse.Namespace) -> int:
    genloop_args = list(args.genloop_args)
    if genloop_args[:1] == ["--"]:
        genloop_args = genloop_args[1:]
    if not genloop_args:
        raise ClusterError("nothing to run: give the genloop command after `--`, e.g. -- run")
    # Local checks first: a mistake in the command or the runtime env costs a second.
    genloop_args, notes = _check_genloop_args(genloop_args)
    runtime_env = build_runtime_env(args.runtime_env)
    entrypoint = entrypoint_for(genloop_args)
    client, url = job_client(job_server_url(args.address))
    where = runtime_env.get("working_dir")
    print(f"genloop: uploading {where} as the job's working_dir", file=sys.stderr, flush=True)
    try:
        with _quiet_ray_packaging():
            job_id = _submit_with_retry(client, entrypoint, runtime_env, args.submission_id)
    except (RuntimeError, ValueError) as e:
        raise ClusterError(f"the job server at {url} refused the job: {_first_line(e)}") from e
    flag = f" --address {url}"
    print(f"genloop: submitted job {job_id} to {url}", flush=True)
    print(f"  entrypoint: {entrypoint}")
    print(f"  follow:     genloop jobs logs {job_id}{flag} --follow")
    print(f"  status:     genloop jobs status {job_id}{flag}")
    print(f"  stop:       genloop jobs stop {job_id}{flag}")
    print(f"  dashboard:  {url}/#/jobs/{job_id}", flush=True)
    for note in notes:
        print(f"genloop: note: {note}", file=sys.stderr, flush=True)
    if args.follow:
        return _follow(client, job_id)
    return 0


def entrypoint_for(genloop_args: list[str]) -> str:
    """The shell command the job runs: the uploaded genloop, with the cluster's Python."""
    return "python -m pipeline.cli " + shlex.join(genloop_args)


def build_runtime_env(path: str | None, root: Path = PROJECT_ROOT) -> dict:
    """The project as `working_dir` (minus UPLOAD_EXCLUDES), overridden by the file at `path`.

    Raises:
        ClusterError: the file is missing, not YAML/JSON, not a mapping, or a key of it has
            the wrong form (the job server would refuse it only after the upload).
    """
    env: dict = {
        "working_dir": str(root),
        "excludes": list(UPLOAD_EXCLUDES),
        "env_vars": {"PYTHONUNBUFFERED": "1"},  # the job's log shows lines as they happen
    }
    if path is None:
        return env
    file = Path(path)
    try:
        given = yaml.safe_load(file.read_text(encoding="utf-8"))  # JSON is YAML too
    except OSError as e:
        raise ClusterError(f"--runtime-env {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ClusterError(f"--runtime-env {path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ClusterError(f"--runtime-env {path}: not YAML or JSON ({_first_line(e)})") from None
    if not isinstance(given, dict):
        raise ClusterError(f"--runtime-env {path}: expected a mapping, e.g. pip: [...]")
    for key, value in given.items():
        where = f"--runtime-env {path}: {key}"
        if key == "env_vars":
            if not isinstance(value, dict):
                raise ClusterError(
                    f"{where}: expected a mapping of variable names to values, "
                    "e.g. env_vars: {HF_HOME: /mnt/hf}"
                )
            for name, text in value.items():
                if not isinstance(text, (str, int, float, bool)):  # the job gets it as text
                    raise ClusterError(f"{where}.{name}: expected text or a number, got {text!r}")
            env["env_vars"].update({str(k): str(v) for k, v in value.items()})
        elif key == "excludes":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ClusterError(f"{where}: expected a list of paths, e.g. excludes: [data/]")
            env["excludes"] += value
        elif key == "working_dir":
            if not isinstance(value, str):
                raise ClusterError(f"{where}: expected a directory or a URI, got {value!r}")
            if is_uri(value):  # a package Ray downloads
                env["working_dir"] = value
                continue
            local = (file.parent / value).resolve()  # relative to the file
            if not local.exists():
                raise ClusterError(f"{where}: {local} does not exist")
            env["working_dir"] = str(local)
        else:
            env[key] = value
    _check_with_ray(env, path)
    return env


def _check_with_ray(env: dict, path: str) -> None:
    """Ray's own check of a runtime env (the types of pip, conda, py_modules, ...; local pip
    and conda files), which the job client makes only after uploading the working_dir."""
    from ray.runtime_env import RuntimeEnv

    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as e:
        raise ClusterError(f"--runtime-env {path}: {_first_line(e)}") from None


def _check_genloop_args(genloop_args: list[str]) -> tuple[list[str], list[str]]:
    """Refuse a command the cluster would refuse (an unknown command or flag, and for `run`
    config errors, are found here, before the upload), and make a `run --config` path
    relative to the uploaded project.

    Returns the arguments to run and notes for the user."""
    args = _parse_genloop_args(genloop_args)
    if args.command != "run":
        return genloop_args, []
    from pipeline.config import load_config

    overrides = args.overrides
    rewritten, notes = list(genloop_args), []
    if args.config:
        config = Path(args.config).resolve()
        try:
            relative = config.relative_to(PROJECT_ROOT)
        except ValueError:
            raise ClusterError(
                f"--config {args.config} is outside the project directory that is uploaded "
                f"({PROJECT_ROOT}); copy it into ray_configs/"
            ) from None
        for i, item in enumerate(rewritten):
            if item == args.config and rewritten[i - 1] == "--config":
                rewritten[i] = str(relative)
            elif item == f"--config={args.config}":
                rewritten[i] = f"--config={relative}"
    if not args.resume:
        cfg = load_config(args.config, overrides)  # ConfigError: every problem, exit 2
        if cfg.task.path and not Path(cfg.task.path).is_absolute():
            notes.append(
                f"task.path={cfg.task.path} is read relative to the job's working directory "
                "on the head node, and data outside the project is not uploaded: give a path "
                "every node can read"
            )
    if not args.run_dir or not Path(args.run_dir).is_absolute():
        notes.append(
            "without an absolute --run-dir on storage every node mounts (NFS, EFS, a "
            "ReadWriteMany volume), the run's artefacts stay in the job's working directory "
            "on the head node, and workers on other nodes cannot read the models"
        )
    return rewritten, notes


def _parse_genloop_args(genloop_args: list[str]) -> argparse.Namespace:
    """The job's command, parsed as `genloop` on the head node will parse it (parsing runs
    nothing; `-- run --help` prints the help and exits)."""
    from pipeline.cli import ArgumentError, _parser, parse_command

    commands = next(
        a.choices for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    if genloop_args[0] not in commands:
        raise ClusterError(
            f"-- {genloop_args[0]}: not a genloop command; the command comes first after `--`, "
            f"one of: {', '.join(commands)}"
        )
    try:
        return parse_command(genloop_args)
    except ArgumentError as e:
        command = e.prog.removeprefix("genloop ")
        raise ClusterError(f"{command}: {e.message}; see {e.prog} --help") from None


@contextlib.contextmanager
def _quiet_ray_packaging():
    """Ray logs each ignored file and default exclude while it zips the working_dir; a
    package it cannot take still raises, and that error is reported."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _submit_with_retry(client, entrypoint: str, runtime_env: dict, submission_id: str | None):
    """A freshly started head answers before its agent can take jobs; wait for it a little."""
    deadline = time.time() + 60
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id
            )
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


# --------------------------------------------------------------------------- jobs


def cmd_status(args: argparse.Namespace) -> int:
    client, url = job_client(args.address)
    info = _job_info(client, url, args.job_id)
    line = f"{args.job_id}: {info.status}"
    if info.message:
        line += f" ({_first_line(info.message)})"
    print(line)
    if info.start_time and info.end_time:
        print(f"  ran {(info.end_time - info.start_time) / 1000:.0f}s")
    print(f"  entrypoint: {info.entrypoint}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    client, url = job_client(args.address)
    _job_info(client, url, args.job_id)  # a clear error for an unknown id
    if args.follow:
        return _follow(client, args.job_id)
    print(client.get_job_logs(args.job_id), end="")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    client, url = job_client(args.address)
    info = _job_info(client, url, args.job_id)
    if str(info.status) in TERMINAL:
        print(f"{args.job_id}: already {info.status}")
        return 0
    client.stop_job(args.job_id)
    print(f"{args.job_id}: stop requested (was {info.status})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    client, _ = job_client(args.address)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    for job in jobs:
        if job.submission_id:  # drivers started by hand have none
            print(f"{job.submission_id}  {job.status!s:<9}  {job.entrypoint}")
    return 0


def _job_info(client, url: str, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise ClusterError(f"no job {job_id} on {url}") from None
        raise ClusterError(f"the job server at {url} failed: {_first_line(e)}") from e


def _follow(client, job_id: str) -> int:
    """Stream the job's output until it ends; exit status 0 when it succeeded."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(
            f"\ngenloop: stopped following; the job keeps running "
            f"(genloop jobs stop {job_id} stops it)",
            file=sys.stderr,
        )
        return 130
    status = client.get_job_status(job_id)
    while str(status) not in TERMINAL:  # the log stream can close a moment before the end
        time.sleep(1)
        status = client.get_job_status(job_id)
    print(f"genloop: job {job_id} {status}", file=sys.stderr)
    return 0 if str(status) == "SUCCEEDED" else 1


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
