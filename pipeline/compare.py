"""`genloop compare`: several loop variants with the same seeds, side by side.

    genloop compare --out DIR [--config PRESET] [--seeds 0,1,2]
        [--vary curate.strategy=none,filter,filter+labels-uniform,filter+labels-hard]
        [--vary curate.gamma=0.1,0.2] [key=value ...]

Every combination of the `--vary` values is one variant; every variant runs once per seed,
each a whole loop in `DIR/<variant>/seed_<s>/` on one shared Ray. Generation 0 does not depend
on the varied curation and mixing keys, so it is trained once per seed and copied. A rerun of
the same command resumes: finished stages are loaded, not redone. Writes `DIR/results.csv`
(every run's per-generation metrics), `DIR/summary.csv` and `DIR/summary.md` (mean and
standard deviation over seeds) and `DIR/accuracy.png` (mean per variant with a band over seeds).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.loop import GEN0_FREE, copy_generation_zero

# Columns of a run's table (`loop.summary_row`) that --metric may compare; for those in
# LOWER_IS_BETTER the best variant is the lowest.
METRICS = (
    "accuracy",
    "perplexity",
    "heldout_loss",
    "sample_accuracy",
    "filter_precision",
    "kept",
    "labels_spent",
    "distinct_1",
    "distinct_2",
    "char_entropy",
    "word_entropy",
    "vocabulary",
    "mix_real_cosine",
    "mix_real_mmd",
    "mix_previous_mmd",
)
LOWER_IS_BETTER = ("perplexity", "heldout_loss", "labels_spent", "mix_real_mmd")


def register(commands) -> None:
    parser = commands.add_parser(
        "compare",
        help="run loop variants with the same seeds and compare them",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("--out", required=True, help="experiment directory")
    parser.add_argument("--config", help="base preset YAML (default: the embedded default)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a config key and its values; repeat to make a grid (default: "
        "curate.strategy over the four strategies)",
    )
    parser.add_argument(
        "--metric",
        default=None,
        choices=METRICS,
        metavar="METRIC",
        help="metric to compare (default: accuracy if the task has it, else perplexity): "
        + ", ".join(METRICS),
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides applied to every run"
    )
    parser.set_defaults(handler=cmd_compare)


def variants(vary: list[str]) -> list[dict[str, str]]:
    """`["a=1,2", "b=x"]` -> [{"a": "1", "b": "x"}, {"a": "2", "b": "x"}]."""
    from pipeline.cli import UsageError

    axes: dict[str, list[str]] = {}
    for item in vary or ["curate.strategy=none,filter,filter+labels-uniform,filter+labels-hard"]:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UsageError(f"--vary {item!r}: expected KEY=V1,V2,..., e.g. curate.gamma=0.1,0.2")
        if key == "seed":
            raise UsageError(f"--vary {item!r}: compare sets the seed; give --seeds {values}")
        if key in axes:
            raise UsageError(f"--vary {item!r}: {key} is varied twice; give all its values once")
        listed = values.split(",")
        if "" in listed or len(set(listed)) < len(listed):
            raise UsageError(f"--vary {item!r}: every value once, none empty")
        axes[key] = listed
    combos = itertools.product(*([(key, v) for v in values] for key, values in axes.items()))
    return [dict(combo) for combo in combos]


def variant_name(assignment: dict[str, str]) -> str:
    return "__".join(f"{k.split('.')[-1]}={v}" for k, v in assignment.items()).replace("/", "-")


def cmd_compare(args: argparse.Namespace) -> int:
    import ray

    from cluster.connect import connect
    from pipeline.cli import UsageError, make_output_dir, parse_seeds
    from pipeline.config import load_config
    from pipeline.inference import worker_env
    from pipeline.loop import Progress, run_loop
    from pipeline.tasks import make_task

    seeds = parse_seeds(args.seeds)
    grid = variants(args.vary)
    for item in args.overrides:
        if item.partition("=")[0] == "seed":
            raise UsageError(f"{item!r}: compare sets the seed of each run; give --seeds")
    # Validate every run's config before any work starts.
    runs = []
    for assignment in grid:
        for seed in seeds:
            overrides = [
                *args.overrides,
                *(f"{k}={v}" for k, v in assignment.items()),
                f"seed={seed}",
            ]
            runs.append((variant_name(assignment), seed, load_config(args.config, overrides)))
    make_task(runs[0][2].task, runs[0][2].seed)
    if args.metric:
        check_metric(args.metric, [cfg for _, _, cfg in runs])
    shareable = all(k.startswith(GEN0_FREE) for a in grid for k in a)
    check_rerun(Path(args.out), runs)

    out = make_output_dir(args.out, "--out")
    print(
        f"genloop compare: {len(grid)} variants x {len(seeds)} seeds = {len(runs)} runs in {out}",
        flush=True,
    )
    started = time.perf_counter()
    frames = []
    connect(
        runs[0][2].ray.address,
        num_cpus=runs[0][2].ray.num_cpus,
        env=worker_env(),
        log_to_driver=False,
    )
    try:
        for name, seed, cfg in runs:
            run_dir = out / name / f"seed_{seed}"
            if shareable:
                _reuse_generation_zero(out, seed, run_dir)
            print(f"\n== {name} seed {seed} ==", flush=True)
            progress = Progress(cfg.loop.generations, echo=lambda line: print(line, flush=True))
            table = run_loop(cfg, run_dir, progress)
            frames.append(table.assign(variant=name, seed=seed))
    finally:
        ray.shutdown()
    results = pd.concat(frames, ignore_index=True)
    metric = args.metric or ("accuracy" if results["accuracy"].notna().any() else "perplexity")
    summary = summarize(results, metric)
    from pipeline.data import write_text

    write_text(results.to_csv(index=False), out / "results.csv")
    write_text(summary.to_csv(index=False), out / "summary.csv")
    write_text(summary_markdown(summary, metric), out / "summary.md")
    plot_comparison(results, metric, out / f"{metric}.png")
    print()
    print(summary_markdown(summary, metric))
    final = summary[summary["generation"] == summary["generation"].max()]
    print("\nfinal generation:")
    print(format_table_final(final, metric))
    print(f"\ngenloop compare: finished in {time.perf_counter() - started:.0f}s; {out.resolve()}")
    return 0


def check_metric(metric: str, configs: list) -> None:
    """Refuse a --metric that no run of the experiment records (UsageError)."""
    from pipeline.cli import UsageError
    from pipeline.loop import unrecorded_metric

    reasons = [unrecorded_metric(metric, cfg) for cfg in configs]
    if all(reasons):
        raise UsageError(f"--metric {metric}: no run records it ({reasons[0][1]})")


def check_rerun(out: Path, runs: list) -> None:
    """A rerun into an existing --out resumes its runs: refuse one whose settings changed
    (`check_same_settings`), and a --out that holds something other than an experiment."""
    from pipeline.cli import UsageError
    from pipeline.loop import check_same_settings

    if not out.is_dir() or not any(out.iterdir()):
        return
    if not any(out.glob("*/seed_*/config.yaml")):
        raise UsageError(
            f"--out {out}: not empty and not a genloop compare experiment; choose another --out"
        )
    for name, seed, cfg in runs:
        check_same_settings(out / name / f"seed_{seed}", cfg)


def _reuse_generation_zero(out: Path, seed: int, run_dir: Path) -> None:
    """Copy a finished generation 0 (and base model) of the same seed from a sibling run."""
    for done in sorted(out.glob(f"*/seed_{seed}/gen_00/.done/evaluate")):
        if copy_generation_zero(done.parents[2], run_dir):
            return


def summarize(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, standard deviation, min and max of `metric` over seeds, per variant and generation."""
    grouped = results.groupby(["variant", "generation"])[metric]
    summary = grouped.agg(["mean", "std", "min", "max", "count"]).reset_index()
    order = {name: i for i, name in enumerate(dict.fromkeys(results["variant"]))}
    return summary.sort_values(
        ["variant", "generation"], key=lambda c: c.map(order) if c.name == "variant" else c
    ).reset_index(drop=True)


