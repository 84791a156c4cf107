"""Train one generation: Ray Train `TorchTrainer` workers running DeepSpeed (ZeRO 0-3).

The driver reads the training mix as a Ray Dataset and splits it, one shard per worker; each
worker tokenizes its own shard's batches, trains `steps` optimizer steps, and rank 0 hands
the model back as a checkpoint (an HF directory: safetensors + tokenizer +
`train_state.json`). A worker that dies is replaced and training resumes from the newest
checkpoint.

Inside `kept_trainer()` (the loop holds one for a whole run) CPU training workers serve one
generation after another from a single `fit()` (`KeptTrainer`): a fresh fit spends 9-12 s
on this kind of machine before its first step. Elsewhere each call is a fit of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.config import TrainConfig
from pipeline.storage import filesystem, is_uri, localize

TRAIN_STATE = "train_state.json"


@dataclass
class TrainJob:
    """What one generation's training needs, as plain values a worker can receive."""

    init_model: str  # HF directory (or hub id) the generation starts from
    steps: int
    seed: int
    max_length: int
    add_eos: bool
    trust_remote_code: bool = False
    # Early stop (generation 0): evaluate greedy accuracy on these every `eval_every` steps.
    validation_prompts: list[str] = field(default_factory=list)
    validation_answers: list[str] = field(default_factory=list)
    target_accuracy: float | None = None
    answer_check: str = "exact"  # how an answer is compared (pipeline.tasks.answers_match)
    eval_every: int = 100
    max_new_tokens: int = 8
    # Consume the rows in the order of their `position` column, one batch after another,
    # instead of shuffled length-bucketed epochs: for a sampler's order (ClusterClip). Every
    # worker then reads the whole dataset and takes every world-size-th row of that order.
    in_order: bool = False


def deepspeed_config(cfg: TrainConfig, steps: int) -> dict:
    """The DeepSpeed JSON for one generation (fp32 + torch AdamW on CPU; bf16 on GPU)."""
    if cfg.schedule == "cosine":
        scheduler = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(steps, cfg.warmup_steps + 1),
                "warmup_num_steps": max(1, cfg.warmup_steps),
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": 0.1,
            },
        }
    elif cfg.warmup_steps == 0:
        scheduler = None  # constant learning rate from the first step
    else:
        scheduler = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": cfg.lr,
                "warmup_num_steps": cfg.warmup_steps,
                "warmup_type": "linear",
            },
        }
    zero: dict = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.deepspeed.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.batch_size // cfg.workers,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "weight_decay": cfg.weight_decay,
                "betas": [0.9, 0.95],
                "torch_adam": not cfg.use_gpu,
                # torch's fused CPU AdamW: one kernel over all parameters instead of a loop of
                # small ops (the default model's optimizer step: 2.4 ms -> 1.6 ms).
                **({} if cfg.use_gpu else {"fused": True}),
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if scheduler is not None:
        config["scheduler"] = scheduler
    if cfg.deepspeed.config_file:
        config = merge_deepspeed(config, json.loads(Path(cfg.deepspeed.config_file).read_text()))
    return config


def merge_deepspeed(base: dict, override: dict) -> dict:
    """A DeepSpeed JSON (`train.deepspeed.config_file`) over genloop's config: objects merged
    key by key, the file's value winning; "auto" keeps genloop's value."""
    merged = dict(base)
    for key, value in override.items():
        if value == "auto":
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_deepspeed(merged[key], value)
        else:
            merged[key] = value
    return merged


