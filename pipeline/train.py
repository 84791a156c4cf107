"""Train one generation: Ray Train `TorchTrainer` workers running DeepSpeed (ZeRO 0-3).

The driver reads the training mix as a Ray Dataset and splits it, one shard per worker; each
worker tokenizes its own shard's batches, trains `steps` optimizer steps, and rank 0 hands
the model back as a Ray Train checkpoint (an HF directory: safetensors + tokenizer +
`train_state.json`). A worker that dies is replaced and training resumes from the last
checkpoint (`FailureConfig`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

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
    """Fit one generation on `data` (a Parquet path, or rows already in memory); Ray Train
    keeps its checkpoints under `storage_dir`/train (a path, or a storage URI). The final
    model is copied into `model_dir`. Returns the training metrics. Each CPU worker gets
    `cpus_per_worker` CPUs and as many torch threads (None: its share of the cluster)."""
    from cluster.connect import cpus_per_worker as share
    from pipeline.inference import frame_parts, release_workers

    release_workers()  # the kept inference workers' CPUs/GPUs are the training workers' now
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
    loop_config = {
        "job": asdict(job),
        "shards": shards,
        "ds_config": deepspeed_config(cfg, job.steps),
        "checkpoint_every": cfg.checkpoint_every,
        "env": env,
        "resume_from": latest_checkpoint(f"{storage.rstrip('/')}/train"),
    }
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=(
                {"GPU": 1} if cfg.use_gpu else {"CPU": share(cfg.workers, cpus_per_worker)}
            ),
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
        raise RuntimeError(f"training finished without a checkpoint (see {storage}/train)")
    result.checkpoint.to_directory(str(model_dir))
    return json.loads((Path(model_dir) / TRAIN_STATE).read_text())


def latest_checkpoint(train_dir: str) -> str | None:
    """The newest checkpoint (path or URI) an earlier attempt of this generation left in
    `train_dir` (a path or a URI), if any: a killed driver's run continues from it."""
    import pyarrow.fs as pafs

    if is_uri(train_dir):
        fs, root = filesystem(train_dir)
    else:
        fs, root = pafs.LocalFileSystem(), str(Path(train_dir).resolve())
    selector = pafs.FileSelector(root, recursive=False, allow_not_found=True)
    found = []
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            state = fs.get_file_info(f"{info.path}/{TRAIN_STATE}")
            if state.type == pafs.FileType.File:
                found.append((state.mtime_ns or 0, info.base_name))
    if not found:
        return None
    return f"{train_dir.rstrip('/')}/{max(found)[1]}"


# --------------------------------------------------------------------------- worker side


def _train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    os.environ.update(config["env"])
    import deepspeed
    import torch
    import torch.distributed as dist

    from pipeline.inference import _quiet_transformers, use_all_assigned_cpus
    from pipeline.model import context_length, generate, load_model, pad_examples

    _quiet_transformers()
    use_all_assigned_cpus()
    job = TrainJob(**config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(job.seed)

    start_dir, state = job.init_model, {"step": 0, "log": [], "evals": []}
    checkpoint = ray.train.get_checkpoint()
    resume_dir = None
    if checkpoint is not None:
        resume_dir = checkpoint.to_directory()
    elif config["resume_from"]:
        resume_dir = localize(config["resume_from"])
    if resume_dir:
        start_dir = resume_dir
        state = json.loads((Path(resume_dir) / TRAIN_STATE).read_text())
        if rank == 0:
            print(f"[train] resuming at step {state['step']} from {resume_dir}", flush=True)
    model, tokenizer = load_model(start_dir, trust_remote_code=job.trust_remote_code)
    max_length = min(job.max_length, context_length(model) or job.max_length)
    model.train()
    ds_config = config["ds_config"]
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
    )
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
    done = step >= job.steps
    if done:
        # Resumed from a checkpoint that had already finished (the driver died after fit):
        # hand it back again so that this run, too, ends with a checkpoint.
        _report(engine, tokenizer, state, rank, zero3, final=True)
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
            engine.step()
            step += 1
            tokens += int(enc.attention_mask.sum())
            losses.append(float(out.loss))
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
                _report(engine, tokenizer, state, rank, zero3, final=done)
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
    correct = sum(a.strip() == b.strip() for a, b in zip(answers, job.validation_answers))
    return correct / max(1, len(answers))


def _report(engine, tokenizer, state: dict, rank: int, zero3: bool, final: bool) -> None:
    """Every rank calls this; rank 0 writes the HF checkpoint and hands it to Ray Train."""
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
        checkpoint = None
        if rank == 0:
            state = dict(state, final=final, time=time.time())
            (Path(directory) / TRAIN_STATE).write_text(json.dumps(state))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({"step": state["step"]}, checkpoint=checkpoint)
