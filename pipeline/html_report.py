"""A run as one self-contained HTML page: `genloop report RUN_DIR` writes RUN_DIR/report.html.

Every plot is a PNG embedded as a base64 data: URI, the styles are inline, and there is no
script: the file opens offline and can be mailed or attached as it is. The report reads the
run directory as the loop leaves it and shows what is there; a missing or unreadable piece
(a generation still running, a run from an older version) is skipped with a note.

Read from RUN_DIR:
    config.yaml                       the resolved config (table)
    gen_XX/metrics.json               metrics against generation (plots and table)
    gen_XX/mix.parquet                mix composition (`source` column)
    gen_XX/curated_samples.parquet    curation funnel (`kept`, `drop_reason`)
    gen_XX/labels.parquet             weak labels bought (`correct`)
    gen_XX/curate.json                curation funnel when curated_samples.parquet is absent
    gen_XX/diagnostics.parquet        token-category deltas (category, tokens, share,
                                      mean_delta, share_of_increase)
    gen_XX/selection.json             selection clusters: {"cluster_sizes": {id: rows},
                                      "cluster_budget": {id: rows selected}, "method": ...}
    gen_XX/.done/<stage>              which stages finished (notes on unfinished generations)
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.data import write_text

SOURCES = ("real", "synthetic", "labeled")
SOURCE_COLORS = {"real": "#2c7fb8", "synthetic": "#fd8d3c", "labeled": "#31a354"}
DIAGNOSTIC_COLUMNS = ("category", "tokens", "share", "mean_delta", "share_of_increase")
STAGES = ("generate", "score", "curate", "mix", "train", "evaluate")

# (metrics.json key or "<section>.<key>", table heading); the table shows the columns present.
METRIC_COLUMNS = [
    ("generation", "gen"),
    ("accuracy", "accuracy"),
    ("perplexity", "perplexity"),
    ("heldout_loss", "loss"),
    ("distinct_1", "dist-1"),
    ("distinct_2", "dist-2"),
    ("char_entropy", "char H"),
    ("word_entropy", "word H"),
    ("vocabulary", "vocab"),
    ("mean_length", "length"),
    ("mix.real", "real"),
    ("mix.synthetic", "synth"),
    ("mix.labeled", "labeled"),
    ("curate.kept", "kept"),
    ("curate.dropped", "dropped"),
    ("curate.labels_spent", "labels"),
    ("curate.sample_accuracy", "sample acc"),
    ("train.step", "steps"),
    ("mix_similarity.real_cosine", "cos real"),
    ("mix_similarity.real_mmd", "MMD real"),
    ("mix_similarity.previous_mmd", "MMD prev"),
]

# One panel per entry: (title, [(column, label)]).
METRIC_PANELS = [
    ("held-out accuracy", [("accuracy", "accuracy")]),
    ("held-out perplexity", [("perplexity", "perplexity")]),
    ("distinct-n of samples", [("distinct_1", "distinct-1"), ("distinct_2", "distinct-2")]),
    ("entropy of samples (bits)", [("char_entropy", "characters"), ("word_entropy", "words")]),
    (
        "training mix drift (MMD² of embeddings)",
        [
            ("mix_similarity.real_mmd", "vs real data"),
            ("mix_similarity.previous_mmd", "vs previous mix"),
        ],
    ),
]


@dataclass
class Section:
    anchor: str
    title: str
    body: str  # HTML


@dataclass
class Report:
    """What `build_report` found: the page's sections and the notes on skipped pieces."""

    run_dir: Path
    sections: list[Section] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    images: int = 0


# --------------------------------------------------------------------------- entry point


def write_report(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, Report]:
    """Build the report of `run_dir` and write it to `out` (default RUN_DIR/report.html).

    Raises:
        FileNotFoundError: `run_dir` does not exist.
        ValueError: `run_dir` is a file, or holds neither config.yaml nor a gen_XX directory.
    """
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    path = Path(out) if out is not None else run_dir / "report.html"
    write_text(render_html(report), path)
    return path, report