def summary_markdown(summary: pd.DataFrame, metric: str) -> str:
    """Variants as rows, generations as columns: `mean ± std`."""
    table = summary.assign(cell=[_mean_std(m, s) for m, s in zip(summary["mean"], summary["std"])])
    wide = table.pivot(index="variant", columns="generation", values="cell")
    wide = wide.loc[list(dict.fromkeys(summary["variant"]))]
    header = "| variant | " + " | ".join(f"gen {g}" for g in wide.columns) + " |"
    rule = "|---|" + "---|" * len(wide.columns)
    rows = [f"| {name} | " + " | ".join(wide.loc[name]) + " |" for name in wide.index]
    return "\n".join([f"{metric} (mean ± std over seeds)", "", header, rule, *rows])


def format_table_final(final: pd.DataFrame, metric: str) -> str:
    ordered = final.sort_values("mean", ascending=metric in LOWER_IS_BETTER)
    return "\n".join(
        f"  {row.variant:<40} {_mean_std(row.mean, row.std)}"
        f"  (min {row.min:.3f}, max {row.max:.3f}, {row.count} seed{'s' * (row.count != 1)})"
        for row in ordered.itertuples()
    )


def _mean_std(mean: float, std: float) -> str:
    """`mean ± std`; one seed has no spread, and shows the mean alone."""
    return f"{mean:.3f}" if np.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def plot_comparison(results: pd.DataFrame, metric: str, path: Path) -> None:
    """Mean `metric` against generation per variant, with a min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.data import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, frame in results.groupby("variant", sort=False):
        stats = frame.groupby("generation")[metric].agg(["mean", "min", "max"])
        (line,) = ax.plot(stats.index, stats["mean"], marker="o", label=name)
        ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.15, color=line.get_color())
    ax.set_xlabel("generation")
    ax.set_ylabel(f"held-out {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"held-out {metric}: mean over seeds, band = min..max", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
