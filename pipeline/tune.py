"""`genloop tune`: a Ray Tune search over loop settings; every trial is a whole loop run.

    genloop tune --config ray_configs/tune/PRESET.yaml [--out DIR|URI] [--runs-dir DIR]
        [key=value ...]
    genloop tune --resume EXPERIMENT_DIR|URI

The preset names a base run config (`base:`, plus any inline sections over it) and a `tune:`
section: the metric(s), the search algorithm (grid, random, optuna TPE, single- or
multi-objective), an optional ASHA scheduler whose time unit is the generation, and the search
space over any loop field (`mix.real_fraction: {uniform: [0, 1]}`). Overrides `tune.KEY=V`
change the search, any other `key=value` the base config. Everything is checked before Ray
starts; every problem is reported at once.

Each trial runs the loop in its own run directory (`EXPERIMENT/runs/<trial id>/`) and reports
once per generation, so ASHA stops weak trials after a generation. When only keys that
generation 0 does not read are searched, generation 0 is trained once and copied into every
trial. Trials reserve no CPU themselves: their inference workers and Ray Train workers ask
for their own, so at most floor(cluster CPUs / CPUs one trial's largest stage needs) trials
run at once, and none waits on another's resources.

The experiment lives wherever Ray Tune can store one (a local directory, NFS, an S3 or GCS
URI); an interrupted one is continued with `--resume`, which reruns no finished trial.
Writes `results.csv` and `results.md` (every trial's config and per-generation metrics),
`best.yaml` (the best trial's full config: `genloop run --config best.yaml`) and
`frontier.png`. Tune's own TensorBoard events are in each trial's directory.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pipeline.config import (
    SHORTHANDS,
    ConfigError,
    RunConfig,
    flatten_mapping,
    load_config,
    parse_value,
    read_yaml_mapping,
    set_dotted,
)
from pipeline.loop import (
    EMBED_HERE_MAX_ROWS,
    GEN0_FREE,
    copy_generation_zero,
    unrecorded_metric,
)

SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("none", "asha")
# name -> what its arguments are; every distribution is written `KEY: {NAME: ARGS}`.
DISTRIBUTIONS = {
    "uniform": "[low, high]",
    "loguniform": "[low, high], low > 0",
    "quniform": "[low, high, step]",
    "int": "[low, high], both included",
    "choice": "[value, value, ...]",
    "grid": "[value, value, ...], every value tried",
}
TUNE_KEYS = {
    "metric": "what to optimise: a per-generation metric, or a list of them (optuna)",
    "mode": "max or min (a list for several metrics); default by metric",
    "search": "grid | random | optuna",
    "num_samples": "trials (grid: repeats of the whole grid)",
    "scheduler": "none, asha, or {name: asha, grace_period: G, reduction_factor: R}",
    "max_concurrent_trials": "auto (what the cluster holds without starving a trial) or N",
    "seed": "seed of the search algorithm (default: the config's seed)",
    "space": "KEY: {DISTRIBUTION: ARGS}",
}
# Metrics where lower is better; every other metric is maximised unless `mode` says otherwise.
LOWER_IS_BETTER = {"perplexity", "heldout_loss", "labels_spent", "labels_total", "attempt"}
# Trial resources: keys that change what one trial asks Ray for.
RESOURCE_KEYS = (
    "train.workers",
    "train.use_gpu",
    "generate.workers",
    "score.workers",
    "eval.workers",
    "select.method",
)
# Preferred axes of the frontier plot, when searched.
FRONTIER_AXES = ("mix.real_fraction", "curate.label_budget", "select.budget", "curate.gamma")
TRIAL_RESOURCES = {"cpu": 0, "memory": 2**20}  # see `_trial_resources`
SPEC_FILE = "tune.yaml"  # the resolved search, written into the experiment for --resume


# --------------------------------------------------------------------------- the search space


@dataclass
class Param:
    """One searched key: `kind` is a name in DISTRIBUTIONS, `args` its arguments."""

    key: str
    kind: str
    args: list

    def domain(self):
        """The Ray Tune search-space object."""
        from ray import tune

        a = self.args
        if self.kind == "uniform":
            return tune.uniform(a[0], a[1])
        if self.kind == "loguniform":
            return tune.loguniform(a[0], a[1])
        if self.kind == "quniform":
            return tune.quniform(a[0], a[1], a[2])
        if self.kind == "int":
            return tune.randint(a[0], a[1] + 1)  # randint's upper bound is excluded
        if self.kind == "choice":
            return tune.choice(list(a))
        return tune.grid_search(list(a))

    def written(self) -> list:
        """The values the preset wrote: a range's ends, or every value listed."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        return [self.args[0], self.args[1]]

    def probes(self) -> list:
        """Values that stand for the whole range when checking it against the config: both
        ends, and an off-grid value inside (a float range over an integer-only key fails)."""
        a = self.args
        if self.kind in ("choice", "grid"):
            return list(a)
        if self.kind == "int":
            return [a[0], (a[0] + a[1]) // 2, a[1]]
        if self.kind == "loguniform":
            return [a[0], a[0] * (a[1] / a[0]) ** 0.377, a[1]]
        inside = a[0] + 0.377 * (a[1] - a[0])
        if self.kind == "quniform":
            inside = round(inside / a[2]) * a[2]
        return [a[0], inside, a[1]]


@dataclass
class Search:
    """A validated search: the base run config, and how to search around it."""

    base: RunConfig
    metrics: list[str]
    modes: list[str]
    algorithm: str  # one of SEARCHES
    num_samples: int
    scheduler: dict | None  # ASHA's settings, or None
    space: dict[str, Param]
    max_concurrent_trials: int | None  # None: derived from the cluster
    seed: int
    raw: dict  # the `tune:` section as given (after overrides), saved for --resume

    @property
    def metric(self) -> str:
        return self.metrics[0]

    @property
    def mode(self) -> str:
        return self.modes[0]

    @property
    def generations(self) -> int:
        """The most generations any trial runs (ASHA's max_t)."""
        if "loop.generations" in self.space:
            return max(int(v) for v in self.space["loop.generations"].probes())
        return self.base.loop.generations

    @property
    def total_trials(self) -> int:
        """Trials the search runs: num_samples, times every grid's size."""
        grids = [len(p.args) for p in self.space.values() if p.kind == "grid"]
        return self.num_samples * math.prod(grids)

    @property
    def shares_generation_zero(self) -> bool:
        return all(key.startswith(GEN0_FREE) for key in self.space)


def load_search(path: str | Path, overrides: list[str] = ()) -> Search:
    """A tune preset, with `tune.KEY=V` overrides for the search and others for the config.

    The preset's config sections apply over its `base:` (a run preset, or another tune
    preset whose config sections count and whose `tune:` section does not), then the
    overrides; its own `tune:` section is the search.

    Raises:
        ConfigError: every problem at once (the base config's and the search's).
    """
    sections = _read_preset(Path(path))
    tune_raw = sections.pop("tune", None)
    if not isinstance(tune_raw, dict):
        raise ConfigError([f"{path}: needs a `tune:` section ({', '.join(TUNE_KEYS)})"])
    config_overrides, errors = [], []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            errors.append(f"override {item!r}: expected key=value, e.g. tune.num_samples=4")
        elif key.startswith("tune.space."):  # the rest is a dotted config key
            space = tune_raw.get("space")
            space = tune_raw["space"] = space if isinstance(space, dict) else {}
            space[key[len("tune.space.") :]] = parse_value(value)
        elif key.startswith("tune."):
            set_dotted(tune_raw, key[len("tune.") :], parse_value(value))
        else:
            config_overrides.append(item)
    searched = {_canonical(k) for k in (tune_raw.get("space") or {})}
    for item in config_overrides:
        key, _, value = item.partition("=")
        section = parse_value(value)  # mix={real_fraction: 0.3} sets mix.real_fraction
        keys = (
            [f"{key}.{k}" for k in flatten_mapping(section)] if isinstance(section, dict) else [key]
        )
        if searched.intersection(map(_canonical, keys)):
            errors.append(f"{item}: this key is searched; change its range in tune.space instead")
    if errors:
        raise ConfigError(errors)
    inline = [f"{k}={json.dumps(v)}" for k, v in flatten_mapping(sections).items()]
    try:
        base = load_config(None, [*inline, *config_overrides])
    except ConfigError as e:
        # Report the search's own mistakes, too (its values need a valid base to be checked).
        try:
            parse_search(tune_raw, RunConfig(), check_values=False)
        except ConfigError as more:
            raise ConfigError(e.errors + more.errors) from None
        raise
    return parse_search(tune_raw, _for_trials(base))


def _read_preset(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A preset's sections merged over its `base:` chain (bases are relative to the file)."""
    if path.resolve() in seen:
        raise ConfigError([f"{path}: `base:` leads back to itself"])
    raw = read_yaml_mapping(path, "preset")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError([f"{path}: base: expected a file name, got {base!r}"])
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(
            [
                f"{path}: base: {base}: no such file ({base_path.resolve()}; a base is relative "
                "to the preset)"
            ]
        )
    inherited = _read_preset(base_path, (*seen, path.resolve()))
    inherited.pop("tune", None)  # a base's search is not this preset's
    return _merge(inherited, raw)


def _merge(under: dict, over: dict) -> dict:
    merged = dict(under)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_search(raw: dict, base: RunConfig, check_values: bool = True) -> Search:
    """Check the `tune:` section against `base`; every sampled config must be a valid one
    (unless `check_values` is false: then only the section's own form is checked).

    Raises:
        ConfigError: listing every problem.
    """
    errors: list[str] = []
    for key in raw:
        if key not in TUNE_KEYS:
            errors.append(f"unknown key 'tune.{key}'; valid keys: {', '.join(TUNE_KEYS)}")

    algorithm = raw.get("search", "random")
    if algorithm not in SEARCHES:
        errors.append(f"tune.search: {algorithm!r} is not one of {', '.join(SEARCHES)}")

    metrics = raw.get("metric", "accuracy")
    metrics = metrics if isinstance(metrics, list) else [metrics]
    known = reported_metrics()
    for m in metrics:
        if m not in known:
            errors.append(f"tune.metric: {m!r} is not reported; choose from {', '.join(known)}")
    if not metrics:
        errors.append("tune.metric: give at least one metric")
    modes = raw.get("mode")
    if modes is None:
        modes = ["min" if m in LOWER_IS_BETTER else "max" for m in metrics]
    modes = modes if isinstance(modes, list) else [modes]
    if len(modes) != len(metrics) or any(m not in ("max", "min") for m in modes):
        errors.append(f"tune.mode: give max or min for each metric ({metrics}), got {modes}")

    num_samples = raw.get("num_samples", 1 if algorithm == "grid" else 8)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        errors.append(f"tune.num_samples: a whole number >= 1, got {num_samples!r}")

    scheduler = _parse_scheduler(raw.get("scheduler", "none"), base.loop.generations, errors)
    if len(metrics) > 1:
        if algorithm != "optuna":
            errors.append("tune.metric: several metrics (multi-objective) need search: optuna")
        if scheduler is not None:
            errors.append(
                "tune.scheduler: ASHA stops trials on one metric; with several metrics "
                "use scheduler: none"
            )

    concurrent = raw.get("max_concurrent_trials", "auto")
    if concurrent == "auto" or concurrent is None:
        concurrent = None
    elif not isinstance(concurrent, int) or isinstance(concurrent, bool) or concurrent < 1:
        errors.append(
            f"tune.max_concurrent_trials: auto or a whole number >= 1, got {concurrent!r}"
        )
        concurrent = None

    seed = raw.get("seed", base.seed)
    if not isinstance(seed, int) or isinstance(seed, bool):
        errors.append(f"tune.seed: an integer, got {seed!r}")
        seed = base.seed

    space = _parse_space(raw.get("space"), algorithm, base if check_values else None, errors)
    for m in metrics:
        unrecorded = unrecorded_metric(m, base)
        if unrecorded and not any(key.startswith(unrecorded[0]) for key in space):
            errors.append(f"tune.metric: no trial records {m} ({unrecorded[1]})")
    if base.loop.generations < 1 and "loop.generations" not in space:
        errors.append("loop.generations: a search needs at least 1 generation after generation 0")
    if errors:
        raise ConfigError(list(dict.fromkeys(errors)))
    return Search(
        base=base,
        metrics=metrics,
        modes=modes,
        algorithm=algorithm,
        num_samples=num_samples,
        scheduler=scheduler,
        space=space,
        max_concurrent_trials=concurrent,
        seed=seed,
        raw=raw,
    )


def _parse_scheduler(value: Any, generations: int, errors: list[str]) -> dict | None:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or value.get("name") not in SCHEDULERS:
        errors.append(
            f"tune.scheduler: {value!r} is not one of {', '.join(SCHEDULERS)} "
            "(or {name: asha, grace_period: 1, reduction_factor: 2})"
        )
        return None
    if value["name"] == "none":
        return None
    settings = {"grace_period": 1, "reduction_factor": 2, "brackets": 1}
    for key, given in value.items():
        if key == "name":
            continue
        if key not in settings:
            errors.append(f"unknown key 'tune.scheduler.{key}'; valid: {', '.join(settings)}")
            continue
        settings[key] = given
    g, r, b = settings["grace_period"], settings["reduction_factor"], settings["brackets"]
    if not isinstance(g, int) or isinstance(g, bool) or not 1 <= g <= max(1, generations):
        errors.append(
            f"tune.scheduler.grace_period: generations before a trial can be stopped, "
            f"1..{generations} (loop.generations), got {g!r}"
        )
    if not isinstance(r, (int, float)) or isinstance(r, bool) or r <= 1:
        errors.append(f"tune.scheduler.reduction_factor: a number > 1, got {r!r}")
    if not isinstance(b, int) or isinstance(b, bool) or b < 1:
        errors.append(f"tune.scheduler.brackets: a whole number >= 1, got {b!r}")
    return settings


def _parse_space(raw: Any, algorithm: str, base: RunConfig | None, errors: list[str]) -> dict:
    if not isinstance(raw, dict) or not raw:
        errors.append(
            "tune.space: a mapping of config keys to distributions, e.g. "
            "mix.real_fraction: {uniform: [0, 1]}"
        )
        return {}
    space: dict[str, Param] = {}
    given_as: dict[str, str] = {}
    for given, spec in raw.items():
        key = _canonical(str(given))
        where = f"tune.space.{given}"
        if key in given_as:
            errors.append(f"{where}: the same key as tune.space.{given_as[key]}; give it once")
            continue
        given_as[key] = str(given)
        if key.startswith("ray.") or key == "ray":
            errors.append(f"{where}: ray.* belongs to the experiment, not to a trial")
            continue
        if not isinstance(spec, dict) or len(spec) != 1:
            errors.append(
                f"{where}: expected one distribution, e.g. {{choice: [a, b]}}; " + _forms()
            )
            continue
        ((kind, args),) = spec.items()
        problem = _check_args(kind, args)
        if problem:
            errors.append(f"{where}: {problem}")
            continue
        if algorithm == "grid" and kind not in ("grid", "choice"):
            errors.append(
                f"{where}: grid search tries listed values; use {{grid: [...]}} "
                f"(or search: random / optuna for {kind})"
            )
            continue
        if algorithm == "optuna" and kind == "grid":
            errors.append(f"{where}: optuna samples values; use {{choice: [...]}} instead of grid")
            continue
        if algorithm == "grid":
            kind = "grid"  # choice under grid search: every value
        space[key] = Param(key, kind, list(args))
    # Every sampled config must be valid: try the ends and an inside value of every range.
    for param in space.values() if base is not None else ():
        errors.extend(_sample_errors(param, base))
    return space


def _sample_errors(param: Param, base: RunConfig) -> list[str]:
    """Why configs sampled from `param` would be invalid. The values the preset wrote are
    tried first, and a value inside a range only when they pass: a bound out of range is
    one error about that bound, not a second about some value sampled below it."""

    def problems(value) -> list[str]:
        try:
            resolve_config(base, {param.key: value})
        except ConfigError as e:
            return e.errors
        return []

    written = param.written()
    errors = [f"tune.space: {m}" for value in written for m in problems(value)]
    if errors:
        return errors
    sampled = f"a value {param.kind}: {param.args} samples"
    inside = [value for value in param.probes() if value not in written]
    return [f"tune.space: {m} ({sampled})" for value in inside for m in problems(value)]


def _check_args(kind: str, args: Any) -> str | None:
    """What is wrong with `{kind: args}`, or None."""
    if kind not in DISTRIBUTIONS:
        return f"unknown distribution {kind!r}; " + _forms()
    if not isinstance(args, list) or not args:
        return f"{kind} takes a list: {kind}: {DISTRIBUTIONS[kind]}"
    if kind in ("choice", "grid"):
        if any(isinstance(v, (list, dict)) for v in args):
            return f"{kind} takes plain values (numbers, strings, true/false, null)"
        twice = [v for i, v in enumerate(args) if repr(v) in map(repr, args[:i])]
        if twice:
            return f"{kind} lists {twice[0]!r} twice; give each value once"
        return None
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args)
    if len(args) != (3 if kind == "quniform" else 2) or not numbers:
        return f"{kind} takes {DISTRIBUTIONS[kind]}, got {args!r}"
    low, high = args[0], args[1]
    if kind == "int" and not all(isinstance(v, int) for v in args):
        return f"int takes whole-number bounds, got {args!r}"
    if not (low <= high if kind == "int" else low < high):
        return f"{kind}: low must be below high, got {args!r}"
    if kind == "loguniform" and low <= 0:
        return f"loguniform: low must be > 0, got {low}"
    if kind == "quniform" and args[2] <= 0:
        return f"quniform: the step must be > 0, got {args[2]}"
    return None


def _forms() -> str:
    return "distributions: " + ", ".join(f"{k}: {v}" for k, v in DISTRIBUTIONS.items())


def reported_metrics() -> list[str]:
    """Every metric a trial reports per generation: the loop's summary row, plus
    `labels_total` (labels spent so far) and `guard_stopped`."""
    from pipeline.loop import summary_row

    return [*summary_row(0, collections.defaultdict(float)), "labels_total", "guard_stopped"]


def resolve_config(base: RunConfig, assignment: dict[str, Any]) -> RunConfig:
    """`base` with the dotted keys of `assignment` set, validated like any run config.

    Raises:
        ConfigError: an unknown key, a wrong type or an out-of-range value.
    """
    values = {**flatten_mapping(dataclasses.asdict(base)), **assignment}
    return load_config(None, [f"{k}={json.dumps(_plain(v))}" for k, v in values.items()])


def _canonical(key: str) -> str:
    """`curate` (the shorthand) -> `curate.strategy`."""
    return f"{key}.{SHORTHANDS[key]}" if key in SHORTHANDS else key


def _plain(value: Any) -> Any:
    """numpy scalars (what samplers return) as Python values."""
    return value.item() if hasattr(value, "item") else value


def _for_trials(cfg: RunConfig) -> RunConfig:
    """The base config as trials run it. Trials run in other working directories (and maybe
    on other nodes): local files named relative to here become absolute. Trials run side by
    side: a worker takes 1 CPU unless `ray.cpus_per_worker` says otherwise, not its stage's
    share of the whole cluster."""

    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path and Path(path).exists() else path

    return dataclasses.replace(
        cfg,
        task=dataclasses.replace(
            cfg.task, path=absolute(cfg.task.path), heldout_path=absolute(cfg.task.heldout_path)
        ),
        model=dataclasses.replace(cfg.model, path=absolute(cfg.model.path)),
        train=dataclasses.replace(
            cfg.train,
            deepspeed=dataclasses.replace(
                cfg.train.deepspeed, config_file=absolute(cfg.train.deepspeed.config_file)
            ),
        ),
        ray=dataclasses.replace(cfg.ray, cpus_per_worker=cfg.ray.cpus_per_worker or 1),
    )


# --------------------------------------------------------------------------- resources


def trial_needs(cfg: RunConfig) -> dict[str, int]:
    """CPUs and GPUs the largest stage of one trial asks for at once.

    The stages of a loop run one after another (each finishes before the next asks Ray for
    anything), so a trial's peak is its largest stage: the Ray Train workers, the inference
    workers of one stage (generate, score, evaluate), or a CPU-only stage (a large training-mix
    sample's embedding; data selection's embedding or proxy training). Each worker or actor
    takes `ray.cpus_per_worker` CPUs (1 GPU instead on GPUs; inference actors take both)."""
    from pipeline.select_cmd import SelectOptions
    from selection.selectors import required_features

    actors = [cfg.generate.workers, cfg.score.workers, cfg.eval.workers]
    big_mix_sample = cfg.diagnostics.mix_embedding_rows > EMBED_HERE_MAX_ROWS  # else in-trial
    cpu_only = [cfg.score.workers] if big_mix_sample else []
    if cfg.select.method != "none" and required_features(cfg.select.method) - {"losses"}:
        cpu_only += [cfg.score.workers, SelectOptions().train.workers]
    cpus = cfg.ray.cpus_per_worker or 1
    if cfg.train.use_gpu:
        return {"CPU": cpus * max(actors + cpu_only), "GPU": max([cfg.train.workers, *actors])}
    return {"CPU": cpus * max([cfg.train.workers, *actors, *cpu_only]), "GPU": 0}


def search_needs(search: Search) -> dict[str, int]:
    """The most any trial of the search needs (resource keys may be searched, too)."""
    searched = [p for key, p in search.space.items() if key in RESOURCE_KEYS]
    needs = {"CPU": 0, "GPU": 0}
    for values in itertools.product(*(p.probes() for p in searched)):
        cfg = resolve_config(search.base, {p.key: v for p, v in zip(searched, values)})
        for name, amount in trial_needs(cfg).items():
            needs[name] = max(needs[name], amount)
    return needs


def max_concurrent_trials(
    cluster: dict[str, float], needs: dict[str, int], requested: int | None = None
) -> int:
    """How many trials fit at once: floor(cluster / one trial's need) for CPUs and GPUs,
    at most `requested`.

    Raises:
        UsageError: the cluster cannot run even one trial (it would wait forever).
    """
    from pipeline.cli import UsageError

    fits = []
    for name, amount in needs.items():
        if amount <= 0:
            continue
        have = cluster.get(name, 0.0)
        if have < amount:
            raise UsageError(
                f"one trial needs {amount} {name}s at once (its largest stage: train.workers, "
                f"generate/score/eval.workers), the cluster has {have:g}; lower the workers"
            )
        fits.append(int(have // amount))
    fit = min(fits, default=1)
    return max(1, min(fit, requested or fit))


# --------------------------------------------------------------------------- one trial


def _trial(config: dict, *, base: dict, runs_dir: str, gen0_dir: str | None) -> None:
    """A Ray Tune function trainable: one whole loop run, one report per generation.

    `config` holds the sampled values of the searched keys. The run directory is
    `runs_dir/<trial id>`; a restored trial runs the loop again there, so finished stages
    are loaded, and the generations it reported before are not reported twice.
    """
    from ray import tune

    from pipeline.loop import Progress, run_loop

    cfg = resolve_config(RunConfig(), {**flatten_mapping(base), **config})
    # MLflow gets the trials through Ray Tune's MLflowLoggerCallback (one MLflow run per
    # trial, with its searched values), not a second time from inside the loop.
    cfg = dataclasses.replace(
        cfg, diagnostics=dataclasses.replace(cfg.diagnostics, mlflow_uri=None)
    )
    run_dir = Path(runs_dir) / tune.get_context().get_trial_id()
    if gen0_dir:
        copy_generation_zero(Path(gen0_dir), run_dir)
    reported = -1
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            reported = json.loads((Path(directory) / "generation.json").read_text())["generation"]
    labels_total = 0

    def report(row: dict) -> None:
        nonlocal labels_total
        labels_total += row["labels_spent"]
        if row["generation"] <= reported:
            return
        metrics = dict(
            row,
            labels_total=labels_total,
            guard_stopped=bool(row["guard_worse"] and cfg.guard.action == "stop"),
        )
        # A tiny checkpoint per generation tells a restored trial where it stood.
        with tempfile.TemporaryDirectory() as directory:
            (Path(directory) / "generation.json").write_text(json.dumps(metrics))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

    log = run_dir / "progress.log"
    run_dir.mkdir(parents=True, exist_ok=True)

    def echo(line: str) -> None:
        with log.open("a") as f:
            f.write(line + "\n")

    run_loop(cfg, run_dir, Progress(cfg.loop.generations, echo=echo), on_generation=report)


def _trial_resources(trainable):
    """The trainable itself reserves no CPU: every CPU a trial uses is asked for by its
    inference workers and Ray Train workers, outside the trial's placement group. A trial
    never holds CPUs while it waits for more: its inference workers are handed back before
    its training workers lease theirs (`train_generation`), and those pass to the trial's
    next stage when each generation's training ends (or go back, `pass_lease`). A 1 MiB
    memory reservation stands in, because Tune needs a non-empty bundle."""
    from ray import tune

    return tune.with_resources(trainable, TRIAL_RESOURCES)


# --------------------------------------------------------------------------- the command


def register(commands) -> None:
    parser = commands.add_parser(
        "tune",
        help="search loop settings with Ray Tune (each trial a whole loop run)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", help="a tune preset, e.g. ray_configs/tune/arithmetic_fraction_budget.yaml"
    )
    parser.add_argument(
        "--out",
        help="experiment directory or URI (s3://..., gs://...); "
        "default runs/tune/<time>-<preset name>",
    )
    parser.add_argument(
        "--runs-dir",
        help="where the trials' run directories go (default EXPERIMENT/runs; for a URI "
        "experiment, runs/tune/<name>/runs here); every node must see it",
    )
    parser.add_argument(
        "--resume",
        metavar="EXPERIMENT",
        help="continue an interrupted experiment (finished trials are not rerun)",
    )
    parser.add_argument("--verbose", action="store_true", help="show Ray Tune's own output")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="tune.KEY=V changes the search (tune.num_samples=4, "
        "tune.space.mix.real_fraction='{uniform: [0, 0.5]}'); others the base config",
    )
    parser.set_defaults(handler=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    import os

    from pipeline.cli import UsageError, check_output, path_or_default

    if args.resume:
        if args.config or args.overrides or args.out is not None or args.runs_dir is not None:
            raise UsageError("--resume takes the experiment's own tune.yaml; give only the path")
        experiment = _location(args.resume)
        saved = _read_spec(experiment)
        search = parse_search(
            saved["tune"], resolve_config(RunConfig(), flatten_mapping(saved["base"]))
        )
        runs_dir, gen0_dir = saved["runs_dir"], saved["gen0_dir"]
    else:
        if not args.config:
            raise UsageError("genloop tune needs --config PRESET.yaml (or --resume EXPERIMENT)")
        search = load_search(args.config, args.overrides)
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(args.config).stem}"
        experiment = _location(path_or_default(args.out, "--out", f"runs/tune/{name}"))
        if _exists(experiment, SPEC_FILE):
            raise UsageError(
                f"{experiment} already holds an experiment; continue it with --resume {experiment}"
            )
        if "://" not in experiment:
            check_output(experiment, "--out")
            if Path(experiment).is_dir() and any(Path(experiment).iterdir()):
                raise UsageError(f"--out {experiment}: not empty; choose a new directory")
        default_runs = (
            f"{experiment}/runs"
            if "://" not in experiment
            else f"runs/tune/{_name(experiment)}/runs"
        )
        runs_dir = path_or_default(args.runs_dir, "--runs-dir", default_runs)
        runs_dir = str(check_output(runs_dir, "--runs-dir").resolve())
        gen0_dir = str(Path(runs_dir) / "generation_0") if search.shares_generation_zero else None
    from pipeline.data import DataError
    from pipeline.loop import check_same_settings
    from pipeline.tasks import make_task

    # Bad data costs a second here, not a failed trial: the base's task, and each task the
    # space can make (every file a `task.path` grid or choice names, say).
    make_task(search.base.task, search.base.seed)
    for param in search.space.values():
        for value in param.probes() if param.key.startswith("task.") else ():
            try:
                make_task(resolve_config(search.base, {param.key: value}).task, search.base.seed)
            except DataError as e:
                which = param.key if str(value) in str(e) else f"{param.key}={value}"
                raise DataError(f"tune.space: {which}: {e}") from None
    if gen0_dir:  # a --runs-dir shared with an earlier experiment may hold its generation 0
        check_same_settings(Path(gen0_dir), generation_zero_config(search))
    from cluster.connect import preflight

    preflight(search.base.ray.address)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if search.base.train.use_gpu else "cpu")
    if not args.verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if not args.resume:
        spec = {
            "base": dataclasses.asdict(search.base),
            "tune": search.raw,
            "runs_dir": runs_dir,
            "gen0_dir": gen0_dir,
        }
        spec["digest"] = _spec_digest(yaml.safe_load(yaml.safe_dump(spec)))
        _write_bytes(experiment, SPEC_FILE, yaml.safe_dump(spec, sort_keys=False).encode())
    return run_search(
        search, experiment, runs_dir, gen0_dir, resume=bool(args.resume), verbose=args.verbose
    )


def generation_zero_config(search: Search) -> RunConfig:
    """The run that trains the generation 0 every trial starts from (when shareable)."""
    return dataclasses.replace(
        search.base, loop=dataclasses.replace(search.base.loop, generations=0)
    )


def run_search(
    search: Search,
    experiment: str,
    runs_dir: str,
    gen0_dir: str | None,
    *,
    resume: bool = False,
    verbose: bool = False,
) -> int:
    """Generation 0 once (when shareable), then the Tune experiment, then its outputs."""
    import ray
    from ray import tune

    from cluster.connect import connect
    from pipeline.inference import quiet_logs, worker_env
    from pipeline.loop import Progress, run_loop

    started = time.perf_counter()
    say = _echo
    say(
        connect(
            search.base.ray.address,
            num_cpus=search.base.ray.num_cpus,
            env=worker_env(),
            log_to_driver=verbose,
        )
    )
    try:
        quiet_logs()
        needs = search_needs(search)
        concurrent = max_concurrent_trials(
            ray.cluster_resources(), needs, search.max_concurrent_trials
        )
        need_text = " + ".join(f"{v} {k}" for k, v in needs.items() if v) or "nothing"
        say(
            f"genloop tune: {search.algorithm} search over {', '.join(search.space)}; "
            f"{search.num_samples} sample(s); metric {_objective(search)}; "
            f"scheduler {'ASHA' if search.scheduler else 'none'}"
        )
        say(
            f"genloop tune: one trial needs {need_text} at its largest stage; "
            f"{concurrent} trial(s) at a time"
        )
        say(f"genloop tune: experiment {experiment}; trial run directories in {runs_dir}")
        if gen0_dir:
            say("genloop tune: generation 0 does not depend on the searched keys: one for all")
            run_loop(generation_zero_config(search), Path(gen0_dir), Progress(0, echo=say))
        trainable = _trial_resources(
            tune.with_parameters(
                _trial,
                base=dataclasses.asdict(search.base),
                runs_dir=runs_dir,
                gen0_dir=gen0_dir,
            )
        )
        callbacks = [_echo_callback(search)]
        if search.base.diagnostics.mlflow_uri:
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            callbacks.append(
                MLflowLoggerCallback(
                    tracking_uri=search.base.diagnostics.mlflow_uri,
                    experiment_name=search.base.diagnostics.mlflow_experiment,
                    save_artifact=False,
                )
            )
        if resume:
            tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={key: p.domain() for key, p in search.space.items()},
                tune_config=_tune_config(search, concurrent),
                run_config=tune.RunConfig(
                    name=_name(experiment),
                    storage_path=_parent(experiment),
                    callbacks=callbacks,
                    verbose=1 if verbose else 0,
                ),
            )
        grid = tuner.fit()
        results = collect_results(grid.experiment_path, grid.filesystem, search)
        owed = open_trials(grid.experiment_path, grid.filesystem, search)
        # The last line of each failed trial's error: the exception, not Ray's traceback.
        failed = [(str(e).strip().splitlines() or [type(e).__name__])[-1] for e in grid.errors]
    finally:
        ray.shutdown()
    return conclude(search, experiment, results, owed, failed, started)


