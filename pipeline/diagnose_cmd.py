"""`genloop diagnose`: where did the loss change between two models, token by token?

    genloop diagnose --model runs/R/gen_00/model --model runs/R/gen_01/model \\
        --data data/heldout.jsonl [--out DIR] [--limit N] [key=value ...]

Scores the same examples under model A (the first --model) and model B (the second), then
prints the change broken down by token category, the 10 token ids whose loss rose most and
the perplexity A -> B; saves them as Parquet, a PNG chart and summary.json in --out
(default: a new folder diagnose-<time>). See `pipeline.diagnostics` for the accounting.

Data: a .jsonl / .parquet file with prompt/response columns (the loss is on the response),
or with a text column; any other file is read as plain text. Text is cut into chunks of
`chunk_chars` characters, each scored in full.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.cli import UsageError, check_output, path_or_default
from pipeline.data import DataError, atomic_path, read_records, read_text, write_json, write_parquet
from pipeline.report import format_rows


@dataclass
class DiagnoseSettings:
    """The key=value settings of `genloop diagnose`."""

    max_length: int = 128  # longest example, in tokens (longer ones are cut)
    batch_size: int = 32  # examples per forward pass
    chunk_chars: int = 128  # text data: characters per example
    add_eos: bool | None = None  # score an end-of-sequence token; None: yes for prompt/response
    device: str | None = None  # cpu or cuda; None: cuda when available
    trust_remote_code: bool = False  # only for models whose code you trust
    top: int = 10  # token ids listed as top risers
    fields: dict[str, str] = field(default_factory=dict)  # column renames, e.g. prompt=question


def register(subparsers) -> None:
    """Add the `diagnose` sub-command to genloop's parser."""
    parser = subparsers.add_parser(
        "diagnose",
        help="compare two models token by token on the same data",
        description="Score the same examples under two models (A = first --model, B = second) "
        "and show where the loss changed: by token category, the token ids that rose most, and "
        "perplexity A -> B.",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="DIR",
        help="a checkpoint or HF model directory; give it twice: A (before), then B (after)",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help=".jsonl / .parquet with prompt/response (or text) columns, or a text file",
    )
    parser.add_argument("--out", metavar="DIR", help="where results go (default: diagnose-<time>)")
    parser.add_argument(
        "--limit", type=int, default=500, metavar="N", help="at most N examples (default 500)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="settings: "
        + ", ".join(f.name for f in fields(DiagnoseSettings) if f.name != "fields")
        + ", fields.prompt / fields.response / fields.text=COLUMN",
    )
    parser.set_defaults(handler=cmd_diagnose)


def parse_settings(overrides: list[str]) -> DiagnoseSettings:
    """Settings from key=value items. Raises UsageError naming every bad item."""
    settings = DiagnoseSettings()
    hints = {f.name: f.type for f in fields(DiagnoseSettings)}
    errors = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            errors.append(f"{item!r}: expected key=value, e.g. max_length=256")
            continue
        if key.startswith("fields."):
            name = key.removeprefix("fields.")
            if name not in ("prompt", "response", "text") or not text:
                errors.append(f"{item!r}: use fields.prompt, fields.response or fields.text=COLUMN")
            else:
                settings.fields[name] = text
            continue
        if key not in hints or key == "fields":
            valid = ", ".join(n for n in hints if n != "fields")
            errors.append(f"unknown setting {key!r}; valid: {valid}, fields.<column>")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        problem = _check_setting(key, value)
        if problem:
            errors.append(f"{key}: {problem}, got {text!r}")
        else:
            setattr(settings, key, value)
    if errors:
        raise UsageError("; ".join(errors))
    return settings