def build_report(run_dir: Path) -> Report:
    """Read everything the report shows; each section notes what it had to skip."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir}: is a file, not a run directory")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    generations = generation_dirs(run_dir)
    config_path = run_dir / "config.yaml"
    if not generations and not config_path.is_file():
        raise ValueError(f"{run_dir}: not a genloop run directory (no config.yaml, no gen_XX/)")
    report = Report(run_dir)
    config = _read(report, config_path, _read_mapping)
    _note_progress(report, generations, config)
    metrics = metrics_table(report, generations)
    builders: list[tuple[str, str, Callable[[], str | None]]] = [
        ("metrics", "Metrics against generation", lambda: _metrics_section(report, metrics)),
        ("table", "Metrics table", lambda: _table_section(metrics)),
        ("mix", "Training-mix composition", lambda: _mix_section(report, generations)),
        ("curation", "Curation funnel", lambda: _curation_section(report, generations)),
        ("guard", "Adaptation guard", lambda: _guard_section(report, generations)),
        ("tokens", "Token-category loss deltas", lambda: _tokens_section(report, generations)),
        ("selection", "Selection clusters", lambda: _selection_section(report, generations)),
        ("config", "Resolved config", lambda: _config_section(config, config_path.is_file())),
    ]
    for anchor, title, build in builders:
        body = build()
        if body is not None:
            report.sections.append(Section(anchor, title, body))
    return report


def generation_dirs(run_dir: Path) -> dict[int, Path]:
    """gen_XX directories by generation number, in order."""
    found = {}
    for path in run_dir.iterdir():
        match = re.fullmatch(r"gen_(\d+)", path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def _read(report: Report, path: Path, reader: Callable[[Path], object]):
    """`reader(path)`, or None with a note when the file is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        return reader(path)
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        report.notes.append(f"{_rel(report, path)}: unreadable, skipped ({_reason(e)})")
        return None


class UnexpectedContent(ValueError):
    """A file that parses, but into something the report cannot use; the message says what."""


def _reason(error: Exception) -> str:
    """Why a file could not be read, in one line: a YAML parser's message spans lines and
    quotes the file, where the line number is what helps."""
    if isinstance(error, UnexpectedContent):
        return str(error)
    if isinstance(error, yaml.YAMLError):
        from pipeline.config import yaml_error_line

        return f"not valid YAML{yaml_error_line(error)}"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text at byte {error.start}"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _read_mapping(path: Path) -> dict:
    """A YAML file whose top level is a mapping of sections, as config.yaml is."""
    value = yaml.safe_load(path.read_text(encoding="utf-8"))
    if value is None:
        raise UnexpectedContent("empty")
    if not isinstance(value, dict):
        raise UnexpectedContent(f"a YAML {type(value).__name__}, not a mapping of sections")
    return value


def _rel(report: Report, path: Path) -> str:
    try:
        return str(path.relative_to(report.run_dir))
    except ValueError:
        return str(path)


def _note_progress(report: Report, generations: dict[int, Path], config) -> None:
    expected = None
    if isinstance(config, dict):
        loop = config.get("loop")
        if isinstance(loop, dict) and isinstance(loop.get("generations"), int):
            expected = loop["generations"] + 1
    for index, directory in generations.items():
        if not (directory / "metrics.json").is_file():
            done_dir = directory / ".done"
            done = [s for s in STAGES if (done_dir / s).exists()]
            finished = ", ".join(done) if done else "none"
            report.notes.append(
                f"gen_{index:02d}: unfinished (stages done: {finished}); its metrics are not shown"
            )
    if expected is not None:
        missing = [g for g in range(expected) if g not in generations]
        if missing:
            report.notes.append(
                f"{len(missing)} of {expected} generations not started yet "
                f"(gen_{missing[0]:02d}"
                + (f" to gen_{missing[-1]:02d})" if len(missing) > 1 else ")")
            )


# --------------------------------------------------------------------------- data


