"""The recipe: one generation after another, in the order the work happens.

    generation 0:  train the base model on the seed (real) data -> evaluate
    generation g:  generate -> score -> curate [-> select] -> mix -> train -> evaluate [-> guard]

Every stage writes its artefacts atomically into `RUN_DIR/gen_XX/` and then a completion
marker (`gen_XX/.done/<stage>`, which records the size of each file the stage wrote); a resumed
run loads finished stages instead of redoing them, once it has checked that their files are
still there.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import RunConfig, dump_yaml
from pipeline.curate import curate
from pipeline.data import DataError, atomic_dir, write_json, write_parquet, write_text
from pipeline.metrics import collapse_signals, perplexity
from pipeline.mix import composition, mix
from pipeline.storage import RemoteRun, is_uri, localize
from pipeline.tasks import Task, make_task
from pipeline.tracking import Tracker
from selection.selectors import required_features

# Random streams, so that every stage's randomness is fixed by (seed, stream, generation),
# whatever ran before it: a resumed stage draws exactly what the first attempt drew.
_CURATE_STREAM, _MIX_STREAM, _EMBED_STREAM, _GENERATE_STREAM, _EVAL_STREAM = 11, 12, 13, 14, 15

# What the evaluate stage writes (gen_XX/mix_embeddings.parquet is a cache, made again if gone).
EVALUATE_OUTPUTS = (
    "eval.parquet",
    "metrics.json",
    "diagnostics.parquet",
    "diagnostics_vs_gen0.parquet",
)


@dataclass
class Progress:
    """Prints one line per stage: what ran, how much, how long."""

    total_generations: int
    echo: Callable[[str], None] = print

    def stage(self, generation: int, name: str, detail: str, seconds: float | None) -> None:
        timing = f"{seconds:6.1f}s" if seconds is not None else "  (done earlier)"
        self.echo(f"[gen {generation}/{self.total_generations}] {name:<9} {timing}  {detail}")


@dataclass
class Generation:
    """Paths and completion markers of one generation's directory."""

    root: Path
    index: int
    remote: RemoteRun | None = None  # a run at a URI: `root` is its local mirror

    @property
    def dir(self) -> Path:
        return self.root / f"gen_{self.index:02d}"

    def path(self, name: str) -> Path:
        return self.dir / name

    def done(self, stage: str) -> bool:
        return (self.dir / ".done" / stage).exists()

    def mark(self, stage: str, outputs: Iterable[str] = ()) -> None:
        """Mark `stage` finished, recording the size of each file of its `outputs` (names in
        this generation's directory; a directory counts file by file) that exists."""
        files = {}
        for name in outputs:
            path = self.path(name)
            for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if file.is_file():
                    files[file.relative_to(self.dir).as_posix()] = file.stat().st_size
        write_json({"finished": time.time(), "outputs": files}, self.dir / ".done" / stage)
        if self.remote is not None:
            self.remote.push()

    def check_finished(self, stage: str) -> None:
        """A finished `stage` must still have every file its marker recorded, at the recorded
        size (markers of runs before genloop recorded files have nothing to check).

        Raises:
            DataError: naming the first file that is missing or changed.
        """
        marker = self.dir / ".done" / stage
        try:
            recorded = json.loads(marker.read_text())["outputs"]
        except (ValueError, TypeError, KeyError, OSError):
            return
        for name, size in recorded.items():
            path = self.dir / name
            now = path.stat().st_size if path.is_file() else None
            if now == size:
                continue
            problem = (
                "missing" if now is None else f"{now:,} bytes, not the {size:,} it was written with"
            )
            raise DataError(
                f"{path}: {problem}, yet {marker.relative_to(self.root)} says the {stage} "
                f"stage finished; restore the file, or delete {self.dir} and the generations "
                "after it to redo them"
            )

    def ref(self, name: str | None = None) -> str:
        """How Ray workers find an artefact of this generation (or, without a name, the
        generation's directory): its path, or for a remote run its URI (workers on other
        nodes cannot see the driver's mirror)."""
        path = self.dir if name is None else self.path(name)
        return self.remote.uri_of(path) if self.remote is not None else str(path)


def check_finished_stages(run_dir: Path) -> None:
    """Every finished stage of every generation in `run_dir` still has its files (see
    `Generation.check_finished`); `genloop run --resume` checks this before Ray starts.

    Raises:
        DataError: naming the first file that is missing or changed.
    """
    for directory in sorted(run_dir.glob("gen_*")):
        index = directory.name.removeprefix("gen_")
        gen = Generation(run_dir, int(index)) if index.isdigit() else None
        if gen is None or gen.dir != directory or not (directory / ".done").is_dir():
            continue
        for marker in sorted((directory / ".done").iterdir()):
            gen.check_finished(marker.name)