def _check_setting(key: str, value) -> str | None:
    if key in ("max_length", "batch_size", "chunk_chars", "top"):
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        return None if ok else "expected a positive integer"
    if key in ("add_eos", "trust_remote_code"):
        ok = isinstance(value, bool) or (key == "add_eos" and value is None)
        return None if ok else "expected true or false"
    if key == "device":
        return None if value in ("cpu", "cuda", None) else "expected cpu or cuda"
    return None


def load_examples(
    path: str | Path, settings: DiagnoseSettings, limit: int
) -> tuple[pd.DataFrame, str, bool]:
    """The examples to score, as (frame of prompt/response, a description, is_pairs).

    Raises:
        DataError: missing or unreadable file, no usable columns, no text.
    """
    path = Path(path)
    pairs = False
    if path.suffix.lower() in (".jsonl", ".json", ".parquet"):
        frame = read_records(path, settings.fields, required=(), fields_key="fields")
        columns = set(frame.columns)
        if {"prompt", "response"} <= columns:
            frame, pairs = read_records(path, settings.fields, fields_key="fields"), True
        elif "text" not in columns:
            own = frame.rename(columns={ours: theirs for ours, theirs in settings.fields.items()})
            raise DataError(
                f"{path}: needs prompt and response columns, or a text column; it has "
                f"{', '.join(map(str, own.columns))} (map yours with "
                "fields.prompt=COLUMN fields.response=COLUMN, or fields.text=COLUMN)"
            )
    if pairs:
        frame = frame[["prompt", "response"]]
        kind = "prompt/response pairs"
    else:
        text = read_text(path, settings.fields, fields_key="fields")
        size = settings.chunk_chars
        chunks = [text[i : i + size] for i in range(0, len(text), size)]
        chunks = [c for c in chunks if c.strip()]
        frame = pd.DataFrame({"prompt": "", "response": chunks})
        kind = f"text chunks of {size} characters"
    total = len(frame)
    if total > limit:
        # Evenly spaced over the file, so that a limit still covers all of it.
        pick = np.unique(np.linspace(0, total - 1, limit).round().astype(np.int64))
        frame = frame.iloc[pick]
    description = f"{len(frame):,} {kind}" + (f" (of {total:,})" if total > len(frame) else "")
    return frame.reset_index(drop=True), description, pairs


def cmd_diagnose(args: argparse.Namespace) -> int:
    from pipeline.diagnostics import check_model_path, compare_models
    from pipeline.model import quiet_transformers

    if len(args.model) != 2:
        raise UsageError(
            f"give --model exactly twice (A, then B), got {len(args.model)}: "
            "e.g. --model RUN/gen_00/model --model RUN/gen_01/model"
        )
    if args.limit < 1:
        raise UsageError(f"--limit: must be >= 1, got {args.limit}")
    settings = parse_settings(args.overrides)
    default = f"diagnose-{time.strftime('%Y%m%d-%H%M%S')}"
    out = check_output(path_or_default(args.out, "--out", default), "--out")
    for model in args.model:
        check_model_path(model)
    frame, description, pairs = load_examples(args.data, settings, args.limit)
    add_eos = pairs if settings.add_eos is None else settings.add_eos
    device = settings.device or _default_device()
    quiet_transformers()

    model_a, model_b = args.model
    print(f"genloop diagnose: A = {model_a}", flush=True)
    print(f"                  B = {model_b}", flush=True)
    print(f"data: {args.data}, {description}; device {device}", flush=True)
    started = time.perf_counter()
    diagnosis = compare_models(
        model_a,
        model_b,
        frame,
        max_length=settings.max_length,
        add_eos=add_eos,
        batch_size=settings.batch_size,
        device=device,
        trust_remote_code=settings.trust_remote_code,
        top=settings.top,
    )
    print(f"scored {diagnosis.n_tokens:,} tokens twice in {time.perf_counter() - started:.1f}s\n")
    print(format_diagnosis(diagnosis))

    out.mkdir(parents=True, exist_ok=True)
    write_parquet(diagnosis.categories, out / "categories.parquet")
    write_parquet(diagnosis.tokens, out / "tokens.parquet")
    write_parquet(diagnosis.risers, out / "risers.parquet")
    summary = dict(
        diagnosis.summary(),
        model_a=str(model_a),
        model_b=str(model_b),
        data=str(args.data),
        examples=description,
        add_eos=add_eos,
        settings=asdict(settings),
    )
    write_json(summary, out / "summary.json")
    plot_categories(
        diagnosis.categories,
        out / "categories.png",
        title=f"A = {_short(model_a)}  ->  B = {_short(model_b)}\n"
        f"perplexity {diagnosis.perplexity_a:.4g} -> {diagnosis.perplexity_b:.4g}",
    )
    saved = ("categories.parquet", "tokens.parquet", "risers.parquet", "summary.json")
    print(f"\nsaved in {out}/: {', '.join(saved)}, categories.png")
    return 0


