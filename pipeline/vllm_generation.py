"""Generation through Ray Data's LLM processor with vLLM engines (`generate.backend=vllm`, or
`auto` where it can run): one engine per GPU worker, continuous batching, the prompt's KV
cache shared by its k samples (prefix caching).

The samples are drawn as genloop's own generation (`pipeline.model.generate`) draws them: the
same prompt token ids (start token, left truncation), a new-token budget by the same rule
(here over the whole pool rather than per batch of prompts), sampling at
`generate.temperature` / `generate.top_p` with no top-k, stopped at the tokenizer's
end-of-sequence token and decoded the same way. Each sample has a seed of its own, drawn from
the run's seed, the prompt's place in the pool and the sample's number, so a generation's
samples do not depend on how Ray Data batches the rows. Scoring then runs on genloop's
ScoreActor pool (the score stage scores samples that come without a loss).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd

# What genloop asks of every engine besides the context length; vLLM's defaults stand for
# the rest (dtype "auto", gpu_memory_utilization).
ENGINE_DEFAULTS = {"enable_prefix_caching": True}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def generation_backend(backend: str, use_gpu: bool, model_dir: str) -> str:
    """What `generate.backend` runs, hf or vllm: auto takes vLLM on GPUs when it is installed
    and the model is a directory on a filesystem (an engine loads it by path)."""
    if backend != "auto":
        return backend
    from pipeline.storage import is_uri

    return "vllm" if use_gpu and not is_uri(model_dir) and vllm_installed() else "hf"


def sample_requests(
    pool: pd.DataFrame,
    tokenizer,
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    max_length: int,
    temperature: float,
    top_p: float,
    seed: list[int],
) -> pd.DataFrame:
    """One request row per sample: the pool's columns, `sample`, and the engine's inputs
    `tokenized_prompt` and `sampling_params`."""
    from pipeline.model import prompt_ids_and_budget

    encoded, budget = prompt_ids_and_budget(
        tokenizer, pool["prompt"].tolist(), max_new_tokens, max_length
    )
    k = samples_per_prompt
    rows = pool.loc[pool.index.repeat(k)].reset_index(drop=True)
    rows["sample"] = np.tile(np.arange(k), len(pool))
    place = np.repeat(np.arange(len(pool)), k)
    seeds = [
        int(np.random.SeedSequence([*seed, int(p), int(s)]).generate_state(1)[0] >> 1)
        for p, s in zip(place, rows["sample"])
    ]
    rows["tokenized_prompt"] = [encoded[p] for p in place]
    stop = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    rows["sampling_params"] = [
        dict(
            temperature=float(temperature),
            top_p=float(top_p),
            max_tokens=int(budget),
            seed=s,
            stop_token_ids=stop,
            detokenize=False,
        )
        for s in seeds
    ]
    return rows


def processor_config(model_dir: str, *, workers: int, batch_size: int, max_length: int):
    """Ray Data's vLLM processor for genloop's requests: token ids in, token ids out (no chat
    template, tokenizer or detokenizer stage), `workers` engines of one GPU each."""
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(
        model_source=model_dir,
        engine_kwargs=dict(ENGINE_DEFAULTS, max_model_len=max_length),
        concurrency=workers,
        batch_size=batch_size,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )


def generate_with_vllm(
    pool: pd.DataFrame,
    model_dir: str,
    *,
    trust_remote_code: bool,
    samples_per_prompt: int,
    max_new_tokens: int,
    max_length: int,
    temperature: float,
    top_p: float,
    seed: list[int],
    workers: int,
    batch_size: int,
) -> pd.DataFrame:
    """k samples for every prompt of `pool` (prompt_id, prompt, reference, ...): the pool's
    columns, `sample` and `response`, in pool order."""
    import ray.data
    from ray.data.llm import build_processor
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.config import ConfigError
    from pipeline.model import context_length, decode_until_eos
    from pipeline.storage import is_uri

    if is_uri(model_dir):
        raise ConfigError(
            [
                f"generate.backend: vllm loads the model by path, not from {model_dir}; put "
                "the run directory on storage every node mounts, or use generate.backend=hf"
            ]
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    max_length = min(max_length, context_length(config) or max_length)
    requests = sample_requests(
        pool,
        tokenizer,
        samples_per_prompt=samples_per_prompt,
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    requests["_request"] = np.arange(len(requests))
    processor = build_processor(
        processor_config(model_dir, workers=workers, batch_size=batch_size, max_length=max_length),
        postprocess=lambda row: dict(
            _request=row["_request"], generated_tokens=row["generated_tokens"]
        ),
    )
    inputs = requests[["_request", "tokenized_prompt", "sampling_params"]]
    out = processor(ray.data.from_pandas(inputs)).to_pandas().sort_values("_request")
    if out["_request"].tolist() != requests["_request"].tolist():
        raise RuntimeError(f"vLLM answered {len(out)} of {len(requests)} sample requests")
    samples = requests.drop(columns=["tokenized_prompt", "sampling_params", "_request"])
    samples["response"] = decode_until_eos(tokenizer, list(out["generated_tokens"]))
    return samples