def check_same_settings(run_dir: Path, cfg: RunConfig) -> None:
    """A directory that already holds a run continues only with the settings it ran with: its
    finished stages would otherwise be loaded as if computed with `cfg`. Ray's settings may
    change, and loop.generations may grow. Nothing to check where no run is yet.

    Raises:
        DataError: naming the directory and the first setting that changed.
    """
    from pipeline.config import ConfigError, first_change, flatten, load_config

    saved, record = run_dir / "config.yaml", run_dir / SETTINGS_RECORD
    # The record, not config.yaml, says what the run ran with: `--resume` reads config.yaml,
    # so an edit there would otherwise pass for the run's own settings. Runs from before the
    # record have only config.yaml.
    ran_with = record if record.is_file() else saved
    if not ran_with.is_file():
        return
    try:
        before = flatten(load_config(ran_with))
    except ConfigError:
        raise DataError(f"{ran_with}: unreadable; delete {run_dir} to run it again") from None
    change = first_change(
        before,
        flatten(cfg),
        lambda key, old, new: key.startswith("ray.") or (key == "loop.generations" and new > old),
    )
    if change:
        key, old, new = change
        edited = ran_with == record and _setting(saved, key) == new
        raise DataError(
            f"{run_dir} ran with {key}={old}, not {new}; "
            + (
                f"its config.yaml was edited since: put back {key}: {old}"
                if edited
                else "continue it with its own settings, or use a new directory"
            )
        )


# What a run last ran with, beside config.yaml (the copy to read); `check_same_settings`.
SETTINGS_RECORD = ".settings.yaml"


def _setting(config_file: Path, key: str):
    """One dotted setting of a config file, None where the file or the key cannot be read."""
    from pipeline.config import ConfigError, flatten, load_config

    try:
        return flatten(load_config(config_file)).get(key)
    except (ConfigError, OSError):
        return None


