"""S2L loss trajectories: train a small proxy model, score every example at every checkpoint.

    proxy (a tiny GPT-2 from config, or a model you name)
      -> T training segments of `steps_per_checkpoint` steps (Ray Train + DeepSpeed),
         each continuing from the previous segment's checkpoint
      -> after each segment, every example's mean response-token loss (inference workers)
      -> an (N, T) matrix, also written to `work_dir/trajectories.parquet`

Why segments: `train_generation` keeps only the newest two checkpoints of a call, and S2L
needs all T. Each segment is one short `train_generation` call of its own, so each of its
final checkpoints survives. The model weights carry over exactly; the optimizer's moments
restart at each segment, and warm-up runs in the first segment only. The segments run on
kept workers (`kept_trainer`, `kept_workers`): one set of training workers and one of
scoring workers serve all T, instead of new ones for every segment.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import ModelConfig, TrainConfig
from pipeline.data import atomic_dir, write_json, write_parquet

MAX_LENGTH_CAP = 1024  # default longest prompt + response scored/trained, in tokens
ROWS_PER_ACTOR_BATCH = 512  # rows Ray Data hands a scoring actor at once


def column_name(checkpoint: int) -> str:
    """Column of the trajectory Parquet holding checkpoint `checkpoint`'s losses."""
    return f"loss_ckpt_{checkpoint:02d}"


def covering_length(tokenizer, prompts, responses, *, cap: int, add_eos: bool) -> int:
    """Tokens needed by the longest (start + prompt + response [+ eos]) row, at most `cap`."""
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    longest = max((len(p) + len(r) for p, r in zip(prompt_ids, response_ids)), default=1)
    return int(min(cap, longest + 1 + int(add_eos)))


def prepare_proxy(
    frame: pd.DataFrame,
    proxy_model: str | None,
    model_cfg: ModelConfig,
    directory: Path,
    *,
    max_length: int | None,
    add_eos: bool,
    seed: int,
) -> tuple[str, int]:
    """The proxy's starting point and the token length that covers the data.

    With `proxy_model` None: a tiny GPT-2 from `model_cfg` with a character tokenizer over
    the data's alphabet, saved in `directory`. Otherwise `proxy_model` itself (a directory or
    hub id), with a length capped by its position embeddings.

    Returns:
        (model directory or id, max_length in tokens); longer rows are truncated.
    """
    prompts, responses = frame["prompt"].tolist(), frame["response"].tolist()
    cap = max_length or MAX_LENGTH_CAP
    if proxy_model is None:
        from pipeline.model import build_char_tokenizer, build_tiny_model, save_model

        alphabet = "".join(sorted(set("".join(prompts)) | set("".join(responses))))
        tokenizer = build_char_tokenizer(alphabet)
        length = covering_length(tokenizer, prompts, responses, cap=cap, add_eos=add_eos)
        model = build_tiny_model(dataclasses.replace(model_cfg, max_length=length), tokenizer, seed)
        with atomic_dir(directory) as tmp:
            save_model(model, tokenizer, tmp)
        return str(directory), length
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        proxy_model, trust_remote_code=model_cfg.trust_remote_code
    )
    config = AutoConfig.from_pretrained(proxy_model, trust_remote_code=model_cfg.trust_remote_code)
    positions = getattr(config, "n_positions", None) or getattr(
        config, "max_position_embeddings", None
    )
    if positions:
        cap = min(cap, int(positions))
    return proxy_model, covering_length(tokenizer, prompts, responses, cap=cap, add_eos=add_eos)


def score_losses(
    frame: pd.DataFrame,
    model_dir: str,
    *,
    workers: int,
    batch_size: int,
    max_length: int,
    add_eos: bool = True,
    use_gpu: bool = False,
    trust_remote_code: bool = False,
    cpus_per_worker: int | None = None,
) -> np.ndarray:
    """(N,) mean response-token loss of each (prompt, response) row under one model.

    Runs `ScoreActor` on `workers` inference workers (`map_with_actors`). Rows longer than
    `max_length` lose the start of the prompt first (`model.encode_examples`); NaN for an
    empty response.
    """
    from pipeline.inference import ScoreActor, map_with_actors

    # Rows of similar length share a batch, so little of each batch is padding.
    lengths = (frame["prompt"].str.len() + frame["response"].str.len()).to_numpy()
    order = np.argsort(lengths, kind="stable")
    scored = map_with_actors(
        frame[["prompt", "response"]].iloc[order],
        ScoreActor,
        workers=workers,
        use_gpu=use_gpu,
        cpus_per_worker=cpus_per_worker,
        rows_per_batch=ROWS_PER_ACTOR_BATCH,
        constructor_kwargs=dict(
            model_dir=model_dir,
            trust_remote_code=trust_remote_code,
            use_gpu=use_gpu,
            batch_size=batch_size,
            max_length=max_length,
            add_eos=add_eos,
            train_on_prompt=True,
        ),
    )
    losses = np.empty(len(frame), dtype=np.float32)
    losses[order] = scored["loss"].to_numpy(dtype=np.float32)
    return losses