def format_diagnosis(diagnosis) -> str:
    """The printed result: perplexity A -> B, the category table, the top risers."""
    a, b = diagnosis.perplexity_a, diagnosis.perplexity_b
    change = f" ({(b - a) / a:+.1%})" if a > 0 else ""
    lines = [f"perplexity A -> B: {a:.4f} -> {b:.4f}{change}", "", "by token category:"]
    lines.append(
        format_rows(
            diagnosis.categories,
            [
                ("category", "category", "{}"),
                ("tokens", "tokens", "{:,d}"),
                ("share", "share", "{:.1%}"),
                ("loss_a", "loss A", "{:.4f}"),
                ("loss_b", "loss B", "{:.4f}"),
                ("mean_delta", "mean delta", "{:+.4f}"),
                ("share_of_increase", "share of increase", "{:.1%}"),
            ],
            label_first=True,
            indent="  ",
        )
    )
    if diagnosis.risers.empty:
        lines += ["", "top risers: none (no token id's loss rose)"]
        return "\n".join(lines)
    risers = diagnosis.risers.assign(token=diagnosis.risers["token"].map(repr))
    lines += ["", f"top {len(risers)} risers (by added loss = count x delta):"]
    lines.append(
        format_rows(
            risers,
            [
                ("token_id", "id", "{:d}"),
                ("token", "token", "{}"),
                ("category", "category", "{}"),
                ("count", "count", "{:,d}"),
                ("loss_a", "loss A", "{:.4f}"),
                ("loss_b", "loss B", "{:.4f}"),
                ("delta", "delta", "{:+.4f}"),
                ("delta_sum", "added", "{:+.3f}"),
            ],
            label_first=True,
            indent="  ",
        )
    )
    return "\n".join(lines)


def plot_categories(categories: pd.DataFrame, path: Path, title: str) -> None:
    """Bar chart of a category breakdown: mean loss change, and share of tokens against
    share of the loss increase."""
    from matplotlib.figure import Figure

    names = categories["category"].tolist()
    x = np.arange(len(names))
    fig = Figure(figsize=(10, 3.8))
    left, right = fig.subplots(1, 2)
    deltas = categories["mean_delta"].to_numpy(dtype=float)
    left.bar(x, deltas, color=["#c0392b" if d > 0 else "#27ae60" for d in deltas])
    left.axhline(0, color="black", linewidth=0.8)
    left.set_title("mean loss change per token (B - A)", fontsize=10)
    right.bar(x - 0.2, categories["share"], width=0.4, label="share of tokens", color="#7f8c8d")
    right.bar(
        x + 0.2,
        categories["share_of_increase"].fillna(0.0),
        width=0.4,
        label="share of loss increase",
        color="#c0392b",
    )
    right.set_ylim(0, 1)
    right.legend(fontsize=8)
    right.set_title("where the loss increase sits", fontsize=10)
    for ax in (left, right):
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})


def _short(path: str, parts: int = 3) -> str:
    return "/".join(Path(path).parts[-parts:])


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