def conclude(
    search: Search,
    experiment: str,
    results: pd.DataFrame,
    owed: int,
    failed: list[str],
    started: float,
) -> int:
    """Write the outputs and the summary of a search; the exit status: 1 when no trial
    reported or a trial failed (`failed`: each failed trial's last error line), else 0."""
    say = _echo
    failures = (
        f"{len(failed)} trial(s) failed, the first with: {failed[0]}; "
        f"--resume {experiment} runs them again"
        if failed
        else ""
    )
    if results.empty:
        say(f"genloop tune: no trial reported a generation; {owed} trial(s) still to run")
        if failures:
            say(f"genloop tune: {failures}")
        return 1
    write_outputs(results, search, experiment)
    say("")
    say(summary_text(results, search))
    stopped = results.groupby("trial").last().query("status == 'stopped by ASHA'")
    if len(stopped):
        say(
            f"\nASHA stopped {len(stopped)} of {results['trial'].nunique()} trials early: "
            + ", ".join(
                f"{t} (after generation {int(r.generation)})" for t, r in stopped.iterrows()
            )
        )
    if owed:
        say(f"\n{owed} trial(s) still to run; continue with: genloop tune --resume {experiment}")
    say(f"\ngenloop tune: finished in {time.perf_counter() - started:.0f}s; {experiment}")
    if failures:
        say(f"genloop tune: {failures}")
        return 1
    return 0


