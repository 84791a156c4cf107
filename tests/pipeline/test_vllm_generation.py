"""`generate.backend=vllm`: the requests genloop hands Ray Data's vLLM processor and the
responses it makes of the engines' tokens. vLLM itself needs a GPU and is not installed here;
the processor is built with Ray's real API, and the engines run only on a GPU machine."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.model import decode_until_eos, load_model, prompt_ids_and_budget
from pipeline.vllm_generation import (
    generation_backend,
    processor_config,
    sample_requests,
    vllm_installed,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_model(tiny_model_dir)[1]


def requests(tokenizer, pool, seed=(0, 14, 1)):
    return sample_requests(
        pool,
        tokenizer,
        samples_per_prompt=3,
        max_new_tokens=5,
        max_length=24,
        temperature=0.7,
        top_p=0.9,
        seed=list(seed),
    )


def test_requests_carry_genloops_prompt_ids_budget_and_a_seed_per_sample(tokenizer):
    prompts = ["1+2=", "12+34=", "9" * 40 + "="]  # the last is cut to its end
    pool = pd.DataFrame({"prompt_id": [7, 8, 9], "prompt": prompts, "reference": ["3", "46", ""]})
    rows = requests(tokenizer, pool)
    assert rows["prompt_id"].tolist() == [7, 7, 7, 8, 8, 8, 9, 9, 9]
    assert rows["sample"].tolist() == [0, 1, 2] * 3
    assert rows["reference"].tolist() == ["3"] * 3 + ["46"] * 3 + [""] * 3
    encoded, budget = prompt_ids_and_budget(tokenizer, prompts, 5, 24)
    assert rows["tokenized_prompt"].tolist() == [ids for ids in encoded for _ in range(3)]
    assert len(encoded[2]) < 40 and budget == 5
    params = rows["sampling_params"].tolist()
    assert {p["max_tokens"] for p in params} == {budget}
    assert {p["temperature"] for p in params} == {0.7} and {p["top_p"] for p in params} == {0.9}
    assert all(p["stop_token_ids"] == [tokenizer.eos_token_id] for p in params)
    seeds = [p["seed"] for p in params]
    assert len(set(seeds)) == 9 and all(0 <= s < 2**31 for s in seeds)
    # The same run, generation and rows: the same seeds; the next generation: new ones.
    assert [p["seed"] for p in requests(tokenizer, pool)["sampling_params"]] == seeds
    later = [p["seed"] for p in requests(tokenizer, pool, seed=(0, 14, 2))["sampling_params"]]
    assert not set(later) & set(seeds)


def test_responses_are_decoded_up_to_the_end_of_sequence(tokenizer):
    eos = tokenizer.eos_token_id
    one, two = tokenizer("12", add_special_tokens=False)["input_ids"], tokenizer("7")["input_ids"]
    generated = [one + [eos] + two, np.array(two), [eos]]
    assert decode_until_eos(tokenizer, generated) == ["12", "7", ""]


def test_auto_takes_vllm_only_on_gpus_with_vllm_and_a_local_model():
    assert generation_backend("hf", True, "/models/m") == "hf"
    assert generation_backend("vllm", True, "/models/m") == "vllm"
    assert generation_backend("auto", False, "/models/m") == "hf"
    assert generation_backend("auto", True, "s3://bucket/run/gen_00/model") == "hf"
    assert generation_backend("auto", True, "/models/m") == ("vllm" if vllm_installed() else "hf")


def test_the_processor_sends_token_ids_straight_to_the_engines(ray_local, tiny_model_dir):
    """Ray's own vLLM processor builder accepts genloop's config: one stage, the engine (no
    chat template, tokenizer or detokenizer), `workers` engines, the run's context length."""
    from ray.data.llm import build_processor

    config = processor_config(tiny_model_dir, workers=2, batch_size=64, max_length=24)
    engine = config.engine_kwargs
    assert engine["max_model_len"] == 24 and engine["enable_prefix_caching"] is True
    assert config.batch_size == 64 and config.concurrency == 2
    processor = build_processor(config)
    assert [type(stage).__name__ for stage in processor.stages.values()] == ["vLLMEngineStage"]