def loss_trajectories(
    frame: pd.DataFrame,
    *,
    proxy_model: str | None,
    checkpoints: int,
    steps_per_checkpoint: int,
    work_dir: Path,
    train_cfg: TrainConfig,
    model_cfg: ModelConfig | None = None,
    max_length: int | None = None,
    workers: int = 2,
    batch_size: int = 64,
    add_eos: bool = True,
    seed: int = 0,
    env: dict[str, str] | None = None,
    echo: Callable[[str], None] | None = None,
    cpus_per_worker: int | None = None,
) -> np.ndarray:
    """Train the proxy on all of `frame` and record each row's loss after every segment.

    Ray must be initialised. `work_dir` receives the proxy's starting point, one training
    directory per segment, `trajectories.parquet` (`row`, `loss_ckpt_00`, ...) and
    `proxy.json` (steps, checkpoint paths, timings).

    Args:
        frame: N rows with `prompt` and `response` text.
        proxy_model: the proxy to fine-tune (directory or hub id); None builds a tiny GPT-2
            from `model_cfg` with a character tokenizer over the data.
        checkpoints: T, the trajectory length.
        steps_per_checkpoint: optimizer steps between two checkpoints.
        work_dir: where everything above is written (earlier segments there are replaced).
        train_cfg: proxy training (batch size, lr, workers, DeepSpeed); `steps` and
            `checkpoint_every` are ignored.
        model_cfg: shape of the tiny proxy (ignored with `proxy_model`).
        max_length: longest row in tokens; None: what covers the data, at most 1024.
        workers, batch_size: scoring actors, and rows per forward pass in each.
        add_eos: whether responses end with the end-of-sequence token (as in training).
        seed: proxy initialisation and data order.
        env: environment of the Ray Train workers (default `inference.worker_env()`).
        echo: receives one line per segment (steps, loss, timings).

    Returns:
        (N, T) float32 losses; NaN for a row without response tokens (an empty response).

    Raises:
        ValueError: no rows, or T / steps < 1.
    """
    from pipeline.inference import kept_workers, worker_env
    from pipeline.train import TrainJob, kept_trainer, train_generation

    if checkpoints < 1 or steps_per_checkpoint < 1:
        raise ValueError(
            f"checkpoints and steps must be >= 1; got {checkpoints} and {steps_per_checkpoint}"
        )
    if len(frame) == 0:
        raise ValueError("no rows to train the proxy on")
    echo = echo or (lambda _line: None)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    frame = frame[["prompt", "response"]].reset_index(drop=True)
    # Fewer rows than one global batch (a filter that kept a handful): the proxy trains on
    # copies of them, as a generation's training does, so every worker gets whole batches;
    # each row is still scored once.
    copies = -(-train_cfg.batch_size // len(frame))
    training_rows = pd.concat([frame] * copies, ignore_index=True) if copies > 1 else frame
    init, length = prepare_proxy(
        frame,
        proxy_model,
        model_cfg or ModelConfig(),
        work_dir / "proxy_init",
        max_length=max_length,
        add_eos=add_eos,
        seed=seed,
    )
    trust = (model_cfg or ModelConfig()).trust_remote_code
    echo(
        f"proxy: {'tiny GPT-2 (char tokenizer)' if proxy_model is None else proxy_model}, "
        f"max_length {length} tokens, {checkpoints} checkpoints x {steps_per_checkpoint} steps"
    )
    losses = np.zeros((len(frame), checkpoints), dtype=np.float32)
    record: list[dict] = []
    model = init
    # One set of training workers and one of scoring workers for every segment.
    with kept_trainer(work_dir), kept_workers():
        for t in range(checkpoints):
            segment = work_dir / f"segment_{t:02d}"
            if segment.exists():  # a finished earlier segment would be "resumed" as done
                shutil.rmtree(segment)
            cfg = dataclasses.replace(
                train_cfg,
                steps=steps_per_checkpoint,
                checkpoint_every=0,
                warmup_steps=train_cfg.warmup_steps if t == 0 else 0,
            )
            job = TrainJob(
                init_model=model,
                steps=steps_per_checkpoint,
                seed=seed + t,  # a fresh data order in every segment
                max_length=length,
                add_eos=add_eos,
                trust_remote_code=trust,
            )
            started = time.perf_counter()
            model = str(Path(segment) / "model")
            state = train_generation(
                job,
                training_rows,
                str(segment),
                cfg,
                env if env is not None else worker_env(),
                model,
                cpus_per_worker=cpus_per_worker,
            )
            trained = time.perf_counter() - started
            started = time.perf_counter()
            losses[:, t] = score_losses(
                frame,
                model,
                workers=workers,
                batch_size=batch_size,
                max_length=length,
                add_eos=add_eos,
                use_gpu=train_cfg.use_gpu,
                trust_remote_code=trust,
                cpus_per_worker=cpus_per_worker,
            )
            scored = time.perf_counter() - started
            train_loss = state["log"][-1]["loss"] if state.get("log") else float("nan")
            record.append(
                dict(
                    checkpoint=t,
                    step=(t + 1) * steps_per_checkpoint,
                    path=model,
                    train_loss=train_loss,
                    train_seconds=trained,
                    score_seconds=scored,
                    mean_loss=float(np.nanmean(losses[:, t])),
                )
            )
            echo(
                f"checkpoint {t + 1}/{checkpoints}: step {(t + 1) * steps_per_checkpoint}, "
                f"train loss {train_loss:.3f} ({trained:.1f}s); scored {len(frame):,} rows in "
                f"{scored:.1f}s ({len(frame) / max(scored, 1e-9):,.0f} rows/s), "
                f"mean loss {record[-1]['mean_loss']:.3f}"
            )
    table = pd.DataFrame({"row": np.arange(len(frame))})
    for t in range(checkpoints):
        table[column_name(t)] = losses[:, t]
    write_parquet(table, work_dir / "trajectories.parquet")
    write_json(
        {"proxy": proxy_model, "max_length": length, "checkpoints": record},
        work_dir / "proxy.json",
    )
    return losses


def read_trajectories(path: str | Path) -> np.ndarray:
    """The (N, T) matrix back from a `trajectories.parquet`, rows in `row` order."""
    table = pd.read_parquet(path).sort_values("row")
    columns = sorted(c for c in table.columns if c.startswith("loss_ckpt_"))
    return table[columns].to_numpy(dtype=np.float32)
