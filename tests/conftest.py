"""Shared fixtures: a real local Ray per test module, tiny models, the shared data sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray (loopback, 2 CPUs) shared by the tests of one module."""
    import ray

    from cluster.connect import connect
    from pipeline.inference import worker_env

    connect(None, num_cpus=2, env=worker_env(), log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    path = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"shared data not found: {path}")
    return path


@pytest.fixture(scope="session")
def gsm8k() -> Path:
    path = SHARED_DATA / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"shared data not found: {path}")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny GPT-2 (1 layer, 32 wide) with a character tokenizer for the arithmetic alphabet."""
    from pipeline.config import ModelConfig
    from pipeline.model import build_char_tokenizer, build_tiny_model, save_model

    directory = tmp_path_factory.mktemp("tiny_model")
    tokenizer = build_char_tokenizer("0123456789+= abcdefghijklmnopqrstuvwxyz.,\n")
    model = build_tiny_model(
        ModelConfig(n_layer=1, n_embd=32, n_head=2, max_length=64), tokenizer, seed=0
    )
    save_model(model, tokenizer, directory)
    return str(directory)
