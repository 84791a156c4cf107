"""Ray Data stages that run a model over rows: generate, score, evaluate.

Each stage is an actor class (the model is loaded once per actor) mapped over the rows with
`map_batches(compute=ActorPoolStrategy(size=workers))`, and a driver function that feeds it a
frame and returns the finished frame. Every stage finishes before the next asks for CPUs.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import ray

from pipeline.model import (
    context_length,
    encode_examples,
    example_losses,
    generate,
    load_model,
    token_losses,
)


def quiet_logs() -> None:
    """Driver side: no Ray Data progress bars or info lines, no transformers progress bars."""
    import logging

    import ray.data

    _quiet_transformers()
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.verbose_stats_logs = False


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def use_all_assigned_cpus() -> None:
    """In a Ray actor or Train worker: one torch thread per CPU Ray assigned it."""
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    if cpus >= 1:
        torch.set_num_threads(int(cpus))


class _ModelActor:
    def __init__(self, model_dir: str, trust_remote_code: bool, use_gpu: bool):
        import torch

        _quiet_transformers()
        use_all_assigned_cpus()
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model, self.tokenizer = load_model(
            model_dir, trust_remote_code=trust_remote_code, device=device, dtype=dtype
        )


class GenerateActor(_ModelActor):
    """k samples per prompt. Rows in: prompt_id, prompt, reference; out: one row per sample."""

    def __init__(
        self,
        model_dir,
        trust_remote_code,
        use_gpu,
        *,
        samples_per_prompt,
        max_new_tokens,
        temperature,
        top_p,
        batch_size,
        max_length,
    ):
        super().__init__(model_dir, trust_remote_code, use_gpu)
        self.k = samples_per_prompt
        self.settings = dict(
            samples_per_prompt=samples_per_prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            greedy=False,
            batch_size=batch_size,
            max_length=max_length,
        )

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        responses = generate(self.model, self.tokenizer, batch["prompt"].tolist(), **self.settings)
        repeated = batch.loc[batch.index.repeat(self.k)].reset_index(drop=True)
        repeated["sample"] = np.tile(np.arange(self.k), len(batch))
        repeated["response"] = responses
        return repeated


class ScoreActor(_ModelActor):
    """Adds `loss` (mean response-token loss under the model), `tokens` and `length`."""

    def __init__(
        self,
        model_dir,
        trust_remote_code,
        use_gpu,
        *,
        batch_size,
        max_length,
        add_eos,
        train_on_prompt,
    ):
        super().__init__(model_dir, trust_remote_code, use_gpu)
        self.scoring = dict(
            batch_size=batch_size,
            max_length=max_length,
            add_eos=add_eos,
            train_on_prompt=train_on_prompt,
        )

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return score_rows(self.model, self.tokenizer, batch, **self.scoring)


class GenerateAndScoreActor(GenerateActor):
    """GenerateActor, then ScoreActor's columns for the new samples, under the same model in
    the same actor: one actor pool and one model load where there would be two."""

    def __init__(self, *args, score_batch_size, add_eos, train_on_prompt, **kwargs):
        super().__init__(*args, **kwargs)
        self.scoring = dict(
            batch_size=score_batch_size,
            max_length=self.settings["max_length"],
            add_eos=add_eos,
            train_on_prompt=train_on_prompt,
        )

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return score_rows(self.model, self.tokenizer, super().__call__(batch), **self.scoring)


def score_rows(
    model, tokenizer, batch: pd.DataFrame, *, batch_size, max_length, add_eos, train_on_prompt
) -> pd.DataFrame:
    """`batch` with `loss`, `tokens` and `length` of each row's response under `model`."""
    # Score what the next model would be trained on: the response, after its prompt.
    prompts = batch["prompt"].tolist() if train_on_prompt else [""] * len(batch)
    loss, tokens = example_losses(
        model,
        tokenizer,
        prompts,
        batch["response"].tolist(),
        max_length=max_length,
        add_eos=add_eos,
        batch_size=batch_size,
    )
    batch = batch.copy()
    batch["loss"], batch["tokens"] = loss, tokens
    batch["length"] = batch["response"].str.len()
    return batch


class EvalActor(_ModelActor):
    """Held-out rows (prompt, response) in; out: the greedy answer, one sample, and the
    per-token losses of the real response (for perplexity and token-level diagnostics)."""

    def __init__(
        self,
        model_dir,
        trust_remote_code,
        use_gpu,
        *,
        greedy,
        max_new_tokens,
        temperature,
        batch_size,
        max_length,
        add_eos,
    ):
        super().__init__(model_dir, trust_remote_code, use_gpu)
        self.greedy, self.add_eos, self.temperature = greedy, add_eos, temperature
        self.settings = dict(
            samples_per_prompt=1,
            max_new_tokens=max_new_tokens,
            top_p=1.0,
            batch_size=batch_size,
            max_length=max_length,
        )
        self.settings["max_length"] = min(max_length, context_length(self.model) or max_length)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.copy()
        prompts = batch["prompt"].tolist()
        if self.greedy:
            batch["greedy"] = generate(
                self.model, self.tokenizer, prompts, greedy=True, temperature=1.0, **self.settings
            )
        batch["sampled"] = generate(
            self.model,
            self.tokenizer,
            prompts,
            greedy=False,
            temperature=self.temperature,
            **self.settings,
        )
        encoded = encode_examples(
            self.tokenizer,
            prompts,
            batch["response"].tolist(),
            max_length=self.settings["max_length"],
            add_eos=self.add_eos,
        )
        losses, mask = token_losses(self.model, encoded, self.settings["batch_size"])
        batch["token_ids"] = list(encoded.input_ids[:, 1:])
        batch["token_losses"] = list(losses)
        batch["token_mask"] = list(mask)
        batch["loss_sum"] = losses.sum(axis=1)
        batch["tokens"] = mask.sum(axis=1)
        return batch


def map_with_actors(
    frame: pd.DataFrame,
    actor_cls: type,
    *,
    workers: int,
    use_gpu: bool,
    constructor_kwargs: dict,
    rows_per_batch: int,
    cpus_per_worker: int | None = None,
) -> pd.DataFrame:
    """Run `actor_cls` over `frame` on a pool of `workers` actors; return the rows in order.
    Each actor gets `cpus_per_worker` CPUs (None: its share of the cluster, `cpus_per_worker`
    in cluster.connect)."""
    from cluster.connect import cpus_per_worker as share

    if len(frame) == 0:
        return frame
    frame = frame.reset_index(drop=True).assign(_row=np.arange(len(frame)))
    n_blocks = max(1, min(len(frame), workers * 4))
    parts = [frame.iloc[index] for index in np.array_split(np.arange(len(frame)), n_blocks)]
    dataset = ray.data.from_pandas(parts)
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": share(workers, cpus_per_worker)}
    result = dataset.map_batches(
        actor_cls,
        fn_constructor_kwargs=constructor_kwargs,
        batch_format="pandas",
        batch_size=rows_per_batch,
        compute=ray.data.ActorPoolStrategy(size=workers),
        **resources,
    ).to_pandas()
    return result.sort_values("_row").drop(columns="_row").reset_index(drop=True)


def worker_env() -> dict[str, str]:
    """Environment every Ray worker of a run gets."""
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for key in ("HF_HUB_OFFLINE", "DS_ACCELERATOR"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env
