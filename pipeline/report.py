"""The run's table and plot: key metrics against generation."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

TABLE_COLUMNS = [
    ("generation", "gen", "{:d}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("train_examples", "train", "{:,d}"),
    ("real", "real", "{:,d}"),
    ("synthetic", "synth", "{:,d}"),
    ("labeled", "labels", "{:,d}"),
    ("kept", "kept", "{:,d}"),
    ("dropped", "dropped", "{:,d}"),
    ("distinct_1", "distinct-1", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("char_entropy", "char-H", "{:.2f}"),
]


def format_table(table: pd.DataFrame) -> str:
    """Fixed-width text table of the per-generation metrics (all-NaN columns left out)."""
    columns = [c for c in TABLE_COLUMNS if c[0] in table and not table[c[0]].isna().all()]
    return format_rows(table, columns)


def format_rows(
    frame: pd.DataFrame,
    columns: list[tuple[str, str, str]],
    *,
    label_first: bool = False,
    indent: str = "",
) -> str:
    """Fixed-width text table: (column, heading, format) per column; NaN prints as '-'.
    Numbers are right-aligned; with `label_first` the first column is a left-aligned label."""
    cells = [[heading for _, heading, _ in columns]]
    for _, row in frame.iterrows():
        line = []
        for key, _, fmt in columns:
            value = row[key]
            if isinstance(value, float) and math.isnan(value):
                line.append("-")
            else:
                line.append(fmt.format(int(value) if "d}" in fmt else value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def aligned(i: int, cell: str, width: int) -> str:
        return cell.ljust(width) if label_first and i == 0 else cell.rjust(width)

    return "\n".join(
        indent + "  ".join(aligned(i, c, w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in cells
    )


def plot_metrics(table: pd.DataFrame, path: Path, title: str) -> None:
    """One PNG: accuracy, perplexity and diversity against generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.data import atomic_path

    panels = [
        (k, label)
        for k, label in (
            ("accuracy", "held-out accuracy"),
            ("perplexity", "held-out perplexity"),
            ("distinct_2", "distinct-2 of samples"),
            ("char_entropy", "char entropy (bits)"),
        )
        if k in table and not table[k].isna().all()
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        ax.plot(table["generation"], table[key], marker="o")
        ax.set_xlabel("generation")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