def _tune_config(search: Search, concurrent: int):
    """Search algorithm and scheduler; the metric(s) go wherever Tune wants them."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    single = len(search.metrics) == 1
    scheduler = None
    if search.scheduler is not None:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="generation",  # the time unit is the generation
            max_t=search.generations,
            **search.scheduler,
        )
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        if single:  # Tune hands the metric to the searcher and the scheduler
            searcher = OptunaSearch(seed=search.seed)
            metric, mode = search.metric, search.mode
        else:  # multi-objective: the searcher alone knows the metrics (no scheduler)
            searcher = OptunaSearch(metric=search.metrics, mode=search.modes, seed=search.seed)
            metric = mode = None
        return tune.TuneConfig(
            metric=metric,
            mode=mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=search.num_samples,
            max_concurrent_trials=concurrent,
        )
    searcher = BasicVariantGenerator(max_concurrent=concurrent, random_state=search.seed)
    return tune.TuneConfig(
        metric=search.metric,
        mode=search.mode,
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=search.num_samples,
    )


def _echo_callback(search: Search):
    """A Tune callback printing one line per trial and generation, and each trial's end."""
    from ray.tune import Callback

    keys = list(search.space)

    class Echo(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            values = "  ".join(f"{m} {_number(result.get(m))}" for m in search.metrics)
            settings = ", ".join(f"{_short(k)}={_value(trial.config.get(k))}" for k in keys)
            _echo(
                f"[trial {trial.trial_id}] gen {result['generation']}/{search.generations}"
                f"  {values}  ({settings})"
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            _echo(f"[trial {trial.trial_id}] failed; see {trial.path} and its run directory")

    return Echo()


# --------------------------------------------------------------------------- results


def collect_results(experiment_path: str, filesystem, search: Search) -> pd.DataFrame:
    """One row per trial and generation: trial id, status, the searched values, metrics."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(experiment_path, storage_filesystem=filesystem)
    frames = []
    for trial in analysis.trials:
        reports = analysis.trial_dataframes.get(trial.trial_id)
        if reports is None or reports.empty or "generation" not in reports:
            continue
        reports = reports.drop_duplicates("generation", keep="last").sort_values("generation")
        cfg = resolve_config(search.base, {k: trial.config[k] for k in search.space})
        frame = pd.DataFrame(
            {
                "trial": trial.trial_id,
                **{k: _plain(trial.config[k]) for k in search.space},
                **{m: reports[m].to_numpy() for m in reported_metrics() if m in reports},
            }
        )
        frame.insert(1, "status", trial_status(trial.status, frame, cfg, search))
        frames.append(frame)
    if not frames:
        return pd.DataFrame()
    # Trials in the order they were made, whatever order a restored experiment lists them in.
    results = pd.concat(frames, ignore_index=True)
    return results.sort_values(["trial", "generation"], kind="stable", ignore_index=True)


def open_trials(experiment_path: str, filesystem, search: Search) -> int:
    """Trials an interrupted experiment still owes: started but not ended, or not yet made."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(experiment_path, storage_filesystem=filesystem).trials
    ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    return max(len(trials), search.total_trials) - ended


def trial_status(tune_status: str, reports: pd.DataFrame, cfg: RunConfig, search: Search) -> str:
    """finished, stopped by ASHA, guard stop, error or unfinished."""
    if tune_status == "ERROR":
        return "error"
    last = reports.iloc[-1]
    if last["generation"] >= cfg.loop.generations:
        return "finished"
    if bool(last.get("guard_stopped", False)):
        return "guard stop"
    if tune_status == "TERMINATED" and search.scheduler is not None:
        return "stopped by ASHA"
    return "unfinished"


def final_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Each trial's last reported generation."""
    return results.groupby("trial", sort=False).tail(1).reset_index(drop=True)


def pareto_front(values: np.ndarray, modes: list[str]) -> np.ndarray:
    """Which rows of `values` (n x k) no other row beats on every column (and ties)."""
    signed = np.asarray(values, dtype=float) * np.where(np.array(modes) == "max", 1.0, -1.0)
    front = np.ones(len(signed), dtype=bool)
    for i, row in enumerate(signed):
        better = np.all(signed >= row, axis=1) & np.any(signed > row, axis=1)
        front[i] = not better.any()
    return front


def best_trial(results: pd.DataFrame, search: Search) -> pd.Series:
    """The best trial by its last generation's value, among those that finished (if any did);
    several metrics: the best on the first among the Pareto-optimal ones."""
    final = final_rows(results)
    finished = final[final["status"] == "finished"]
    pool = (finished if len(finished) else final).dropna(subset=search.metrics)
    if pool.empty:
        pool = final
    if len(search.metrics) > 1:
        pool = pool[pareto_front(pool[search.metrics].to_numpy(), search.modes)]
    order = pool[search.metric].sort_values(ascending=search.mode == "min")
    return pool.loc[order.index[0]]


def write_outputs(results: pd.DataFrame, search: Search, experiment: str) -> None:
    """results.csv, results.md, best.yaml and frontier.png into the experiment."""
    from pipeline.config import dump_yaml

    _write_bytes(experiment, "results.csv", results.to_csv(index=False).encode())
    _write_bytes(experiment, "results.md", results_markdown(results, search).encode())
    best = best_trial(results, search)
    assignment = {k: _plain(best[k]) for k in search.space}
    header = [
        f"# Best trial {best['trial']} of the tune experiment {experiment}",
        f"# {', '.join(f'{m}={_number(best[m])}' for m in search.metrics)} "
        f"after generation {int(best['generation'])}; searched values:",
        *(f"#   {k}: {_value(v)}" for k, v in assignment.items()),
        "# Run:  genloop run --config best.yaml",
    ]
    text = "\n".join(header) + "\n" + dump_yaml(resolve_config(search.base, assignment))
    _write_bytes(experiment, "best.yaml", text.encode())
    _write_bytes(experiment, "frontier.png", plot_frontier(results, search))


def results_markdown(results: pd.DataFrame, search: Search) -> str:
    """One row per trial and generation: the searched values and the key metrics."""
    columns = ["trial", "status", *search.space, "generation"]
    columns += [
        m for m in (*search.metrics, "accuracy", "perplexity", "labels_total") if m in results
    ]
    columns = list(dict.fromkeys(columns))
    return _markdown(results[columns])


def summary_text(results: pd.DataFrame, search: Search) -> str:
    """One row per trial: its values, `metric` per generation, status; best first."""
    wide = results.pivot(index="trial", columns="generation", values=search.metric)
    wide.columns = [f"gen {g}" for g in wide.columns]
    final = final_rows(results).set_index("trial")
    table = pd.concat([final[list(search.space)], wide, final[["status"]]], axis=1)
    order = final[search.metric].sort_values(ascending=search.mode == "min", na_position="last")
    table = table.loc[order.index].reset_index()
    return f"{search.metric} per generation (best first)\n\n" + _markdown(table)


def plot_frontier(results: pd.DataFrame, search: Search) -> bytes:
    """Each trial's final value against the searched numeric keys (PNG bytes).

    One metric: y = the metric after the trial's last generation, x = the first numeric
    searched key (real fraction if searched), colour = the second (the label budget if
    searched); hollow markers are trials stopped early. Several metrics: the first against
    the second, with the Pareto front drawn."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = final_rows(results)
    numeric = [
        k
        for k in search.space
        if pd.api.types.is_numeric_dtype(final[k]) and not pd.api.types.is_bool_dtype(final[k])
    ]
    numeric.sort(key=lambda k: FRONTIER_AXES.index(k) if k in FRONTIER_AXES else len(FRONTIER_AXES))
    categorical = [k for k in search.space if k not in numeric]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(search.metrics) > 1:
        x_name, y_name = search.metrics[1], search.metrics[0]
        x, y = final[x_name].to_numpy(float), final[y_name].to_numpy(float)
        ok = ~(np.isnan(x) | np.isnan(y))
        front = np.zeros(len(final), dtype=bool)
        front[ok] = pareto_front(np.c_[y[ok], x[ok]], [search.modes[0], search.modes[1]])
        ordered = np.argsort(x[front])
        ax.plot(x[front][ordered], y[front][ordered], "k--", lw=1, label="Pareto front")
        x_label, color_key = x_name, (numeric[0] if numeric else None)
    else:
        x_name = numeric[0] if numeric else None
        x = final[x_name].to_numpy(float) if x_name else np.arange(len(final), dtype=float)
        y = final[search.metric].to_numpy(float)
        x_label, y_name = (x_name or "trial"), search.metric
        color_key = numeric[1] if len(numeric) > 1 else None
    colors = final[color_key].to_numpy(float) if color_key else np.zeros(len(final))
    norm = matplotlib.colors.Normalize(float(np.nanmin(colors)), float(np.nanmax(colors)) + 1e-12)
    shapes = "osD^v<>ph*"
    groups = final[categorical[0]].astype(str) if categorical else pd.Series([""] * len(final))
    done = (final["status"] == "finished").to_numpy()
    mappable = None
    for i, value in enumerate(dict.fromkeys(groups)):
        name = f"{_short(categorical[0])}={value}" if categorical else ""
        for finished in (True, False):
            rows = (groups == value).to_numpy() & (done == finished)
            if not rows.any():
                continue
            label = name + ("" if finished else (", " if name else "") + "stopped early")
            if finished:  # filled, coloured by the colour key
                paint = dict(c=colors[rows], cmap="viridis", norm=norm)
            else:  # hollow: the value it had when it stopped
                paint = dict(facecolors="none", edgecolors=plt.cm.viridis(norm(colors[rows])))
            marker = shapes[i % len(shapes)]
            points = ax.scatter(
                x[rows], y[rows], marker=marker, s=60, label=label or "finished", **paint
            )
            mappable = points if finished else mappable
    if color_key and mappable is not None:
        fig.colorbar(mappable, ax=ax, label=color_key)
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{y_name} (last generation reached)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{len(final)} trials, up to generation {search.generations}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = [
        "| " + " | ".join(_value(v) for v in row) + " |" for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *rows]) + "\n"


def _value(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _number(value: Any) -> str:
    return "nan" if value is None else _value(value)


def _short(key: str) -> str:
    return key.split(".")[-1]


def _objective(search: Search) -> str:
    return ", ".join(f"{m} ({mode})" for m, mode in zip(search.metrics, search.modes))


def _echo(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------- storage


def _location(text: str) -> str:
    """A URI as given; a local path made absolute (Tune wants absolute paths)."""
    return text.rstrip("/") if "://" in text else str(Path(text).resolve())


def _name(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1]


def _parent(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[0]


def _filesystem(location: str):
    import pyarrow.fs

    if "://" not in location:
        return pyarrow.fs.LocalFileSystem(), location
    return pyarrow.fs.FileSystem.from_uri(location)


def _exists(location: str, name: str) -> bool:
    import pyarrow.fs

    fs, path = _filesystem(location)
    return fs.get_file_info(f"{path}/{name}").type != pyarrow.fs.FileType.NotFound


def _read_text(location: str, name: str) -> str:
    from pipeline.cli import UsageError

    if not _exists(location, name):
        raise UsageError(f"{location}: no {name} here, so no genloop tune experiment to resume")
    fs, path = _filesystem(location)
    with fs.open_input_stream(f"{path}/{name}") as f:
        return f.readall().decode()


def _read_spec(experiment: str) -> dict:
    """The experiment's tune.yaml, as `cmd_tune` wrote it.

    Raises:
        UsageError: there is none.
        ConfigError: it is damaged (not UTF-8 YAML with the sections genloop writes).
    """
    try:
        saved = yaml.safe_load(_read_text(experiment, SPEC_FILE))
    except (UnicodeDecodeError, yaml.YAMLError):
        saved = None
    sections = {"base": dict, "tune": dict, "runs_dir": str, "gen0_dir": (str, type(None))}
    if not isinstance(saved, dict) or not all(
        isinstance(saved.get(key), kind) for key, kind in sections.items()
    ):
        raise ConfigError(
            [
                f"{experiment}/{SPEC_FILE}: damaged; genloop tune writes it as YAML with "
                f"{', '.join(sections)}, and --resume needs it as written"
            ]
        )
    # Ray Tune resumes the search as it began: an edit would apply to some trials and to the
    # outputs (best.yaml), not to the rest. (Experiments from before the digest: trusted.)
    if "digest" in saved and saved["digest"] != _spec_digest(saved):
        raise ConfigError(
            [
                f"{experiment}/{SPEC_FILE}: edited since the experiment started, and --resume "
                "needs it as written; undo the edit, or start a new experiment with --config"
            ]
        )
    return saved


def _spec_digest(spec: dict) -> str:
    """A digest of tune.yaml's sections (not of its text: comments and layout may change)."""
    import hashlib

    sections = {key: value for key, value in spec.items() if key != "digest"}
    return hashlib.sha256(yaml.safe_dump(sections, sort_keys=True).encode()).hexdigest()


def _write_bytes(location: str, name: str, data: bytes) -> None:
    """Write `name` into the experiment: atomically on a local disk, through pyarrow else."""
    if "://" not in location:
        from pipeline.data import atomic_path

        with atomic_path(Path(location) / name) as tmp:
            Path(tmp).write_bytes(data)
        return
    fs, path = _filesystem(location)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{name}") as f:
        f.write(data)