def train_generation(
    job: TrainJob,
    data: str | pd.DataFrame,
    storage_dir: str,
    cfg: TrainConfig,
    env: dict[str, str],
    model_dir: str | Path,
    *,
    cpus_per_worker: int | None = None,
) -> dict:
    """Fit one generation on `data` (a Parquet path, or rows already in memory), on the
    workers of `kept_trainer()` on CPUs inside one, else in a fit of its own. Checkpoints
    go under `storage_dir`/train (a path, or a storage URI); the newest one there, left by
    an earlier attempt, is where training resumes. The final model is copied into
    `model_dir`. Returns the training metrics. Each CPU worker gets `cpus_per_worker` CPUs
    and as many torch threads (None: its share of the cluster)."""
    from cluster.connect import cpus_per_worker as share
    from pipeline.inference import drop_passed_lease, frame_parts, release_workers

    # The kept inference workers' CPUs/GPUs are the training workers' now. The kept trainer
    # takes their CPU lease as it is; Ray Data's read tasks or a fit of its own need the CPUs.
    kept = _kept_trainer is not None and not cfg.use_gpu
    release_workers(pass_on=kept)
    if not kept or not isinstance(data, pd.DataFrame):
        drop_passed_lease()
    # One shard per worker, split here: Ray Train's own `datasets=` split would start a split
    # coordinator actor on every fit (2.5 s on 2 CPUs). An in-order job keeps the order
    # across workers: every worker reads all rows and takes its share of the order.
    columns = ["prompt", "response"] + (["position"] if job.in_order else [])
    if isinstance(data, pd.DataFrame):
        # Rows in memory are cut here and described in the driver (from_blocks): no Ray task,
        # not even from_pandas' metadata task, which starts a process (1.2-1.5 s) when the
        # cluster has no idle one.
        rows = data[columns].reset_index(drop=True)
        if job.in_order:
            shards = [ray.data.from_blocks([rows])] * cfg.workers
        else:
            shards = [ray.data.from_blocks([part]) for part in frame_parts(rows, cfg.workers)]
    else:
        dataset = ray.data.read_parquet(data, columns=columns).materialize()
        shards = [dataset] * cfg.workers if job.in_order else dataset.split(cfg.workers, equal=True)
    storage = storage_dir if is_uri(storage_dir) else str(Path(storage_dir).resolve())
    train_dir = f"{storage.rstrip('/')}/train"
    cpus_each = None if cfg.use_gpu else share(cfg.workers, cpus_per_worker)
    loop_config = {
        "job": asdict(job),
        "shards": shards,
        "ds_config": deepspeed_config(cfg, job.steps),
        "checkpoint_every": cfg.checkpoint_every,
        "env": env,
        "cpus_each": cpus_each,
    }
    if kept:
        final = _kept_trainer.train(
            dict(loop_config, train_dir=train_dir),
            workers=cfg.workers,
            cpus_each=cpus_each,
            max_failures=cfg.max_failures,
            env=env,
        )
        copy_checkpoint(final, model_dir)
        return json.loads((Path(model_dir) / TRAIN_STATE).read_text())
    # Kept workers look for the newest checkpoint themselves, at each attempt.
    loop_config["resume_from"] = latest_checkpoint(train_dir)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"GPU": 1} if cfg.use_gpu else {"CPU": cpus_each},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name="train",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (see {train_dir})")
    result.checkpoint.to_directory(str(model_dir))
    return json.loads((Path(model_dir) / TRAIN_STATE).read_text())


def latest_checkpoint(train_dir: str) -> str | None:
    """The newest checkpoint (path or URI) an earlier attempt of this generation left in
    `train_dir` (a path or a URI), if any: a killed driver's run continues from it."""
    found = _checkpoints(train_dir)
    return found[-1] if found else None


