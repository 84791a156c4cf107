"""Tasks: where prompts, real data, held-out data and the verifier come from.

Every task speaks in pandas frames with the columns the loop uses:
- real / held-out examples: `prompt`, `response` (text tasks use an empty prompt);
- prompt pools: `prompt_id`, `prompt`, `reference` (the real answer or continuation).

Three tasks:
- `arithmetic`, the embedded default: `aaa+bbb=` -> the sum zero-padded to digits+1 and
  written least-significant digit first (so addition can be learned left to right). Made by
  the project's own code from a seed: nothing is downloaded.
- `text`: character-level language modelling on any plain-text file (tinyshakespeare).
- `pairs`: the user's JSONL or Parquet with prompt/response columns, renamed by `task.fields`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.config import TaskConfig
from pipeline.data import DataError, read_records, read_text

# Distinct seed streams so that the pools of generation g are the same for every run with
# the same seed, whatever the strategy.
_SEED_STREAM, _HELDOUT_STREAM, _VALID_STREAM, _POOL_STREAM = 1, 2, 3, 4


@dataclass
class Task:
    name: str
    verifiable: bool
    max_new_tokens: int  # tokens the model generates per answer (characters for our tokenizer)
    add_eos: bool  # whether a training example ends with the end-of-sequence token
    train_on_prompt: bool  # synthetic examples keep the prompt (pairs) or only the response (text)
    alphabet: str  # characters of the locally built tokenizer
    real: pd.DataFrame  # real labeled data: generation 0 trains on it, `mix` draws from it
    heldout: pd.DataFrame  # held-out real data, evaluated every generation
    validation: pd.DataFrame  # prompts for generation 0's early stop
    cfg: TaskConfig
    seed: int
    real_text: str = ""  # text task: the training part of the corpus, prompts come from it

    def prompt_pool(self, generation: int) -> pd.DataFrame:
        """The prompts the model answers in `generation` (the same for every strategy)."""
        rng = np.random.default_rng([self.seed, _POOL_STREAM, generation])
        if self.name == "arithmetic":
            return _arithmetic_prompts(self.cfg.pool_prompts, self.cfg.digits, rng)
        if self.name == "text":
            n = max(1, self.cfg.synthetic_chars // self.cfg.continuation_chars)
            return _text_prompts(self.real_text, n, self.cfg, rng)
        pool = self.real.sample(n=min(len(self.real), self.cfg.pool_prompts), random_state=rng)
        return pd.DataFrame(
            {
                "prompt_id": np.arange(len(pool)),
                "prompt": pool["prompt"].to_numpy(),
                "reference": pool["response"].to_numpy(),
            }
        )

    @property
    def answer_check(self) -> str:
        """How `verify` compares an answer with its reference (see `answers_match`)."""
        return self.cfg.verifier if self.name == "pairs" else "exact"

    def verify(self, responses: list[str], references: list[str]) -> np.ndarray:
        """Bool per response: does it match the reference answer?"""
        if not self.verifiable:
            return np.zeros(len(responses), dtype=bool)
        return answers_match(responses, references, self.answer_check)

    def synthetic_example(self, prompts: pd.Series, responses: pd.Series) -> pd.DataFrame:
        """Training rows made from generated responses."""
        if self.train_on_prompt:
            return pd.DataFrame({"prompt": prompts.to_numpy(), "response": responses.to_numpy()})
        return pd.DataFrame({"prompt": "", "response": responses.to_numpy()})


def make_task(cfg: TaskConfig, seed: int) -> Task:
    """Build the task named by `cfg.name`. Raises DataError for bad user data."""
    if cfg.name == "arithmetic":
        return _arithmetic_task(cfg, seed)
    if cfg.name == "text":
        return _text_task(cfg, seed)
    return _pairs_task(cfg, seed)


# --------------------------------------------------------------------------- arithmetic


def arithmetic_answer(a: int, b: int, digits: int) -> str:
    """The sum, zero-padded to digits+1 and reversed: 123+45 -> '8610'."""
    return str(a + b).zfill(digits + 1)[::-1]


def _arithmetic_prompts(n: int, digits: int, rng: np.random.Generator) -> pd.DataFrame:
    a = rng.integers(0, 10**digits, size=n)
    b = rng.integers(0, 10**digits, size=n)
    prompts = [f"{x:0{digits}d}+{y:0{digits}d}=" for x, y in zip(a, b)]
    answers = [arithmetic_answer(int(x), int(y), digits) for x, y in zip(a, b)]
    return pd.DataFrame({"prompt_id": np.arange(n), "prompt": prompts, "reference": answers})


def _arithmetic_task(cfg: TaskConfig, seed: int) -> Task:
    def labeled(stream: int, n: int) -> pd.DataFrame:
        pool = _arithmetic_prompts(n, cfg.digits, np.random.default_rng([seed, stream]))
        return pd.DataFrame({"prompt": pool["prompt"], "response": pool["reference"]})

    return Task(
        name="arithmetic",
        verifiable=cfg.checks_answers,
        max_new_tokens=cfg.digits + 1,
        add_eos=True,
        train_on_prompt=True,
        alphabet="0123456789+=",
        real=labeled(_SEED_STREAM, cfg.seed_examples),
        heldout=labeled(_HELDOUT_STREAM, cfg.heldout_prompts),
        validation=labeled(_VALID_STREAM, cfg.validation_prompts),
        cfg=cfg,
        seed=seed,
    )


# --------------------------------------------------------------------------- text


def _text_task(cfg: TaskConfig, seed: int) -> Task:
    text = read_text(cfg.path, cfg.fields)
    # 100 contiguous blocks; every 10th is held out, so held-out text is spread over the
    # corpus. Each block must hold one example of task.block_chars.
    min_chars = 100 * cfg.block_chars
    if len(text) < min_chars:
        raise DataError(
            f"{cfg.path}: {len(text):,} characters; the text task needs at least {min_chars:,} "
            "(100 blocks of task.block_chars, every 10th held out); lower task.block_chars"
        )
    blocks = np.array_split(np.arange(len(text)), 100)
    train_blocks = [text[b[0] : b[-1] + 1] for i, b in enumerate(blocks) if i % 10 != 9]
    heldout_blocks = [text[b[0] : b[-1] + 1] for i, b in enumerate(blocks) if i % 10 == 9]
    if cfg.heldout_path:
        heldout_blocks = [read_text(cfg.heldout_path, cfg.fields)]
    rng = np.random.default_rng([seed, _SEED_STREAM])
    real_chunks = _spread_chunks(train_blocks, cfg.real_chars, cfg.block_chars, rng)
    heldout_chunks = [c for b in heldout_blocks for c in _chunks(b, cfg.block_chars)]
    if not heldout_chunks:  # a task.heldout_path shorter than one block
        raise DataError(
            f"{cfg.heldout_path}: {len(heldout_blocks[0])} characters; held-out text needs at "
            f"least one block of task.block_chars ({cfg.block_chars})"
        )
    heldout_rng = np.random.default_rng([seed, _HELDOUT_STREAM])
    if len(heldout_chunks) > cfg.heldout_limit:
        pick = np.sort(heldout_rng.choice(len(heldout_chunks), cfg.heldout_limit, replace=False))
        heldout_chunks = [heldout_chunks[i] for i in pick]
    real_text = "".join(train_blocks)
    span = cfg.prompt_chars + cfg.continuation_chars
    if len(real_text) <= span:
        raise DataError(
            f"{cfg.path}: {len(real_text):,} characters of training text, too few for one "
            f"prompt: task.prompt_chars + task.continuation_chars is {span:,}"
        )
    return Task(
        name="text",
        verifiable=cfg.checks_answers,
        max_new_tokens=cfg.continuation_chars,
        add_eos=False,
        train_on_prompt=False,
        alphabet="".join(sorted(set(text))),
        real=pd.DataFrame({"prompt": "", "response": real_chunks}),
        heldout=pd.DataFrame({"prompt": "", "response": heldout_chunks}),
        validation=pd.DataFrame({"prompt": [], "response": []}),
        cfg=cfg,
        seed=seed,
        real_text=real_text,
    )


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text) - size + 1, size)]


def _spread_chunks(
    blocks: list[str], total_chars: int, size: int, rng: np.random.Generator
) -> list[str]:
    """About `total_chars` of real text as `size`-char chunks spread over every block."""
    chunks = [c for b in blocks for c in _chunks(b, size)]
    n = min(len(chunks), max(1, total_chars // size))
    pick = np.sort(rng.choice(len(chunks), n, replace=False))
    return [chunks[i] for i in pick]


def _text_prompts(
    real_text: str, n: int, cfg: TaskConfig, rng: np.random.Generator
) -> pd.DataFrame:
    span = cfg.prompt_chars + cfg.continuation_chars
    starts = rng.integers(0, len(real_text) - span, size=n)
    prompts = [real_text[s : s + cfg.prompt_chars] for s in starts]
    references = [real_text[s + cfg.prompt_chars : s + span] for s in starts]
    return pd.DataFrame({"prompt_id": np.arange(n), "prompt": prompts, "reference": references})


# --------------------------------------------------------------------------- pairs (user data)


def _pairs_task(cfg: TaskConfig, seed: int) -> Task:
    frame = read_records(cfg.path, cfg.fields, required=("prompt", "response"))
    rng = np.random.default_rng([seed, _HELDOUT_STREAM])
    if cfg.heldout_path:
        heldout = read_records(cfg.heldout_path, cfg.fields, required=("prompt", "response"))
        real = frame
    else:
        order = rng.permutation(len(frame))
        n_held = max(1, int(round(cfg.heldout_fraction * len(frame))))
        if n_held >= len(frame):
            raise DataError(
                f"{cfg.path}: {len(frame)} rows leave nothing to train on after "
                f"holding out task.heldout_fraction={cfg.heldout_fraction}"
            )
        heldout, real = frame.iloc[order[:n_held]], frame.iloc[order[n_held:]]
    heldout = heldout.iloc[: cfg.heldout_limit].reset_index(drop=True)
    real = real.reset_index(drop=True)
    longest = int(max(real["response"].str.len().max(), heldout["response"].str.len().max()))
    alphabet = "".join(sorted(set("".join(frame["prompt"]) + "".join(frame["response"]))))
    n_valid = min(cfg.validation_prompts, len(heldout))
    return Task(
        name="pairs",
        verifiable=cfg.checks_answers,
        max_new_tokens=max(1, longest),
        add_eos=True,
        train_on_prompt=True,
        alphabet=alphabet,
        real=real[["prompt", "response"]],
        heldout=heldout[["prompt", "response"]],
        validation=heldout[["prompt", "response"]].iloc[:n_valid],
        cfg=cfg,
        seed=seed,
    )


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answers_match(responses: list[str], references: list[str], check: str) -> np.ndarray:
    """Bool per response: `final-number` compares the final numbers (GSM8K's '#### 42'),
    `exact` the text without surrounding whitespace."""
    if check == "final-number":
        pairs = ((_final_number(r), _final_number(ref)) for r, ref in zip(responses, references))
        return np.array([a is not None and a == b for a, b in pairs], dtype=bool)
    return np.array([r.strip() == ref.strip() for r, ref in zip(responses, references)], dtype=bool)


def _final_number(text: str) -> str | None:
    """The answer's final number (GSM8K writes it after '####'), commas removed."""
    tail = text.rsplit("####", 1)[-1]
    found = _NUMBER.findall(tail)
    return found[-1].replace(",", "") if found else None