def run_loop(
    cfg: RunConfig,
    run_dir: str | Path | RemoteRun,
    progress: Progress,
    log_to_driver: bool = False,
    on_generation: Callable[[dict], None] | None = None,
) -> pd.DataFrame:
    """Run (or resume) every generation; returns the per-generation metrics table.

    `on_generation` gets each generation's summary row (see `summary_row`) as soon as the
    generation is evaluated, also for generations a resumed run loads from disk.
    `run_dir` may be a storage URI (see `pipeline.storage`): the loop then works in a local
    mirror and pushes every finished stage to the URI.
    """
    import ray

    from cluster.connect import check_local_fit, connect
    from pipeline.inference import kept_workers, quiet_logs, worker_env
    from pipeline.train import kept_trainer

    remote = run_dir if isinstance(run_dir, RemoteRun) else None
    if remote is None and is_uri(run_dir):
        remote = RemoteRun(str(run_dir))
    if remote is not None and not remote.pulled:
        remote.pull()
    # Ray workers do not share the driver's working directory: every path they get is absolute.
    run_dir = (remote.local if remote is not None else Path(run_dir)).resolve()
    check_same_settings(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(run_dir)
    settings = dump_yaml(cfg)
    write_text(settings, run_dir / "config.yaml")
    write_text(settings, run_dir / SETTINGS_RECORD)
    task = make_task(cfg.task, cfg.seed)
    if not ray.is_initialized():  # compare, tune and bench connect once for all their runs
        progress.echo(
            connect(
                cfg.ray.address,
                num_cpus=cfg.ray.num_cpus,
                env=worker_env(),
                log_to_driver=log_to_driver,
            )
        )
    if not cfg.train.use_gpu:
        check_local_fit(cpu_stages(cfg), cfg.ray.cpus_per_worker)
    quiet_logs()
    base = prepare_base_model(cfg, task, run_dir)
    if remote is not None:
        remote.push()
        if Path(base).is_relative_to(run_dir):
            base = remote.uri_of(base)
    tracker = Tracker(cfg, run_dir)

    rows = []
    model, previous = base, None
    # One pool of inference workers serves a generation's evaluation and the next generation's
    # sampling and scoring; training hands its CPUs/GPUs back in between. On CPUs one set of
    # training workers trains every generation, holding the CPUs only while it trains. The
    # inference pool ends first: a Tune trial that is stopped after a report holds its
    # inference workers' CPUs, and must hand them back before its actor goes.
    with kept_trainer(remote.uri if remote is not None else run_dir), kept_workers():
        for index in range(cfg.loop.generations + 1):
            model, metrics = run_generation(
                cfg, task, Generation(run_dir, index, remote), base, model, previous, progress
            )
            rows.append(summary_row(index, metrics))
            tracker.log(rows[-1])
            if on_generation is not None:
                on_generation(rows[-1])
            previous = metrics
            if metrics.get("guard", {}).get("stopped"):
                reason = metrics["guard"]["reason"]
                progress.echo(f"[gen {index}] guard: stopping the loop ({reason})")
                break
    table = pd.DataFrame(rows)
    write_parquet(table, run_dir / "metrics.parquet")
    write_text(table.to_csv(index=False), run_dir / "metrics.csv")
    from pipeline.report import plot_metrics

    name = remote.uri.rpartition("/")[2] if remote is not None else run_dir.name
    plot_metrics(table, run_dir / "metrics.png", title=f"{cfg.task.name}: {name}")
    tracker.close()
    if remote is not None:
        remote.push()
    return table


def run_generation(
    cfg: RunConfig,
    task: Task,
    gen: Generation,
    base: str,
    model: str,
    previous: dict | None,
    progress: Progress,
) -> tuple[str, dict]:
    """One generation: its training set, the next model, its evaluation, the guard's verdict.

    With `guard.action=rollback`, a generation that makes held-out data worse is set aside
    (moved to `gen_XX/attempt_K/`) and redone from the same curated samples with more real
    data, at most `guard.max_retries` times.
    """
    if gen.index == 0:
        _stage(
            gen,
            "mix",
            progress,
            lambda: _seed_mix(task, gen),
            load=lambda: _read_mix(gen),
            describe=_describe_mix,
            outputs=("mix.parquet",),
        )
    else:
        curate_samples_stage(cfg, task, gen, model, progress)
        if cfg.select.method != "none":
            _stage(
                gen,
                "select",
                progress,
                lambda: select_stage(cfg, task, gen, model),
                load=lambda: json.loads(gen.path("selection.json").read_text()),
                describe=_describe_selection,
                outputs=("selection.json", "selected.parquet", "selected_real.parquet"),
            )
    init = base if (gen.index == 0 or cfg.train.init_from == "base") else model
    while True:
        attempt = len(list(gen.dir.glob("attempt_*")))
        mix_cfg = replace(
            cfg.mix,
            real_fraction=min(
                1.0, cfg.mix.real_fraction + attempt * cfg.guard.rollback_real_fraction_step
            ),
        )
        if gen.index > 0:
            _stage(
                gen,
                "mix",
                progress,
                lambda: mix_stage(cfg, task, gen, mix_cfg),
                load=lambda: _read_mix(gen),
                describe=_describe_mix,
                outputs=("mix.parquet",),
            )
        new_model = _stage(
            gen,
            "train",
            progress,
            lambda: train_stage(cfg, task, gen, init, _read_mix(gen)),
            load=lambda: gen.ref("model"),
            describe=_describe_train(gen),
            outputs=("model", "train.json"),
        )
        metrics = _stage(
            gen,
            "evaluate",
            progress,
            lambda: evaluate_stage(cfg, task, gen, new_model, previous, attempt),
            load=lambda: json.loads(gen.path("metrics.json").read_text()),
            describe=_describe_eval,
            outputs=EVALUATE_OUTPUTS,
        )
        verdict = metrics.get("guard", {})
        if not verdict.get("worse"):
            return new_model, metrics
        progress.echo(f"[gen {gen.index}] guard: {verdict['reason']}")
        if cfg.guard.action != "rollback" or attempt >= cfg.guard.max_retries:
            return new_model, metrics
        _set_aside(gen, attempt)
        retry_fraction = min(1.0, mix_cfg.real_fraction + cfg.guard.rollback_real_fraction_step)
        progress.echo(
            f"[gen {gen.index}] guard: rolled back; retrying with "
            f"mix.real_fraction={retry_fraction:.2f}"
        )


def guard_verdict(cfg: RunConfig, task: Task, previous: dict | None, metrics: dict) -> dict:
    """Is this generation worse on held-out real data than the previous one?"""
    g = cfg.guard
    if g.action == "none" or previous is None:
        return {}
    metric = g.metric if g.metric != "auto" else ("accuracy" if task.verifiable else "perplexity")
    before, after = previous[metric], metrics[metric]
    if metric == "accuracy":
        worse = after < before - g.tolerance
        change = f"accuracy {before:.3f} -> {after:.3f}"
    else:
        worse = after > before * (1 + g.tolerance)
        change = f"perplexity {before:.3f} -> {after:.3f}"
    reason = f"{change}: {'worse than' if worse else 'within'} the tolerance of {g.tolerance}"
    return {
        "metric": metric,
        "before": before,
        "after": after,
        "worse": bool(worse),
        "action": g.action,
        "reason": reason,
        "stopped": bool(worse and g.action == "stop"),
    }


def _set_aside(gen: Generation, attempt: int) -> None:
    """Move a rejected attempt's mix, model and evaluation out of the way (kept for study)."""
    stages = ("mix", "train", "evaluate")
    names = (
        "mix.parquet",
        "mix_embeddings.parquet",
        "model",
        "train",
        "train.json",
        "eval.parquet",
        "metrics.json",
        "diagnostics.parquet",
        "diagnostics_vs_gen0.parquet",
    )
    if gen.remote is not None:  # markers first: the URI must never show a stage half gone
        for path in [gen.dir / ".done" / stage for stage in stages] + [gen.path(n) for n in names]:
            gen.remote.delete(path)
    target = gen.path(f"attempt_{attempt}")
    target.mkdir()
    for stage in stages:
        (gen.dir / ".done" / stage).unlink(missing_ok=True)
    for name in names:
        if gen.path(name).exists():
            shutil.move(str(gen.path(name)), str(target / name))
    if gen.remote is not None:
        gen.remote.push()


def curate_samples_stage(
    cfg: RunConfig, task: Task, gen: Generation, model: str, progress: Progress
) -> pd.DataFrame:
    """generate -> score -> curate, with the previous generation's model.

    The generating actors also score their own samples (same model, one pool and one model
    load per actor); the score stage then checks the answers. A run directory whose samples
    came without scores (an older genloop) gets them from a ScoreActor pool."""
    from pipeline.inference import GenerateAndScoreActor, ScoreActor, map_with_actors
    from pipeline.vllm_generation import generate_with_vllm, generation_backend

    pool = task.prompt_pool(gen.index)
    common = dict(
        model_dir=model, trust_remote_code=cfg.model.trust_remote_code, use_gpu=cfg.train.use_gpu
    )
    scoring = dict(add_eos=task.add_eos, train_on_prompt=task.train_on_prompt)

    def generate_samples() -> pd.DataFrame:
        g = cfg.generate
        if generation_backend(g.backend, cfg.train.use_gpu, model) == "vllm":
            # Ray Data's vLLM processor; the score stage scores these samples.
            samples = generate_with_vllm(
                pool,
                model,
                trust_remote_code=cfg.model.trust_remote_code,
                samples_per_prompt=g.samples_per_prompt,
                max_new_tokens=task.max_new_tokens,
                max_length=cfg.model.max_length,
                temperature=g.temperature,
                top_p=g.top_p,
                seed=[cfg.seed, _GENERATE_STREAM, gen.index],
                workers=g.workers,
                batch_size=g.batch_size,
            )
            write_parquet(samples, gen.path("samples.parquet"))
            return samples
        samples = map_with_actors(
            pool,
            GenerateAndScoreActor,
            workers=g.workers,
            cpus_per_worker=cfg.ray.cpus_per_worker,
            use_gpu=cfg.train.use_gpu,
            rows_per_batch=g.batch_size,
            constructor_kwargs=dict(
                common,
                samples_per_prompt=g.samples_per_prompt,
                max_new_tokens=task.max_new_tokens,
                temperature=g.temperature,
                top_p=g.top_p,
                batch_size=g.batch_size,
                max_length=cfg.model.max_length,
                score_batch_size=cfg.score.batch_size,
                seed=[cfg.seed, _GENERATE_STREAM, gen.index],
                **scoring,
            ),
        )
        write_parquet(samples, gen.path("samples.parquet"))
        return samples

    samples = _stage(
        gen,
        "generate",
        progress,
        generate_samples,
        load=lambda: pd.read_parquet(gen.path("samples.parquet")),
        describe=lambda s: f"{len(s):,} samples for {len(pool):,} prompts",
        outputs=("samples.parquet",),
    )

    def score_samples() -> pd.DataFrame:
        s = cfg.score
        scored = samples
        if "loss" not in samples.columns:
            scored = map_with_actors(
                samples,
                ScoreActor,
                workers=s.workers,
                cpus_per_worker=cfg.ray.cpus_per_worker,
                use_gpu=cfg.train.use_gpu,
                rows_per_batch=s.batch_size,
                constructor_kwargs=dict(
                    common, batch_size=s.batch_size, max_length=cfg.model.max_length, **scoring
                ),
            )
        scored = scored.assign(
            correct=task.verify(scored["response"].tolist(), scored["reference"].tolist())
        )
        write_parquet(scored, gen.path("scored.parquet"))
        return scored

    scored = _stage(
        gen,
        "score",
        progress,
        score_samples,
        load=lambda: pd.read_parquet(gen.path("scored.parquet")),
        describe=lambda s: (
            f"mean loss {s['loss'].mean():.3f}"
            + (f", {s['correct'].mean():.1%} correct" if task.verifiable else "")
        ),
        outputs=("scored.parquet",),
    )

    def curate_samples() -> dict:
        rng = np.random.default_rng([cfg.seed, _CURATE_STREAM, gen.index])
        result = curate(scored, pool, cfg.curate, task, rng)
        kept = result.samples[result.samples["kept"]]
        rows = task.synthetic_example(kept["prompt"], kept["response"]).assign(
            source="synthetic", loss=kept["loss"].to_numpy()
        )
        labels = result.labels
        label_rows = pd.DataFrame(
            {
                "prompt": np.repeat(labels["prompt"].to_numpy(), cfg.curate.label_repeats),
                "response": np.repeat(labels["response"].to_numpy(), cfg.curate.label_repeats),
                "source": "labeled",
                "loss": np.nan,
            }
        )
        curated = pd.concat([rows, label_rows], ignore_index=True).assign(
            origin_generation=gen.index
        )
        write_parquet(result.samples, gen.path("curated_samples.parquet"))
        write_parquet(labels, gen.path("labels.parquet"))
        write_parquet(curated, gen.path("curated.parquet"))
        write_json(result.stats, gen.path("curate.json"))
        return result.stats

    _stage(
        gen,
        "curate",
        progress,
        curate_samples,
        load=lambda: json.loads(gen.path("curate.json").read_text()),
        describe=lambda s: (
            f"kept {s['kept']:,}/{s['samples']:,}, "
            f"labels {s['labels_spent']:,} ({s['hard_prompts']:,} hard prompts)"
        ),
        outputs=("curated_samples.parquet", "labels.parquet", "curated.parquet", "curate.json"),
    )


def select_stage(cfg: RunConfig, task: Task, gen: Generation, model: str) -> dict:
    """Keep `select.budget` of the curated synthetic rows and/or of the real rows
    (`select.pool`), chosen by `select.method`.

    Synthetic rows' losses come from the score stage (under the current model); real rows
    are scored by `model` for the loss-* methods. Embeddings and S2L's loss trajectories are
    computed on Ray. Real rows are selected with the run's seed, so every generation keeps
    the same ones (copied from the previous generation when no loss under the current
    model is involved). Writes `selected.parquet` (curated rows kept, labels always),
    `selected_real.parquet` (with a real pool) and `selection.json`."""
    se = cfg.select
    curated = pd.read_parquet(gen.path("curated.parquet"))
    synthetic = curated[curated["source"] == "synthetic"].reset_index(drop=True)
    labeled = curated[curated["source"] != "synthetic"]
    summary: dict = {"method": se.method, "pool": se.pool}
    if se.pool in ("synthetic", "both"):
        chosen, part = _select_from(
            cfg, synthetic, gen.path("select_work"), seed=cfg.seed + gen.index
        )
        summary.update(part)
    else:
        chosen = synthetic
    write_parquet(pd.concat([chosen, labeled], ignore_index=True), gen.path("selected.parquet"))
    if se.pool in ("real", "both"):
        previous = Generation(gen.root, gen.index - 1).path("selected_real.parquet")
        if gen.index > 1 and previous.exists() and "losses" not in required_features(se.method):
            real = pd.read_parquet(previous)
            part = json.loads(
                Generation(gen.root, gen.index - 1).path("selection.json").read_text()
            )
            part = part.get("real", part)
        else:
            real, part = _select_from(
                cfg,
                task.real.reset_index(drop=True),
                gen.path("select_work_real"),
                seed=cfg.seed,
                model=model,
            )
        write_parquet(real, gen.path("selected_real.parquet"))
        if se.pool == "real":
            summary.update(part)
        else:
            summary["real"] = part
    write_json(summary, gen.path("selection.json"))
    return summary


def _select_from(
    cfg: RunConfig, rows: pd.DataFrame, work_dir, *, seed: int, model: str | None = None
) -> tuple[pd.DataFrame, dict]:
    """(`select.budget` of `rows` by `select.method`, what was done). Losses are the rows'
    `loss` column, or, without one, their scores under `model`."""
    from pipeline.select_cmd import SelectOptions, compute_features, select_rows, take_rows

    se = cfg.select
    budget = se.budget if se.budget < 1 else min(int(se.budget), len(rows))
    features: dict[str, np.ndarray] = {}
    needed = required_features(se.method)
    scored_here = "losses" in needed and "loss" not in rows.columns
    if "losses" in needed and not scored_here:
        features["losses"] = rows["loss"].to_numpy(dtype=float)
    if (needed - {"losses"} or scored_here) and len(rows):
        options = SelectOptions(
            checkpoints=se.proxy_checkpoints,
            steps=se.proxy_steps,
            workers=cfg.score.workers,
            cpus_per_worker=cfg.ray.cpus_per_worker,
            max_length=cfg.model.max_length,
            model=localize(model) if scored_here else None,
        )
        features.update(
            compute_features(rows, se.method, options, work_dir=work_dir, seed=cfg.seed)
        )
    params = {"n_clusters": se.n_clusters} if se.method in ("s2l", "clusterclip") else {}
    summary: dict = {"candidates": len(rows)}
    chosen = rows.iloc[:0].assign(cluster=0, selection_reason="")
    if len(rows):
        selection = select_rows(len(rows), se.method, budget, seed=seed, params=params, **features)
        chosen = take_rows(rows, selection)
        summary["cluster_sizes"] = {int(k): int(v) for k, v in selection.cluster_sizes.items()}
        summary["cluster_budget"] = {int(k): int(v) for k, v in selection.cluster_budget.items()}
    summary["selected"] = len(chosen)
    return chosen, summary


def _describe_selection(summary: dict) -> str:
    text = f"{summary['method']}: {summary['selected']:,} of {summary['candidates']:,} rows"
    if summary.get("pool") == "real":
        text += " (real)"
    if "real" in summary:
        real = summary["real"]
        text += f"; real {real['selected']:,} of {real['candidates']:,}"
    return text


def mix_stage(cfg: RunConfig, task: Task, gen: Generation, mix_cfg) -> pd.DataFrame:
    """Real data and this (and, accumulating, every earlier) generation's curated rows
    (after data selection, where a generation ran it)."""

    def curated(g: int) -> pd.DataFrame:
        directory = Generation(gen.root, g)
        selected = directory.path("selected.parquet")
        return pd.read_parquet(selected if selected.exists() else directory.path("curated.parquet"))

    synthetic = [curated(g) for g in range(1, gen.index + 1)]
    selected_real = gen.path("selected_real.parquet")
    real = pd.read_parquet(selected_real) if selected_real.exists() else task.real
    rng = np.random.default_rng([cfg.seed, _MIX_STREAM, gen.index])
    training_set = mix(real, synthetic, mix_cfg, rng)
    write_parquet(training_set, gen.path("mix.parquet"))
    return training_set


def train_stage(
    cfg: RunConfig, task: Task, gen: Generation, init_model: str, training_set: pd.DataFrame
) -> str:
    """Fine-tune from `init_model` on the generation's mix; the model lands in gen_XX/model."""
    from pipeline.inference import worker_env
    from pipeline.train import TrainJob, train_generation

    if len(training_set) == 0:
        # Curation or selection kept nothing and no real data is mixed in: the model carries
        # over, and the log line says why (a run of such generations looks stable, untrained).
        with atomic_dir(gen.path("model")) as tmp:
            shutil.copytree(localize(init_model), tmp, dirs_exist_ok=True)
        reason = (
            "empty training set: no curated sample reached the mix, and mix.real_fraction "
            "added no real rows; the previous model carries over"
        )
        write_json({"steps": 0, "skipped": reason}, gen.path("train.json"))
        return gen.ref("model")
    if len(training_set) < cfg.train.batch_size:
        # Fewer rows than one global batch (a filter that kept a handful): repeat them, so
        # that every data-parallel worker gets whole batches.
        copies = -(-cfg.train.batch_size // len(training_set))
        training_set = pd.concat([training_set] * copies, ignore_index=True)
    first = gen.index == 0
    job = TrainJob(
        init_model=init_model,
        steps=cfg.loop.gen0_steps if first else cfg.train.steps,
        seed=cfg.seed + gen.index,
        max_length=cfg.model.max_length,
        add_eos=task.add_eos,
        trust_remote_code=cfg.model.trust_remote_code,
        max_new_tokens=task.max_new_tokens,
    )
    if first and task.verifiable and cfg.loop.gen0_target_accuracy is not None:
        job.validation_prompts = task.validation["prompt"].tolist()
        job.validation_answers = task.validation["response"].tolist()
        job.target_accuracy = cfg.loop.gen0_target_accuracy
        job.answer_check = task.answer_check
        job.eval_every = cfg.loop.gen0_eval_every
    # Training checkpoints go to gen_XX/train, at the run's URI for a remote run.
    with atomic_dir(gen.path("model")) as tmp:
        state = train_generation(
            job,
            training_set,
            gen.ref(),
            cfg.train,
            worker_env(),
            tmp,
            cpus_per_worker=cfg.ray.cpus_per_worker,
        )
    write_json(state, gen.path("train.json"))
    return gen.ref("model")


def evaluate_stage(
    cfg: RunConfig,
    task: Task,
    gen: Generation,
    model: str,
    previous: dict | None = None,
    attempt: int = 0,
) -> dict:
    """Held-out real data: accuracy (verifiable tasks), perplexity, collapse signals, the
    per-token change against the previous generation, and the guard's verdict."""
    from pipeline.inference import EvalActor, map_with_actors

    e = cfg.eval
    rows = map_with_actors(
        task.heldout,
        EvalActor,
        workers=e.workers,
        cpus_per_worker=cfg.ray.cpus_per_worker,
        use_gpu=cfg.train.use_gpu,
        rows_per_batch=e.batch_size,
        constructor_kwargs=dict(
            model_dir=model,
            trust_remote_code=cfg.model.trust_remote_code,
            use_gpu=cfg.train.use_gpu,
            greedy=task.verifiable,
            max_new_tokens=task.max_new_tokens,
            temperature=e.sample_temperature,
            batch_size=e.batch_size,
            max_length=cfg.model.max_length,
            add_eos=task.add_eos,
            seed=[cfg.seed, _EVAL_STREAM, gen.index],
        ),
    )
    loss, ppl = perplexity(rows["loss_sum"].to_numpy(), rows["tokens"].to_numpy())
    metrics = {"generation": gen.index, "heldout_loss": loss, "perplexity": ppl}
    if task.verifiable:
        rows["correct"] = task.verify(rows["greedy"].tolist(), rows["response"].tolist())
        metrics["accuracy"] = float(rows["correct"].mean())
    metrics.update(collapse_signals(rows["sampled"].tolist()))
    for name in ("train.json", "curate.json"):
        if gen.path(name).exists():
            metrics[name.split(".")[0]] = json.loads(gen.path(name).read_text())
    metrics["mix"] = composition(pd.read_parquet(gen.path("mix.parquet"), columns=["source"]))
    write_parquet(rows, gen.path("eval.parquet"))
    if gen.index > 0:
        metrics["tokens"] = token_diagnostics(cfg, gen)
    if cfg.diagnostics.mix_embedding_rows > 0:
        metrics["mix_similarity"] = mix_similarity(cfg, gen)
    metrics["attempt"] = attempt
    metrics["guard"] = guard_verdict(cfg, task, previous, metrics)
    write_json(metrics, gen.path("metrics.json"))
    return metrics


def token_diagnostics(cfg: RunConfig, gen: Generation) -> dict:
    """Adaptation Odyssey's analysis: where on held-out tokens did the loss change, since the
    previous generation (`diagnostics.parquet`) and since generation 0
    (`diagnostics_vs_gen0.parquet`)?"""
    from pipeline.diagnostics import diagnose_generation

    def against(reference: int):
        return diagnose_generation(
            Generation(gen.root, reference).dir,
            gen.dir,
            trust_remote_code=cfg.model.trust_remote_code,
        )

    diagnosis = against(gen.index - 1)
    write_parquet(diagnosis.categories, gen.path("diagnostics.parquet"))
    categories = diagnosis.categories.set_index("category")
    result = {
        "mean_delta": categories["mean_delta"].to_dict(),
        "share_of_increase": categories["share_of_increase"].to_dict(),
        "top_risers": diagnosis.risers[["token", "delta_sum"]].to_dict("records"),
    }
    if gen.index > 1:
        since_start = against(0)
        write_parquet(since_start.categories, gen.path("diagnostics_vs_gen0.parquet"))
        result["mean_delta_vs_gen0"] = since_start.categories.set_index("category")[
            "mean_delta"
        ].to_dict()
    return result


def mix_similarity(cfg: RunConfig, gen: Generation) -> dict:
    """How far this generation's training mix has drifted from the real data (generation 0's
    mix) and from the previous generation's mix: mean-embedding cosine and MMD^2 (Gaussian
    kernel, bandwidth fixed by the median heuristic on the real data so generations compare).

    A sample of `diagnostics.mix_embedding_rows` rows per mix is embedded once and kept in
    `gen_XX/mix_embeddings.parquet`.
    """
    from pipeline.diagnostics import embedding_mmd, mean_embedding_cosine, median_bandwidth

    current = _mix_embeddings(cfg, gen)
    if gen.index == 0 or len(current) < 2:
        # Generation 0's mix is the real data itself, the reference for later mixes; a mix of
        # one row (a filter that kept almost nothing) has no distribution to compare.
        return {"rows": len(current)}
    real = _mix_embeddings(cfg, Generation(gen.root, 0))
    bandwidth = median_bandwidth(real, real)
    similarity = {
        "rows": len(current),
        "real_cosine": mean_embedding_cosine(current, real),
        "real_mmd": embedding_mmd(current, real, bandwidth=bandwidth),
    }
    previous = _mix_embeddings(cfg, Generation(gen.root, gen.index - 1))
    if len(previous) >= 2:
        similarity["previous_cosine"] = mean_embedding_cosine(current, previous)
        similarity["previous_mmd"] = embedding_mmd(current, previous, bandwidth=bandwidth)
    return similarity


# A mix sample up to this size is embedded in the driver by an encoder loaded once per run;
# a larger one on a Ray Data actor pool.
EMBED_HERE_MAX_ROWS = 4096


def _mix_embeddings(cfg: RunConfig, gen: Generation) -> np.ndarray:
    path = gen.path("mix_embeddings.parquet")
    if path.exists():
        return np.stack(pd.read_parquet(path)["embedding"].to_numpy())
    from pipeline.embed import embed_here, embed_texts

    frame = _read_mix(gen)
    if len(frame) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    rng = np.random.default_rng([cfg.seed, _EMBED_STREAM, gen.index])
    rows = np.sort(
        rng.choice(len(frame), min(len(frame), cfg.diagnostics.mix_embedding_rows), replace=False)
    )
    sample = frame.iloc[rows]
    texts = (sample["prompt"].fillna("") + sample["response"].fillna("")).tolist()
    if len(texts) <= EMBED_HERE_MAX_ROWS:
        embeddings = embed_here(texts, model=cfg.diagnostics.embedding_model)
    else:
        embeddings = embed_texts(
            texts,
            model=cfg.diagnostics.embedding_model,
            workers=cfg.score.workers,
            cpus_per_worker=cfg.ray.cpus_per_worker,
        )
    write_parquet(
        pd.DataFrame({"row": rows, "embedding": list(embeddings), "source": sample["source"]}),
        path,
    )
    return embeddings


# Keys generation 0 does not read: runs that differ only in these can share one generation 0
# (`copy_generation_zero`). Curation, mixing, the guard, selection and the training length
# act from generation 1 on.
GEN0_FREE = (
    "curate.",
    "mix.",
    "guard.",
    "select.",
    "generate.",
    "score.",
    "loop.generations",
    "train.steps",
    "train.init_from",
)


def copy_generation_zero(source: Path, run_dir: Path) -> bool:
    """Start `run_dir` from the finished generation 0 (and base model) of the run at `source`.

    Leaves out generation 0's Ray Train directory (later generations start from its model)
    and its `tracked` marker (each run sends generation 0 to its own trackers). A target left
    half-copied by an interrupted copy is replaced. Returns whether `run_dir` now has it.
    """
    if (run_dir / "gen_00" / ".done" / "evaluate").exists():
        return True
    if source == run_dir or not (source / "gen_00" / ".done" / "evaluate").exists():
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("gen_00", "base_model"):
        target = run_dir / name
        if (source / name).exists():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source / name, target, ignore=_without_train_dir_or_tracked)
    return True


def _without_train_dir_or_tracked(directory: str, names: list[str]) -> list[str]:
    here = Path(directory).name
    if here == "gen_00":
        return [name for name in names if name == "train"]
    return [name for name in names if name == "tracked" and here == ".done"]


def cpu_stages(cfg: RunConfig) -> dict[str, int]:
    """The workers of each stage of a CPU run, by config key: each stage must fit on its own."""
    return {
        "generate.workers": cfg.generate.workers,
        "score.workers": cfg.score.workers,
        "eval.workers": cfg.eval.workers,
        "train.workers": cfg.train.workers,
    }


def prepare_base_model(cfg: RunConfig, task: Task, run_dir: Path) -> str:
    """The model generation 0 starts from: the user's `model.path`, or a tiny GPT-2 built
    from config with a character tokenizer over the task's alphabet."""
    if cfg.model.path is not None:
        local = Path(cfg.model.path).expanduser()
        return str(local.resolve()) if local.exists() else cfg.model.path  # else a hub id
    target = run_dir / "base_model"
    if not (target / "config.json").exists():
        from pipeline.model import build_char_tokenizer, build_tiny_model, save_model

        tokenizer = build_char_tokenizer(task.alphabet)
        model = build_tiny_model(cfg.model, tokenizer, cfg.seed)
        with atomic_dir(target) as tmp:
            save_model(model, tokenizer, tmp)
    return str(target)


def summary_row(generation: int, metrics: dict) -> dict:
    """The key numbers of one generation, flat, for the run's table."""
    mix_counts = metrics.get("mix", {})
    stats = metrics.get("curate", {})
    return {
        "generation": generation,
        "accuracy": metrics.get("accuracy", float("nan")),
        "perplexity": metrics["perplexity"],
        "heldout_loss": metrics["heldout_loss"],
        "train_examples": sum(mix_counts.values()),
        "real": mix_counts.get("real", 0),
        "synthetic": mix_counts.get("synthetic", 0),
        "labeled": mix_counts.get("labeled", 0),
        "kept": stats.get("kept", 0),
        "dropped": stats.get("dropped", 0),
        "labels_spent": stats.get("labels_spent", 0),
        "sample_accuracy": stats.get("sample_accuracy", float("nan")),
        "filter_precision": stats.get("filter_precision", float("nan")),
        "hard_prompts": stats.get("hard_prompts", 0),
        "distinct_1": metrics["distinct_1"],
        "distinct_2": metrics["distinct_2"],
        "char_entropy": metrics["char_entropy"],
        "word_entropy": metrics["word_entropy"],
        "vocabulary": metrics["vocabulary"],
        "train_steps": metrics.get("train", {}).get("step", 0),
        "mix_real_cosine": metrics.get("mix_similarity", {}).get("real_cosine", float("nan")),
        "mix_real_mmd": metrics.get("mix_similarity", {}).get("real_mmd", float("nan")),
        "mix_previous_mmd": metrics.get("mix_similarity", {}).get("previous_mmd", float("nan")),
        "guard_worse": bool(metrics.get("guard", {}).get("worse", False)),
        "attempt": metrics.get("attempt", 0),
    }


def unrecorded_metric(metric: str, cfg: RunConfig) -> tuple[str, str] | None:
    """Why a run with `cfg` leaves the `metric` column of its table empty, as (the config
    key or section that decides it, the reason), or None where the run records it."""
    if metric in ("accuracy", "sample_accuracy", "filter_precision"):
        if not cfg.task.checks_answers:
            verifier = " task.verifier=none" if cfg.task.name == "pairs" else ""
            return "task.", f"task.name={cfg.task.name}{verifier} checks no answers"
    if metric == "filter_precision" and "filter" not in cfg.curate.strategy:
        return "curate.strategy", f"curate.strategy={cfg.curate.strategy} uses no filter"
    if metric.startswith("mix_") and cfg.diagnostics.mix_embedding_rows == 0:
        return "diagnostics.mix_embedding_rows", "diagnostics.mix_embedding_rows=0 embeds no mix"
    return None


# --------------------------------------------------------------------------- helpers


def _stage(
    gen: Generation,
    name: str,
    progress: Progress,
    compute: Callable,
    *,
    load: Callable,
    describe: Callable,
    outputs: tuple[str, ...],
):
    """Run `compute` unless the stage's marker says it finished before (and its `outputs`,
    the files it writes, are still there); then mark it done."""
    if gen.done(name):
        gen.check_finished(name)
        result = load()
        progress.stage(gen.index, name, describe(result), None)
        return result
    started = time.perf_counter()
    result = compute()
    gen.mark(name, outputs)
    progress.stage(gen.index, name, describe(result), time.perf_counter() - started)
    return result


def _seed_mix(task: Task, gen: Generation) -> pd.DataFrame:
    """Generation 0 trains on the real (seed) data alone."""
    training_set = task.real.assign(source="real", origin_generation=-1)
    write_parquet(training_set, gen.path("mix.parquet"))
    return training_set


def _read_mix(gen: Generation) -> pd.DataFrame:
    return pd.read_parquet(gen.path("mix.parquet"))


def _describe_mix(frame: pd.DataFrame) -> str:
    parts = ", ".join(f"{k} {v:,}" for k, v in composition(frame).items() if v)
    return f"{len(frame):,} examples" + (f" ({parts})" if parts else "")


def _describe_train(gen: Generation) -> Callable[[str], str]:
    def describe(_model: str) -> str:
        state = json.loads(gen.path("train.json").read_text())
        if state.get("skipped"):
            return f"skipped: {state['skipped']}"
        loss = state["log"][-1]["loss"] if state.get("log") else float("nan")
        early = (
            f", early stop at step {state['stopped_early']}" if state.get("stopped_early") else ""
        )
        return f"{state['step']} steps, final loss {loss:.3f}{early}"

    return describe


def _describe_eval(metrics: dict) -> str:
    parts = []
    if "accuracy" in metrics:
        parts.append(f"accuracy {metrics['accuracy']:.3f}")
    parts.append(f"perplexity {metrics['perplexity']:.3f}")
    parts.append(f"distinct-2 {metrics['distinct_2']:.3f}")
    return ", ".join(parts)


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Half-written files of a killed run (atomic writers' `.NAME.XXXX.tmp`) are deleted."""
    for stale in run_dir.rglob(".*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
