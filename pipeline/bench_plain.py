"""The bench's plain baselines: what a user's own script would do with torch and transformers
alone, no genloop and no Ray.

Kept apart from `bench_stages` so that the plain data-parallel processes (`train_rank`) import
only this module, as light as a user's script: their whole-call time is not genloop's.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass

import numpy as np

IGNORE = -100  # label of a token that is not trained on


@dataclass(frozen=True)
class PlainTraining:
    """The optimizer settings a plain training loop shares with genloop's DeepSpeed config."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float

    @classmethod
    def of(cls, train_config, batch_size: int | None = None) -> PlainTraining:
        """From a `TrainConfig`, optionally with another batch size."""
        t = train_config
        return cls(
            t.steps, batch_size or t.batch_size, t.lr, t.weight_decay, t.warmup_steps, t.grad_clip
        )


def start_ids(tokenizer) -> list[int]:
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [] if start is None else [start]


def load_plain(model_dir: str):
    """What a user's script starts with: the model and tokenizer, from_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, tokenizer


def plain_batch(tokenizer, prompts, responses, *, add_eos: bool, max_length: int):
    """[start] + prompt + response (+ eos), right-padded; labels only on the response."""
    import torch

    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    start, end = start_ids(tokenizer), [tokenizer.eos_token_id] if add_eos else []
    rows = [(start + p + r + end)[:max_length] for p, r in zip(p_ids, r_ids)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (row, p) in enumerate(zip(rows, p_ids)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        n_prompt = len(start) + len(p)
        labels[i, n_prompt : len(row)] = ids[i, n_prompt : len(row)]
    return ids, mask, labels


def train_loop(
    model,
    tokenizer,
    prompts: np.ndarray,
    responses: np.ndarray,
    t: PlainTraining,
    *,
    seed: int,
    add_eos: bool,
    max_length: int,
    out_dir,
) -> tuple[int, float]:
    """`t.steps` AdamW steps of `t.batch_size` rows (shuffled epochs), each batch tokenized
    as it comes; the model is saved into `out_dir` (None: not saved, another rank saves) and
    removed again. Returns (tokens trained on, seconds of the loop and the save)."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay
    )
    warmup = max(1, t.warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if t.warmup_steps else 1.0
    )
    rng = np.random.default_rng(seed)
    order, cursor, tokens = rng.permutation(len(prompts)), 0, 0
    started = time.perf_counter()
    for _ in range(t.steps):
        if cursor + t.batch_size > len(order):
            order, cursor = rng.permutation(len(prompts)), 0
        index = order[cursor : cursor + t.batch_size]
        cursor += t.batch_size
        ids, mask, labels = plain_batch(
            tokenizer, prompts[index], responses[index], add_eos=add_eos, max_length=max_length
        )
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        tokens += int(mask.sum())
    if out_dir is not None:
        getattr(model, "module", model).save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    end = time.perf_counter()
    if out_dir is not None:
        shutil.rmtree(out_dir, ignore_errors=True)
    return tokens, end - started


def train_rank(
    rank: int,
    world: int,
    port: int,
    model_dir: str,
    prompts: np.ndarray,
    responses: np.ndarray,
    t: PlainTraining,
    seed: int,
    add_eos: bool,
    max_length: int,
    out_dir,
    communicate: bool,
    results,
) -> None:
    """One process of the plain data-parallel baseline (`bench_stages.plain_parallel_training`):
    one torch thread, a gloo process group on 127.0.0.1:`port`, `train_loop` on this rank's
    rows (in torch DDP with `communicate`); puts (tokens, loop seconds) on `results`."""
    import torch
    import torch.distributed as dist
    import transformers

    transformers.utils.logging.set_verbosity_error()  # one bench log, no per-rank load bars
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        model, tokenizer = load_plain(model_dir)
        if communicate:
            model = torch.nn.parallel.DistributedDataParallel(model)
        dist.barrier()  # every rank loaded: the loops start together
        measured = train_loop(
            model,
            tokenizer,
            prompts,
            responses,
            t,
            seed=seed,
            add_eos=add_eos,
            max_length=max_length,
            out_dir=out_dir if rank == 0 else None,
        )
        results.put(measured)
        dist.barrier()  # no rank leaves the group while another still trains
    finally:
        dist.destroy_process_group()