def metrics_table(report: Report, generations: dict[int, Path]) -> pd.DataFrame:
    """One row per evaluated generation, flattened from gen_XX/metrics.json."""
    rows = []
    for index, directory in generations.items():
        metrics = _read(report, directory / "metrics.json", lambda p: json.loads(p.read_text()))
        if not isinstance(metrics, dict):
            continue
        row = {"generation": index}
        for key, _ in METRIC_COLUMNS[1:]:
            section, _, name = key.rpartition(".")
            source = metrics.get(section, {}) if section else metrics
            value = source.get(name) if isinstance(source, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[key] = value
        rows.append(row)
    return pd.DataFrame(rows)


def mix_composition(report: Report, generations: dict[int, Path]) -> pd.DataFrame:
    """Rows per source (real, synthetic, labeled) per generation, from mix.parquet (or, for a
    generation without it, the `mix` counts of metrics.json)."""
    rows = []
    for index, directory in generations.items():
        counts = _read(
            report,
            directory / "mix.parquet",
            lambda p: pd.read_parquet(p, columns=["source"])["source"].value_counts().to_dict(),
        )
        if counts is None:
            metrics = _read(report, directory / "metrics.json", lambda p: json.loads(p.read_text()))
            counts = metrics.get("mix") if isinstance(metrics, dict) else None
        if isinstance(counts, dict):
            rows.append({"generation": index, **{s: int(counts.get(s, 0)) for s in SOURCES}})
    return pd.DataFrame(rows, columns=["generation", *SOURCES])


def curation_funnel(report: Report, generations: dict[int, Path]) -> pd.DataFrame:
    """Per curated generation: samples, kept, dropped by reason, labels bought and correct.

    Returns a frame with columns generation, samples, kept, labels, labels_correct and one
    `dropped: <reason>` column per drop reason.
    """
    rows = []
    for index, directory in generations.items():
        samples = _read(
            report,
            directory / "curated_samples.parquet",
            lambda p: pd.read_parquet(p, columns=["kept", "drop_reason"]),
        )
        if samples is not None:
            kept = samples["kept"].astype(bool)
            row = {"generation": index, "samples": len(samples), "kept": int(kept.sum())}
            reasons = samples.loc[~kept, "drop_reason"].fillna("").replace("", "dropped")
            for reason, count in reasons.value_counts().items():
                row[f"dropped: {reason}"] = int(count)
        else:
            stats = _read(report, directory / "curate.json", lambda p: json.loads(p.read_text()))
            if not isinstance(stats, dict) or "kept" not in stats:
                continue
            row = {
                "generation": index,
                "samples": int(stats.get("samples", 0)),
                "kept": int(stats["kept"]),
            }
            if stats.get("dropped"):
                row["dropped: dropped"] = int(stats["dropped"])
        labels = _read(report, directory / "labels.parquet", pd.read_parquet)
        if labels is not None:
            row["labels"] = len(labels)
            correct = labels["correct"] if "correct" in labels else pd.Series(dtype=bool)
            row["labels_correct"] = int(correct.fillna(False).astype(bool).sum())
        rows.append(row)
    frame = pd.DataFrame(rows)
    if len(frame):
        for column in ("labels", "labels_correct"):
            if column not in frame:
                frame[column] = 0
        frame = frame.fillna(0)
        dropped = sorted(c for c in frame.columns if c.startswith("dropped: "))
        columns = ["generation", "samples", "kept", *dropped, "labels", "labels_correct"]
        frame = frame[columns].astype({c: "int64" for c in columns})
    return frame


def token_diagnostics(report: Report, generations: dict[int, Path]) -> pd.DataFrame:
    """gen_XX/diagnostics.parquet of every generation that has one, with a generation column."""
    frames = []
    for index, directory in generations.items():
        path = directory / "diagnostics.parquet"
        frame = _read(report, path, pd.read_parquet)
        if frame is None:
            continue
        missing = [c for c in DIAGNOSTIC_COLUMNS if c not in frame.columns]
        if missing:
            report.notes.append(
                f"{_rel(report, path)}: skipped, missing column(s) {', '.join(missing)}"
            )
            continue
        frames.append(frame[list(DIAGNOSTIC_COLUMNS)].assign(generation=index))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def selection_clusters(report: Report, generations: dict[int, Path]) -> dict[int, dict]:
    """Per generation with a selection.json: {"method", "sizes", "selected"}, the last two
    as {cluster id: rows} (selected may be empty)."""
    out = {}
    for index, directory in generations.items():
        path = directory / "selection.json"
        data = _read(report, path, lambda p: json.loads(p.read_text()))
        if data is None:
            continue
        sizes = _cluster_counts(data.get("cluster_sizes") if isinstance(data, dict) else None)
        if not sizes:
            report.notes.append(f"{_rel(report, path)}: no cluster_sizes in it, not plotted")
            continue
        selected = _cluster_counts(data.get("cluster_budget") or data.get("selected_per_cluster"))
        out[index] = {"method": data.get("method"), "sizes": sizes, "selected": selected or {}}
    return out


def _cluster_counts(value) -> dict[int, int] | None:
    """{id: count} from a JSON mapping (keys are strings in JSON) or a list indexed by id."""
    try:
        if isinstance(value, dict):
            return {int(k): int(v) for k, v in value.items()}
        if isinstance(value, list):
            return {i: int(v) for i, v in enumerate(value)}
    except (TypeError, ValueError):
        return None
    return None


# --------------------------------------------------------------------------- sections


def _metrics_section(report: Report, metrics: pd.DataFrame) -> str:
    if metrics.empty:
        return _p("No generation has been evaluated yet.")
    panels = [
        (title, [(c, label) for c, label in lines if c in metrics and metrics[c].notna().any()])
        for title, lines in METRIC_PANELS
    ]
    panels = [(title, lines) for title, lines in panels if lines]
    if not panels:
        return _p("No metric to plot.")
    fig, axes = _figure(1, len(panels), (3.6 * len(panels), 3.2))
    for ax, (title, lines) in zip(axes, panels):
        for column, label in lines:
            ax.plot(metrics["generation"], metrics[column], marker="o", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("generation")
        _integer_xticks(ax, metrics["generation"])
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    return _img(report, fig, "held-out metrics, collapse signals and mix drift per generation")


def _mix_section(report: Report, generations: dict[int, Path]) -> str:
    mix = mix_composition(report, generations)
    if mix.empty:
        return _p("No training mix written yet.")
    fig, (ax,) = _figure(1, 1, (max(5.0, 0.7 * len(mix) + 3), 3.4))
    bottom = np.zeros(len(mix))
    for source in SOURCES:
        values = mix[source].to_numpy(dtype=float)
        ax.bar(mix["generation"], values, bottom=bottom, label=source, color=SOURCE_COLORS[source])
        bottom += values
    ax.set_xlabel("generation")
    ax.set_ylabel("training examples")
    _integer_xticks(ax, mix["generation"])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _img(report, fig, "training examples per source per generation") + _html_table(mix)


def _curation_section(report: Report, generations: dict[int, Path]) -> str | None:
    funnel = curation_funnel(report, generations)
    if funnel.empty:
        return _p("No generation has been curated yet (generation 0 trains on real data only).")
    dropped = [c for c in funnel.columns if c.startswith("dropped: ")]
    with_labels = funnel["labels"].sum() > 0
    fig, axes = _figure(1, 2 if with_labels else 1, (11 if with_labels else 6, 3.4))
    x = funnel["generation"].to_numpy()
    ax = axes[0]
    ax.bar(x, funnel["kept"], label="kept", color="#31a354")
    bottom = funnel["kept"].to_numpy(dtype=float)
    palette = ["#de2d26", "#fc9272", "#fdae6b", "#bcbddc", "#969696"]
    for i, column in enumerate(dropped):
        values = funnel[column].to_numpy(dtype=float)
        ax.bar(x, values, bottom=bottom, label=column, color=palette[i % len(palette)])
        bottom += values
    ax.set_title("generated samples: kept and dropped (by reason)", fontsize=10)
    ax.set_ylabel("samples")
    if with_labels:
        right = axes[1]
        right.bar(x, funnel["labels_correct"], label="correct", color="#31a354")
        right.bar(
            x,
            funnel["labels"] - funnel["labels_correct"],
            bottom=funnel["labels_correct"],
            label="wrong",
            color="#de2d26",
        )
        right.set_title("weak labels bought", fontsize=10)
        right.set_ylabel("labels")
    for a in axes:
        a.set_xlabel("generation")
        _integer_xticks(a, x)
        a.legend(fontsize=8)
        a.grid(alpha=0.3, axis="y")
    return _img(report, fig, "curation funnel per generation") + _html_table(funnel)


def guard_events(report: Report, generations: dict[int, Path]) -> pd.DataFrame:
    """Every attempt the guard judged: rejected ones set aside in gen_XX/attempt_K/, and the
    kept one; one row each with the metric before and after and what was done."""
    rows = []
    for index, directory in generations.items():
        attempts = sorted(directory.glob("attempt_*/metrics.json"))
        for path in [*attempts, directory / "metrics.json"]:
            metrics = _read(report, path, lambda p: json.loads(p.read_text()))
            verdict = metrics.get("guard") if isinstance(metrics, dict) else None
            if not verdict or verdict.get("before") is None:
                continue
            rejected = path.parent != directory
            rows.append(
                {
                    "generation": index,
                    "attempt": metrics.get("attempt", 0),
                    "real": metrics.get("mix", {}).get("real", 0),
                    "metric": verdict.get("metric"),
                    "before": verdict.get("before"),
                    "after": verdict.get("after"),
                    "outcome": "set aside, redone"
                    if rejected
                    else ("kept, flagged" if verdict.get("worse") else "kept"),
                }
            )
    return pd.DataFrame(rows)


def _guard_section(report: Report, generations: dict[int, Path]) -> str | None:
    events = guard_events(report, generations)
    if events.empty or not (events["outcome"] != "kept").any():
        return None  # nothing the guard objected to: no section
    intro = _p(
        "Generations that made held-out data worse than the previous one by more than "
        "<code>guard.tolerance</code>. A generation set aside was redone with more real data "
        "(its files are kept in <code>gen_XX/attempt_K/</code>)."
    )
    return intro + _html_table(events)


def _tokens_section(report: Report, generations: dict[int, Path]) -> str | None:
    frame = token_diagnostics(report, generations)
    if frame.empty:
        return None  # the loop writes diagnostics.parquet only when diagnostics are on
    categories = list(dict.fromkeys(frame["category"]))
    gens = sorted(int(g) for g in frame["generation"].unique())
    cells = {(int(r.generation), r.category): r for r in frame.itertuples(index=False)}

    def values(column: str, keys) -> np.ndarray:
        out = [getattr(cells[k], column) if k in cells else np.nan for k in keys]
        return np.nan_to_num(np.asarray(out, dtype=float))

    fig, (left, right) = _figure(1, 2, (12, 3.8))
    width = 0.8 / len(gens)
    x = np.arange(len(categories))
    for i, g in enumerate(gens):
        offset = (i - (len(gens) - 1) / 2) * width
        heights = values("mean_delta", [(g, c) for c in categories])
        left.bar(x + offset, heights, width, label=f"gen {g}")
    left.axhline(0, color="black", linewidth=0.8)
    left.set_xticks(x, categories, rotation=20, ha="right", fontsize=9)
    left.set_title("mean loss change per token vs the previous generation", fontsize=10)
    left.legend(fontsize=8)
    bottom = np.zeros(len(gens))
    for category in categories:
        heights = values("share_of_increase", [(g, category) for g in gens])
        right.bar([str(g) for g in gens], heights, bottom=bottom, label=category)
        bottom += heights
    if not bottom.any():
        right.text(0.5, 0.5, "no token id's loss rose", transform=right.transAxes, ha="center")
    right.set_ylim(0, 1)
    right.set_xlabel("generation")
    right.set_title("share of the loss increase, by category", fontsize=10)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    intro = _p(
        "Held-out real tokens scored by each generation's model against the previous one "
        "(Oncel et al., arXiv 2410.05581). <i>share of increase</i>: the category's part of "
        "the loss added by the token ids whose loss rose."
    )
    table = frame[["generation", *DIAGNOSTIC_COLUMNS]]
    return (
        intro + _img(report, fig, "token-category loss deltas per generation") + _html_table(table)
    )


def _selection_section(report: Report, generations: dict[int, Path]) -> str | None:
    clusters = selection_clusters(report, generations)
    if not clusters:
        return None
    fig, axes = _figure(len(clusters), 1, (10, 2.8 * len(clusters)))
    for ax, (index, data) in zip(axes, clusters.items()):
        order = sorted(data["sizes"], key=lambda c: (-data["sizes"][c], c))
        x = np.arange(len(order))
        ax.bar(x, [data["sizes"][c] for c in order], color="#9ecae1", label="rows in cluster")
        if data["selected"]:
            selected = [data["selected"].get(c, 0) for c in order]
            ax.bar(x, selected, width=0.5, color="#08519c", label="selected")
        method = f" ({data['method']})" if data["method"] else ""
        ax.set_title(f"gen {index}{method}: {len(order)} clusters, largest first", fontsize=10)
        ax.set_ylabel("rows")
        if len(order) <= 40:
            ax.set_xticks(x, [str(c) for c in order], fontsize=7)
        else:
            ax.set_xticks([])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    return _img(report, fig, "selection cluster sizes per generation")


def _config_section(config, present: bool) -> str:
    if not isinstance(config, dict):
        if present:
            return _p("config.yaml could not be read; see the note at the top.")
        return _p("No config.yaml in the run directory.")
    top = [(key, value) for key, value in config.items() if not isinstance(value, dict)]
    groups = [("run", top)] if top else []
    groups += [(k, _flatten(v)) for k, v in config.items() if isinstance(v, dict)]
    tables = []
    for name, rows in groups:
        body = "".join(
            f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(_show(value))}</td></tr>"
            for key, value in rows
        )
        tables.append(
            f'<table class="config"><tr><th colspan="2">{html.escape(str(name))}</th></tr>'
            f"{body}</table>"
        )
    return f'<div class="config-grid">{"".join(tables)}</div>'


def _flatten(values: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _table_section(metrics: pd.DataFrame) -> str:
    if metrics.empty:
        return _p("No generation has been evaluated yet.")
    columns = [(key, head) for key, head in METRIC_COLUMNS if key in metrics]
    legend = _p(
        "loss: held-out loss per token; dist-n: distinct-n of samples; H: entropy (bits); "
        "length: mean sample length (characters); real / synth / labeled: training mix; "
        "kept / dropped / labels: curation; sample acc: share of correct samples."
    )
    return legend + _html_table(metrics[[k for k, _ in columns]].rename(columns=dict(columns)))


# --------------------------------------------------------------------------- HTML


STYLE = """
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1150px; color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #666; font-size: 0.9em; }
nav a { margin-right: 1em; font-size: 0.9em; }
.notes { background: #fff8e1; border: 1px solid #f0d58c; padding: 0.6em 1em; font-size: 0.9em; }
img { max-width: 100%; height: auto; display: block; margin: 0.8em 0; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.45em; text-align: right; }
th { background: #f4f4f4; }
.wide { overflow-x: auto; max-width: 100%; }
.config-grid { display: flex; flex-wrap: wrap; gap: 0 1.2em; align-items: flex-start; }
table.config th, table.config td { text-align: left; }
table.config td:first-child { font-family: monospace; }
"""


def render_html(report: Report) -> str:
    """The page: title, notes on skipped pieces, a link bar, then every section."""
    name = report.run_dir.resolve().name
    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in report.sections)
    notes = ""
    if report.notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
        notes = f'<div class="notes" id="notes"><b>Skipped or incomplete:</b><ul>{items}</ul></div>'
    sections = "".join(
        f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>{s.body}</section>'
        for s in report.sections
    )
    title = f"genloop run {html.escape(name)}"
    where = html.escape(str(report.run_dir.resolve()))
    made = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body>"
        f"<h1>{title}</h1>"
        f'<p class="meta">{where} &middot; report made {made}</p>'
        f"<nav>{nav}</nav>{notes}{sections}</body></html>\n"
    )


def _p(text: str) -> str:
    return f"<p>{text}</p>"


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _html_table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, (float, np.floating)):
            if math.isnan(value):
                return "&ndash;"
            return f"{value:.4g}"
        if isinstance(value, (int, np.integer)):
            return f"{value:,}" if abs(value) >= 10_000 else str(value)
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f'<div class="wide"><table><tr>{head}</tr>{body}</table></div>'


# --------------------------------------------------------------------------- figures


def _figure(rows: int, columns: int, size: tuple[float, float]):
    """A matplotlib Figure (no pyplot, no display) and its axes as a flat list."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    axes = fig.subplots(rows, columns, squeeze=False)
    return fig, list(axes.reshape(-1))


def _integer_xticks(ax, values) -> None:
    values = sorted({int(v) for v in values})
    if len(values) <= 30:
        ax.set_xticks(values)


def figure_png(fig) -> bytes:
    """A figure as PNG bytes (no software tag in the metadata)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _img(report: Report, fig, alt: str) -> str:
    data = base64.b64encode(figure_png(fig)).decode("ascii")
    report.images += 1
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