def _checkpoints(train_dir: str) -> list[str]:
    """The whole checkpoints in `train_dir` (those with a train state), oldest first."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(train_dir)
    selector = pafs.FileSelector(root, recursive=False, allow_not_found=True)
    found = []
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            state = fs.get_file_info(f"{info.path}/{TRAIN_STATE}")
            if state.type == pafs.FileType.File:
                found.append((state.mtime_ns or 0, info.base_name))
    return [f"{train_dir.rstrip('/')}/{name}" for _, name in sorted(found)]


def _filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a storage URI."""
    import pyarrow.fs as pafs

    if is_uri(path):
        return filesystem(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def store_checkpoint(directory: str, train_dir: str, step: int, keep: int = 2) -> str:
    """Copy a checkpoint directory into `train_dir` (a path or a URI) as a new
    `checkpoint_<step>_<time>`, its train state last: a copy cut short has no state and is
    never taken for a checkpoint. Keeps the newest `keep`; returns the new one's location."""
    import pyarrow.fs as pafs

    location = f"{train_dir.rstrip('/')}/checkpoint_{step:06d}_{time.time_ns()}"
    fs, root = _filesystem(location)
    fs.create_dir(root)
    entries = sorted(Path(directory).iterdir(), key=lambda entry: entry.name == TRAIN_STATE)
    for entry in entries:
        pafs.copy_files(str(entry.resolve()), f"{root}/{entry.name}", destination_filesystem=fs)
    for old in _checkpoints(train_dir)[:-keep]:
        fs.delete_dir(_filesystem(old)[1])
    return location


def copy_checkpoint(location: str, model_dir: str | Path) -> None:
    """A stored checkpoint (path or URI) copied into the directory `model_dir`."""
    shutil.copytree(localize(location), model_dir, dirs_exist_ok=True)


# --------------------------------------------------------------------------- kept trainer


class JobBoard:
    """Where a kept trainer's driver posts one training job at a time and its workers take
    it (a Ray actor). Rank 0 posts the job's result; a job with no config tells the workers
    to stop."""

    def __init__(self):
        self.job_id, self.job = 0, None
        self.results: dict[int, str] = {}
        self.changed = asyncio.Condition()

    async def post(self, job_id: int, job: dict | None) -> None:
        async with self.changed:
            self.job_id, self.job = job_id, job
            self.changed.notify_all()

    async def take(self, after: int) -> tuple[int, dict | None]:
        """The posted job once it is newer than `after` and not finished. A replaced
        worker (after=0) takes the job its group was working on."""
        async with self.changed:
            await self.changed.wait_for(
                lambda: self.job_id > after and self.job_id not in self.results
            )
            return self.job_id, self.job

    async def finish(self, job_id: int, result: str) -> None:
        async with self.changed:
            self.results[job_id] = result
            self.changed.notify_all()

    async def result(self, job_id: int) -> str:
        async with self.changed:
            await self.changed.wait_for(lambda: job_id in self.results)
            return self.results[job_id]


# What a kept trainer's worker holds: no CPU (a lease holds its CPUs while it trains), and
# 1 MiB of memory, because Ray needs a non-empty bundle.
_HOLDS_NO_CPU = {"CPU": 0, "memory": 1 << 20}


class KeptTrainer:
    """CPU training workers that serve one generation after another from one `fit()`.

    A fresh `TorchTrainer.fit()` spends 9-12 s on 2 CPUs before its first step: the
    controller, the worker processes, the process group, the imports of DeepSpeed and
    transformers. Here the workers of one fit take each generation's job from a `JobBoard`
    and start it in about a second.

    Like the kept inference workers, they hold no CPU between jobs: a lease (a placement
    group) holds each worker's CPUs on its node for the length of a job, so the inference
    stages between jobs get the CPUs. Each job writes its checkpoints itself, into the
    generation's `train` directory. A worker that dies ends the fit; `train` starts a new
    one, whose workers take the same job and resume from its newest checkpoint, up to
    `train.max_failures` times, as Ray Train would restart a fit of its own. Then it raises
    the fit's error.
    """

    def __init__(self, storage: str):
        self.storage = storage  # where Ray Train keeps the fit's own files
        self.settings: tuple | None = None
        self.nodes: list[str] = []  # each worker's node
        self.board = None
        self.fit_thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.jobs = 0
        self.busy = False  # a job is posted and its result not back
        self.fits = 0  # fits started: 1 for a run whose workers never died

    def train(
        self, loop_config: dict, *, workers: int, cpus_each: int, max_failures: int, env: dict
    ) -> str:
        """Run one job (`_train_job`'s config plus `train_dir`); returns the location of its
        final checkpoint. A fit that fails (a worker died) is replaced by a new one, on nodes
        that are alive, and the job resumes from its newest checkpoint: `max_failures` times."""
        from pipeline.inference import nodes_alive

        settings = (workers, cpus_each, tuple(sorted(env.items())))
        if self.board is not None and (settings != self.settings or not nodes_alive(self.nodes)):
            self.end()
        job = dict(loop_config, threads=max(1, int(cpus_each)))
        for attempt in range(max_failures + 1):
            try:
                return self._run(job, settings)
            except _FitFailed as failed:
                if attempt == max_failures:
                    raise failed.error from None
                print(
                    f"[train] the training workers failed ({failed.error}); new ones go on "
                    "from the newest checkpoint",
                    flush=True,
                )
        raise AssertionError("unreachable")

    def _run(self, job: dict, settings: tuple) -> str:
        from pipeline.inference import lease_cpus, lease_nodes, pass_lease, return_lease

        workers, cpus_each, _ = settings
        lease = lease_cpus(cpus_each, workers, self.nodes or None)
        done = False
        try:
            if self.board is None:
                self._start(settings, lease_nodes(lease, workers))
            self.jobs += 1
            self.busy = True
            try:
                ray.get(self.board.post.remote(self.jobs, job))
                result = self.board.result.remote(self.jobs)
                while True:
                    ready, _ = ray.wait([result], timeout=1.0)
                    if ready:
                        self.busy = False
                        final = ray.get(result)
                        done = True
                        return final
                    if not self.fit_thread.is_alive():
                        raise self.failure or RuntimeError("the training workers ended mid-job")
            except Exception as error:  # the fit failed, or the board's node is gone
                self.end()
                raise _FitFailed(error) from None
        finally:
            # A finished job passes its CPUs on to the next stage (evaluation); after a
            # failure they go back, their nodes may be gone.
            (pass_lease if done else return_lease)(lease)

    def _start(self, settings: tuple, nodes: list[str]) -> None:
        from pipeline.inference import NODE_ID_LABEL

        workers, _, env = settings
        # The board lives on the driver's node, which a run cannot outlive anyway.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.board = ray.remote(JobBoard).options(num_cpus=0, scheduling_strategy=here).remote()
        trainer = TorchTrainer(
            _serve_jobs,
            train_loop_config={"board": self.board, "env": dict(env)},
            scaling_config=ScalingConfig(
                num_workers=workers,
                resources_per_worker=_HOLDS_NO_CPU,
                label_selector=[{NODE_ID_LABEL: node} for node in nodes],
            ),
            torch_config=TorchConfig(backend="gloo"),
            # A failed fit ends: `train` starts the next one where the lease finds CPUs
            # (Ray Train's own restart would wait for the same nodes).
            run_config=RunConfig(
                name="trainer",
                storage_path=self.storage,
                failure_config=FailureConfig(max_failures=0),
            ),
        )

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as error:  # handed to the driver's waiting `train` call
                self.failure = error

        self.settings, self.nodes, self.failure = settings, nodes, None
        self.fits += 1
        self.fit_thread = threading.Thread(target=fit, name="genloop-kept-trainer", daemon=True)
        self.fit_thread.start()

    def end(self) -> None:
        """Stop the workers and the board. Idle workers end their fit; workers still on a
        job (the driver was interrupted) are not waited for: without the board their fit
        fails, or ends with Ray."""
        if self.board is None:
            return
        if ray.is_initialized():
            idle = self.fit_thread is not None and self.fit_thread.is_alive() and not self.busy
            if idle:
                self.board.post.remote(self.jobs + 1, None)
                self.fit_thread.join(timeout=10)  # an idle fit ends in about a second
            ray.kill(self.board)
        self.board, self.fit_thread, self.settings, self.nodes = None, None, None, []
        self.busy = False


class _FitFailed(Exception):
    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


# The trainer `kept_trainer()` holds open, if any.
_kept_trainer: KeptTrainer | None = None


@contextlib.contextmanager
def kept_trainer(storage: str | Path) -> Iterator[KeptTrainer]:
    """Inside the block, every CPU `train_generation` call runs on one `KeptTrainer` (the
    block's value), whose fit keeps its Ray Train files under `storage` (a path or a URI);
    the workers end with the block. Nested blocks share the outer trainer."""
    global _kept_trainer
    if _kept_trainer is not None:
        yield _kept_trainer
        return
    storage = str(storage) if is_uri(str(storage)) else str(Path(storage).resolve())
    _kept_trainer = KeptTrainer(storage)
    try:
        yield _kept_trainer
    finally:
        _kept_trainer.end()
        from pipeline.inference import drop_passed_lease

        drop_passed_lease()  # the last job's CPUs, if no stage took them
        _kept_trainer = None


# --------------------------------------------------------------------------- worker side


def _train_loop(config: dict) -> None:
    """Runs on every worker of a fit of its own: trains the job in `config`, handing each
    checkpoint to Ray Train."""
    from pipeline.inference import use_all_assigned_cpus

    _worker_setup(config["env"])
    use_all_assigned_cpus()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # this fit's workers were replaced: go on from their checkpoint
        resume_dir = checkpoint.to_directory()
    elif config["resume_from"]:  # an earlier attempt's (the driver was killed)
        resume_dir = localize(config["resume_from"])
    else:
        resume_dir = None
    _train_job(config, resume_dir, _hand_to_ray_train)


def _serve_jobs(config: dict) -> None:
    """Runs on every worker of a kept trainer's fit: takes one job after another from the
    board until a job with no config comes, each job storing its own checkpoints."""
    import torch

    _worker_setup(config["env"])
    board, rank = config["board"], ray.train.get_context().get_world_rank()
    done = 0
    while True:
        job_id, job_config = ray.get(board.take.remote(after=done))
        if job_config is None:
            return
        torch.set_num_threads(job_config["threads"])
        train_dir = job_config["train_dir"]
        # The newest checkpoint of an earlier attempt: the driver's, or these workers'
        # predecessors' if they died on this job.
        resume_from = latest_checkpoint(train_dir)
        final = _train_job(
            job_config,
            localize(resume_from) if resume_from else None,
            functools.partial(_store_in, train_dir),
        )
        if rank == 0:
            ray.get(board.finish.remote(job_id, final))
        done = job_id
        gc.collect()  # the job's engine and model, before the next job builds its own


def _worker_setup(env: dict[str, str]) -> None:
    os.environ.update(env)
    from pipeline.model import quiet_transformers

    quiet_transformers()


def _train_job(config: dict, resume_dir: str | None, hand_over) -> str | None:
    """Train one generation's job on this worker; returns what `hand_over` returned for the
    final checkpoint (see `_report`)."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from pipeline.gradients import GradientSync, offer_shared_memory, syncs_own_gradients
    from pipeline.model import context_length, generate, load_model, pad_examples

    job = TrainJob(**config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(job.seed)

    start_dir, state = job.init_model, {"step": 0, "log": [], "evals": []}
    if resume_dir:
        start_dir = resume_dir
        state = json.loads((Path(resume_dir) / TRAIN_STATE).read_text())
        state["resumed"] = state.get("resumed", []) + [state["step"]]  # for train.json
        if rank == 0:
            print(f"[train] resuming at step {state['step']} from {resume_dir}", flush=True)
    model, tokenizer = load_model(start_dir, trust_remote_code=job.trust_remote_code)
    max_length = min(job.max_length, context_length(model) or job.max_length)
    model.train()
    ds_config = config["ds_config"]
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    own_sync = syncs_own_gradients(ds_config, get_accelerator().device_name())
    if own_sync:  # genloop averages and clips (pipeline/gradients.py), not DeepSpeed
        if config["cpus_each"]:  # before DeepSpeed builds its communication backend
            offer_shared_memory(world, ctx.get_local_world_size(), config["cpus_each"])
        max_norm = ds_config.get("gradient_clipping", 0.0)
        ds_config = dict(ds_config, gradient_clipping=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config
    )
    sync_gradients = None
    if own_sync:
        engine.enable_backward_allreduce = False
        sync_gradients = GradientSync(params, world, rank, max_norm)
    state["gradient_sync"] = sync_gradients.method if sync_gradients else "deepspeed"
    # Put the LR schedule where it was when the checkpoint was written.
    for _ in range(state["step"] if scheduler is not None else 0):
        scheduler.step()

    micro_batch = ds_config["train_micro_batch_size_per_gpu"]
    # This worker's shard, tokenized once: every epoch reuses it.
    rows = _tokenized_shard(config["shards"][rank], tokenizer, max_length, job)
    if job.in_order:  # every worker has all rows: take this worker's share of the order
        rows = rows[rank::world]
    if len(rows) < micro_batch:
        raise RuntimeError("the training mix is smaller than one batch per worker")
    lengths = np.array([len(ids) for ids, _ in rows])
    step, tokens, started = state["step"], 0, time.perf_counter()
    done, final_checkpoint = step >= job.steps, None
    if done:
        # Resumed from a checkpoint that had already finished (the driver died after fit):
        # hand it back again so that this run, too, ends with a checkpoint.
        final_checkpoint = _report(engine, tokenizer, state, rank, zero3, True, hand_over)
    losses: list[float] = []
    epoch = 0
    while not done:
        if job.in_order:  # the shard is sorted by position: consecutive rows, no shuffle
            batches = consecutive_batches(len(rows), micro_batch)
        else:
            rng = np.random.default_rng([job.seed, epoch, step])
            batches = length_bucketed_batches(lengths, micro_batch, rng)
        for index in batches:
            enc = pad_examples([rows[i] for i in index], tokenizer.pad_token_id)
            out = engine(
                input_ids=torch.from_numpy(enc.input_ids).to(engine.device),
                attention_mask=torch.from_numpy(enc.attention_mask).to(engine.device),
                labels=torch.from_numpy(enc.labels).to(engine.device),
            )
            engine.backward(out.loss)
            if sync_gradients is not None:
                sync_gradients()
            engine.step()
            step += 1
            tokens += int(enc.attention_mask.sum())
            losses.append(out.loss.item())
            if step % 50 == 0 or step == job.steps:
                state["log"].append({"step": step, "loss": float(np.mean(losses[-50:]))})
            if job.target_accuracy is not None and step % job.eval_every == 0:
                accuracy = _accuracy(engine.module, tokenizer, job, zero3, generate)
                state["evals"].append({"step": step, "accuracy": accuracy})
                if accuracy >= job.target_accuracy:
                    state["stopped_early"] = step
                    done = True
            if step >= job.steps:
                done = True
            every = config["checkpoint_every"]
            if done or (every and step % every == 0):
                state["step"] = step
                # The last one, when done, is the final checkpoint.
                final_checkpoint = _report(engine, tokenizer, state, rank, zero3, done, hand_over)
            if done:
                break
        epoch += 1
    elapsed = time.perf_counter() - started
    # Throughput across workers, for the run's logs (rank 0 wrote the final checkpoint).
    total = torch.tensor([tokens], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)
    if rank == 0:
        print(
            f"[train] {step} steps, {int(total.item())} tokens in {elapsed:.1f}s "
            f"({total.item() / max(elapsed, 1e-9):,.0f} tokens/s)",
            flush=True,
        )
    return final_checkpoint


def _tokenized_shard(shard, tokenizer, max_length: int, job: TrainJob) -> list:
    """Every (prompt, response) row of a worker's dataset shard as token ids
    (`model.tokenize_examples`), read and tokenized once; sorted by `position` for an
    in-order job."""
    from pipeline.model import tokenize_examples

    rows, positions = [], []
    for batch in shard.iter_batches(batch_size=4096, batch_format="numpy"):
        rows += tokenize_examples(
            tokenizer,
            batch["prompt"],
            batch["response"],
            max_length=max_length,
            add_eos=job.add_eos,
        )
        if job.in_order:
            positions.append(batch["position"])
    if job.in_order and rows:
        rows = [rows[i] for i in np.argsort(np.concatenate(positions), kind="stable")]
    return rows


def consecutive_batches(n_rows: int, batch_size: int) -> list[np.ndarray]:
    """Rows 0..n_rows-1 in order, `batch_size` at a time; a last partial batch is dropped."""
    return [np.arange(lo, lo + batch_size) for lo in range(0, n_rows - batch_size + 1, batch_size)]


def length_bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """One epoch of batches of row indices, each `batch_size` rows of similar length.

    The rows are shuffled. They are then sorted by length within windows of 64 batches, so a
    batch carries little padding, and the batches are shuffled again. The last partial batch
    (random rows each epoch) is dropped, so every worker steps the same number of times.
    """
    order = rng.permutation(len(lengths))
    order = order[: len(order) // batch_size * batch_size]
    window = 64 * batch_size
    batches = []
    for lo in range(0, len(order), window):
        chunk = order[lo : lo + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _accuracy(module, tokenizer, job: TrainJob, zero3: bool, generate) -> float:
    module.eval()
    answers = generate(
        module,
        tokenizer,
        job.validation_prompts,
        samples_per_prompt=1,
        max_new_tokens=job.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        greedy=True,
        batch_size=512,
        max_length=job.max_length,
        synced_gpus=zero3,
    )
    module.train()
    from pipeline.tasks import answers_match

    correct = answers_match(answers, job.validation_answers, job.answer_check).sum()
    return float(correct) / max(1, len(answers))


def _report(
    engine, tokenizer, state: dict, rank: int, zero3: bool, final: bool, hand_over
) -> str | None:
    """Every rank calls this; rank 0 writes the HF checkpoint. Every rank then calls
    `hand_over(directory, step)`, with the directory on rank 0 and None elsewhere; returns
    what it returned."""
    import deepspeed

    from pipeline.model import save_model

    module = engine.module
    with tempfile.TemporaryDirectory() as directory:
        if zero3:
            # Parameters are partitioned: gather them (all ranks take part), rank 0 saves.
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                if rank == 0:
                    save_model(module, tokenizer, directory)
        elif rank == 0:
            save_model(module, tokenizer, directory)
        if rank == 0:
            state = dict(state, final=final, time=time.time())
            (Path(directory) / TRAIN_STATE).write_text(json.dumps(state))
        return hand_over(directory if rank == 0 else None, state["step"])


def _hand_to_ray_train(directory: str | None, step: int) -> None:
    """A fit of its own: Ray Train stores the checkpoint (every rank reports)."""
    checkpoint = None if directory is None else ray.train.Checkpoint.from_directory(directory)
    ray.train.report({"step": step}, checkpoint=checkpoint)


def _store_in(train_dir: str, directory: str | None, step: int) -> str | None:
    """A kept trainer's job: rank 0 stores the checkpoint itself (`store_checkpoint`)."""
    return None if directory is None else store_checkpoint(directory, train_dir, step)
