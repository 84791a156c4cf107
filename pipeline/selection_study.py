"""`genloop selection-study`: train a target model on what a selector picks, score held-out data.

    genloop selection-study subsets  --out DIR [--data GSM8K.jsonl] [--quick]
    genloop selection-study ordering --out DIR [--text input.txt --rare GSM8K.jsonl] [--quick]

subsets (S2L and ClusterClip against random at equal budget):
    prompt/response rows -> a candidate pool and a held-out slice
    -> the features, once: a proxy's loss trajectories (S2L; the proxy is a tiny GPT-2 at
       least 4x smaller than the target) and MiniLM embeddings (ClusterClip)
    -> for every method x fraction (x seed for random), and the full pool: select, train the
       target from the same initial weights for the same number of steps (Ray Train +
       DeepSpeed), and score its loss on the held-out answers.
ordering (ClusterClip as the order training consumes data in, over several epochs):
    a large corpus cut into documents plus a rare corpus at 1 : ratio
    -> embeddings and spherical k-means, once
    -> for every order (random epochs, cluster-balanced, ClusterClip with clip R): the target
       trained on the draws in that order -> held-out loss on the rare part, the common part
       and the two mixed at the training ratio.

The targets are tiny character-level GPT-2s built from a config (nothing is downloaded), so
the study runs on a laptop in minutes; the same code takes a real model directory. Each
finished cell is a JSON file in DIR/cells, written atomically: a rerun skips it. A rerun may
add or drop methods, fractions, orders and seeds; other changed settings are refused
(DIR/study.json records them). Writes DIR/results.csv and DIR/summary.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import ModelConfig, TrainConfig, first_change
from selection.selectors import required_features

GSM8K = "../shared/data/gsm8k/train.jsonl"
SHAKESPEARE = "../shared/data/tinyshakespeare/input.txt"


@dataclass
class SubsetStudy:
    data: str = GSM8K
    prompt_field: str = "question"
    response_field: str = "answer"
    pool_rows: int = 2400  # candidate pool, drawn at random from the file
    heldout_rows: int = 300  # held-out slice, disjoint from the pool
    fractions: tuple[float, ...] = (0.1, 0.2, 0.3)
    methods: tuple[str, ...] = ("s2l", "clusterclip", "random")
    random_seeds: tuple[int, ...] = (0, 1, 2)
    max_length: int = 512  # tokens (characters); longer rows lose the start of the prompt
    target: ModelConfig = field(default_factory=lambda: ModelConfig(n_layer=2, n_embd=128))
    proxy: ModelConfig = field(default_factory=lambda: ModelConfig(n_layer=1, n_embd=48, n_head=2))
    proxy_checkpoints: int = 6
    proxy_steps: int = 40  # proxy steps between two trajectory checkpoints
    n_clusters: int = 100  # k-means K for both methods (S2L's official default)
    steps: int = 300  # target training steps, the same for every subset and the full pool
    # Instead of `steps`: this many passes over each subset (the paper's protocol: a subset
    # costs what its size costs), so a 10% subset trains a tenth of the full pool's steps.
    epochs: float | None = None
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            batch_size=16, lr=1e-3, warmup_steps=20, schedule="cosine", workers=1
        )
    )
    workers: int = 2  # scoring / embedding actors


@dataclass
class OrderingStudy:
    text: str = SHAKESPEARE
    rare: str = GSM8K
    doc_chars: int = 320  # the large corpus is cut into documents this long
    common_docs: int = 2000
    ratio: int = 20  # common : rare documents
    heldout_docs: int = 200  # of each part
    epochs: int = 4  # training consumes epochs x documents draws
    orders: tuple[str, ...] = ("random", "balanced", "clusterclip-5", "clusterclip-8")
    seeds: tuple[int, ...] = (0,)  # each order is drawn (and a model trained) once per seed
    # Few clusters, so the rare corpus is one small cluster among a few large ones: that is
    # when balanced sampling over-weights it (K ~ N / 200 here).
    n_clusters: int = 10
    max_length: int = 384
    target: ModelConfig = field(default_factory=lambda: ModelConfig(n_layer=2, n_embd=128))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            batch_size=16, lr=1e-3, warmup_steps=20, schedule="cosine", workers=1
        )
    )
    workers: int = 2


def quick(study):
    """A seconds-sized version of a study, for tests."""
    small_train = dataclasses.replace(study.train, batch_size=8)
    if isinstance(study, SubsetStudy):
        return dataclasses.replace(
            study,
            pool_rows=160,
            heldout_rows=24,
            fractions=(0.25,),
            random_seeds=(0,),
            max_length=192,
            target=ModelConfig(n_layer=1, n_embd=32, n_head=2),
            proxy=ModelConfig(n_layer=1, n_embd=8, n_head=2),
            proxy_checkpoints=2,
            proxy_steps=3,
            n_clusters=4,
            steps=6,
            train=small_train,
            workers=1,
        )
    return dataclasses.replace(
        study,
        doc_chars=96,
        common_docs=120,
        ratio=6,
        heldout_docs=12,
        epochs=2,
        orders=("random", "balanced", "clusterclip-2"),
        n_clusters=4,
        max_length=192,
        target=ModelConfig(n_layer=1, n_embd=32, n_head=2),
        train=small_train,
        workers=1,
    )


# --------------------------------------------------------------------------- CLI


def register(commands) -> None:
    parser = commands.add_parser(
        "selection-study",
        help="train a target on selected data and score held-out data (S2L, ClusterClip)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", choices=("subsets", "ordering"))
    parser.add_argument("--out", required=True, help="study directory (a rerun resumes)")
    parser.add_argument("--data", help=f"subsets: JSONL with question/answer (default {GSM8K})")
    parser.add_argument("--text", help=f"ordering: the large corpus (default {SHAKESPEARE})")
    parser.add_argument("--rare", help=f"ordering: the rare corpus (default {GSM8K})")
    parser.add_argument(
        "--epochs",
        type=float,
        help="subsets: train each subset this many passes (default: the same steps for all)",
    )
    parser.add_argument(
        "--seeds", help="ordering: comma-separated seeds of the draw orders (default 0)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's worker logs")
    parser.set_defaults(handler=cmd_selection_study)


def cmd_selection_study(args: argparse.Namespace, echo: Callable[[str], None] | None = None) -> int:
    from pipeline.cli import UsageError, make_output_dir, parse_seeds
    from pipeline.data import write_json
    from pipeline.select_cmd import _with_ray

    echo = echo or (lambda line: print(line, flush=True))
    if args.seeds is not None and args.study != "ordering":
        raise UsageError("--seeds: for the ordering study (subsets draws random with 0,1,2)")
    for flag, study_of_flag in (("data", "subsets"), ("text", "ordering"), ("rare", "ordering")):
        if getattr(args, flag) is not None and args.study != study_of_flag:
            raise UsageError(f"--{flag}: for the {study_of_flag} study")
    if args.epochs is not None and (args.study != "subsets" or not args.epochs > 0):
        raise UsageError(f"--epochs {args.epochs}: a positive number, for the subsets study")
    if args.study == "subsets":
        study = SubsetStudy(**({"data": args.data} if args.data else {}), epochs=args.epochs)
        run, read = run_subsets, subset_rows
    else:
        paths = {k: v for k, v in (("text", args.text), ("rare", args.rare)) if v}
        seeds = {"seeds": parse_seeds(args.seeds)} if args.seeds is not None else {}
        study = OrderingStudy(**paths, **seeds)
        run, read = run_ordering, ordering_documents
    if args.quick:
        study = quick(study)
    for name in ("data", "text", "rare"):
        path = getattr(study, name, None)
        if path is not None and not Path(path).exists():
            raise UsageError(f"--{name} {path}: no such file")
    data = read(study)  # before Ray starts and --out is made: bad data costs a second
    settings = study_settings(args.study, study)
    check_rerun(Path(args.out), settings)
    out = make_output_dir(args.out, "--out")
    write_json(settings, out / STUDY_FILE)
    (out / "cells").mkdir(exist_ok=True)
    echo(f"genloop selection-study {args.study}: {out}")
    _with_ray(lambda: run(study, data, out, echo), verbose=args.verbose, use_gpu=False, echo=echo)
    echo(f"wrote {out / 'results.csv'} and {out / 'summary.md'}")
    return 0


STUDY_FILE = "study.json"  # the settings of the study in a --out, for a rerun to check
# Settings that only name cells (each cell's file is named by its method or order, fraction
# and seed): a rerun may add or drop cells; every other setting shapes every cell.
CELL_LISTS = ("methods", "fractions", "random_seeds", "orders", "seeds")


def study_settings(name: str, study) -> dict:
    """The study's settings as JSON values, data files as absolute paths."""
    settings = {"study": name, **json.loads(json.dumps(dataclasses.asdict(study)))}
    for key in ("data", "text", "rare"):
        if key in settings:
            settings[key] = str(Path(settings[key]).resolve())
    return settings


def check_rerun(out: Path, settings: dict) -> None:
    """A rerun resumes the study in `out` (finished cells are kept): refuse one with other
    settings (but for CELL_LISTS), whose cells would be reported as its own, and a --out
    holding something else.

    Raises:
        UsageError: naming the first setting that differs.
    """
    from pipeline.cli import UsageError

    if not out.is_dir() or not any(out.iterdir()):
        return
    saved = out / STUDY_FILE
    try:
        before = json.loads(saved.read_text())
    except (OSError, ValueError):
        raise UsageError(
            f"--out {out}: not empty and holds no readable {STUDY_FILE}; choose a new --out"
        ) from None
    change = first_change(before, settings, lambda key, *_: key in CELL_LISTS)
    if change:
        key, old, new = change
        raise UsageError(
            f"--out {out}: its study ran with {key}={old}, not {new}; rerun it with the same "
            "settings to resume, or choose a new --out"
        )


# --------------------------------------------------------------------------- subsets


def subset_rows(study: SubsetStudy) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the pool selection draws from, the held-out rows), shuffled apart from `study.data`.

    Raises:
        DataError: the file is unreadable, lacks the fields, or has too few rows.
    """
    from pipeline.data import DataError, read_records

    rows = read_records(
        study.data,
        {"prompt": study.prompt_field, "response": study.response_field},
        fields_key=None,
    )[["prompt", "response"]]
    need = study.pool_rows + study.heldout_rows
    if len(rows) < need:
        raise DataError(f"{study.data}: {len(rows)} rows, the study needs {need}")
    shuffled = rows.sample(frac=1.0, random_state=0).reset_index(drop=True)
    heldout = shuffled.iloc[: study.heldout_rows].reset_index(drop=True)
    pool = shuffled.iloc[study.heldout_rows : need].reset_index(drop=True)
    return pool, heldout


def run_subsets(
    study: SubsetStudy,
    rows: tuple[pd.DataFrame, pd.DataFrame],
    out: Path,
    echo: Callable[[str], None],
) -> dict:
    """Every cell of the subset study on `subset_rows` (Ray must be up); returns the summary
    table."""
    from pipeline.select_cmd import select_frame

    pool, heldout = rows
    init = build_target(
        pd.concat([pool, heldout]), study.target, study.max_length, out / "target_init"
    )
    proxy_params, target_params = _params(study.proxy, init), _params(study.target, init)
    echo(
        f"pool {len(pool):,} rows, held-out {len(heldout):,}; target {target_params:,} "
        f"parameters, proxy {proxy_params:,} ({target_params / proxy_params:.1f}x smaller)"
    )
    features = subset_features(study, pool, out, echo)

    cells = [("full", 1.0, 0)]
    for fraction in study.fractions:
        for method in study.methods:
            seeds = study.random_seeds if method == "random" else (0,)
            cells += [(method, fraction, seed) for seed in seeds]
    results = []
    for method, fraction, seed in cells:
        name = f"{method}_{fraction:g}_seed{seed}"

        def work(method=method, fraction=fraction, seed=seed, name=name) -> dict:
            if method == "full":
                chosen = pool
            else:
                chosen = select_frame(
                    pool,
                    method,
                    fraction,
                    seed=seed,
                    params={"n_clusters": study.n_clusters} if method != "random" else None,
                    **{k: v for k, v in features.items() if k in required_features(method)},
                )
            return train_and_score(
                chosen[["prompt", "response"]],
                {"heldout": heldout},
                init=init,
                study=study,
                steps=subset_steps(study, len(chosen)),
                cell_dir=out / "cells" / name,
            )

        result = cached_cell(out / "cells" / f"{name}.json", work)
        result.update(method=method, fraction=fraction, seed=seed)
        results.append(result)
        echo(
            f"  {name:<24} rows {result['rows']:>5}  held-out answer loss "
            f"{result['heldout_loss']:.4f}  ppl {math.exp(result['heldout_loss']):.3f}  "
            f"({result['seconds']:.0f}s)"
        )
    table = pd.DataFrame(results)
    write_tables(out, table, subsets_summary(table, study, target_params, proxy_params))
    return {"results": table}


def subset_steps(study: SubsetStudy, rows: int) -> int:
    """Training steps for a subset of `rows`: `study.steps`, or `study.epochs` passes."""
    if study.epochs is None:
        return study.steps
    return max(1, math.ceil(study.epochs * rows / study.train.batch_size))


def subset_features(study: SubsetStudy, pool: pd.DataFrame, out: Path, echo) -> dict:
    """The features the study's methods need (`select_cmd.compute_features`), computed once
    and saved as .npy."""
    from pipeline.select_cmd import SelectOptions, compute_features

    options = SelectOptions(
        workers=study.workers,
        checkpoints=study.proxy_checkpoints,
        steps=study.proxy_steps,
        max_length=study.max_length,
        proxy=study.proxy,
        # Segments continue one another: a constant rate, not one cosine per segment.
        train=dataclasses.replace(study.train, schedule="constant"),
    )
    names = set().union(*(required_features(method) for method in study.methods))
    path = {name: out / "features" / f"{name}.npy" for name in names}
    for method in study.methods:
        if any(not path[name].exists() for name in required_features(method)):
            computed = compute_features(pool, method, options, work_dir=out / "proxy", echo=echo)
            for name, value in computed.items():
                if not path[name].exists():
                    _save_npy(value, path[name])
    return {name: np.load(file) for name, file in path.items()}


def subsets_summary(table: pd.DataFrame, study: SubsetStudy, target: int, proxy: int) -> str:
    full = float(table.loc[table.method == "full", "heldout_loss"].iloc[0])
    lines = [
        "# Subset study: held-out answer loss of the target (lower is better)",
        "",
        f"Data {study.data}: pool {study.pool_rows}, held-out {study.heldout_rows}. Target "
        f"{target:,} parameters, proxy {proxy:,} ({target / proxy:.1f}x smaller). Every "
        + (
            f"model trains {study.steps} steps"
            if study.epochs is None
            else f"subset trains {study.epochs:g} passes (steps in proportion to its size)"
        )
        + f" x batch {study.train.batch_size} from the same initial weights.",
        "",
        f"Full pool: loss {full:.4f} (perplexity {math.exp(full):.3f}).",
        "",
        "| fraction | method | loss (mean ± sd over seeds) | perplexity | vs random | vs full |",
        "|---|---|---|---|---|---|",
    ]
    parts = table[table.method != "full"]
    for fraction, group in parts.groupby("fraction"):
        random_mean = group.loc[group.method == "random", "heldout_loss"].mean()
        for method, cell in group.groupby("method", sort=False):
            mean, sd = cell.heldout_loss.mean(), cell.heldout_loss.std(ddof=1)
            spread = f" ± {sd:.4f}" if len(cell) > 1 else ""
            lines.append(
                f"| {fraction:g} | {method} | {mean:.4f}{spread} | {math.exp(mean):.3f} | "
                f"{mean - random_mean:+.4f} | {mean - full:+.4f} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- ordering


def ordering_documents(study: OrderingStudy) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """(training documents with a `part` column, held-out documents per part).

    The large corpus is cut into `doc_chars` pieces; its last tenth is held out, so held-out
    text never overlaps training text. Rare documents are question + answer rows.
    """
    from pipeline.data import DataError, read_records, read_text

    text = read_text(study.text)
    pieces = [text[i : i + study.doc_chars] for i in range(0, len(text), study.doc_chars)]
    pieces = [p for p in pieces if len(p) == study.doc_chars]
    cut = int(len(pieces) * 0.9)
    rng = np.random.default_rng(0)
    train_common = [pieces[i] for i in rng.permutation(cut)[: study.common_docs]]
    held_common = [pieces[i] for i in cut + rng.permutation(len(pieces) - cut)]
    held_common = held_common[: study.heldout_docs]
    rare = read_records(study.rare, {"prompt": "question", "response": "answer"}, fields_key=None)
    rare = (rare["prompt"] + "\n" + rare["response"]).sample(frac=1.0, random_state=0).tolist()
    n_rare = max(1, study.common_docs // study.ratio)
    if len(train_common) < study.common_docs or len(rare) < n_rare + study.heldout_docs:
        raise DataError(
            f"{study.text} / {study.rare}: too small for {study.common_docs} + "
            f"{n_rare} training and {study.heldout_docs} held-out documents per part"
        )
    docs = pd.DataFrame(
        {
            "prompt": "",
            "response": train_common + rare[:n_rare],
            "part": ["common"] * len(train_common) + ["rare"] * n_rare,
        }
    )
    held = {
        "common": pd.DataFrame({"prompt": "", "response": held_common}),
        "rare": pd.DataFrame(
            {"prompt": "", "response": rare[n_rare : n_rare + study.heldout_docs]}
        ),
    }
    return docs, held


def draw_order(name: str, labels: np.ndarray, n_draws: int, epochs: int, seed: int) -> np.ndarray:
    """Row indices in the order training consumes them under order `name`."""
    from selection.clusterclip import balanced_order, clusterclip_order

    if name == "random":  # the usual epochs, each a fresh permutation
        rng = np.random.default_rng(seed)
        return np.concatenate([rng.permutation(len(labels)) for _ in range(epochs)])[:n_draws]
    if name == "balanced":
        return balanced_order(labels, n_draws, seed=seed)
    if name.startswith("clusterclip-"):
        return clusterclip_order(labels, n_draws, max_repeats=int(name.split("-")[1]), seed=seed)
    raise ValueError(f"unknown order {name!r}: random, balanced or clusterclip-R")


def run_ordering(
    study: OrderingStudy,
    documents: tuple[pd.DataFrame, dict[str, pd.DataFrame]],
    out: Path,
    echo: Callable[[str], None],
) -> dict:
    """Every order of the ordering study on `ordering_documents` (Ray must be up); returns
    the results."""
    from pipeline.cli import UsageError
    from pipeline.embed import embed_texts
    from selection.clusterclip import embed_clusters

    docs, held = documents
    init = build_target(
        pd.concat([docs, *held.values()]), study.target, study.max_length, out / "target_init"
    )
    path = out / "features" / "embeddings.npy"
    if not path.exists():
        started = time.perf_counter()
        _save_npy(embed_texts(docs["response"].tolist(), workers=study.workers), path)
        echo(f"embeddings: {len(docs):,} documents in {time.perf_counter() - started:.0f}s")
    labels = embed_clusters(np.load(path), study.n_clusters, seed=0)
    rare = docs["part"].to_numpy() == "rare"
    rare_clusters = np.unique(labels[rare])
    echo(
        f"documents: {int((~rare).sum()):,} common + {int(rare.sum()):,} rare; "
        f"{study.n_clusters} clusters, the rare documents in {len(rare_clusters)} of them "
        f"({np.isin(labels[~rare], rare_clusters).sum()} common documents share those)"
    )
    n_draws = study.epochs * len(docs)
    results = []
    for seed, name in ((seed, name) for seed in study.seeds for name in study.orders):
        cell = f"{name}_seed{seed}"

        def work(name=name, seed=seed, cell=cell) -> dict:
            order = draw_order(name, labels, n_draws, study.epochs, seed=seed)
            if len(order) < n_draws:
                raise UsageError(
                    f"{name}: the clip allows only {len(order)} of {n_draws} draws; "
                    f"use R >= epochs ({study.epochs})"
                )
            drawn = docs.iloc[order].reset_index(drop=True).assign(position=np.arange(len(order)))
            result = train_and_score(
                drawn,
                held,
                init=init,
                study=study,
                steps=len(order) // study.train.batch_size,
                cell_dir=out / "cells" / cell,
                in_order=True,
            )
            counts = np.bincount(order, minlength=len(docs))
            result["rare_share_of_draws"] = float(rare[order].mean())
            result["rare_draws_per_doc_max"] = int(counts[rare].max())
            half = order[len(order) // 2 :]
            result["rare_share_second_half"] = float(rare[half].mean())
            return result

        result = cached_cell(out / "cells" / f"{cell}.json", work)
        result.update(order=name, seed=seed)
        result["overall_loss"] = mixed_loss(result, study.ratio, docs)
        results.append(result)
        echo(
            f"  {cell:<22} rare {result['rare_loss']:.4f}  common {result['common_loss']:.4f}  "
            f"mix {result['overall_loss']:.4f}  (rare share of draws "
            f"{result['rare_share_of_draws']:.3f}; {result['seconds']:.0f}s)"
        )
    table = pd.DataFrame(results)
    write_tables(out, table, ordering_summary(table, study, docs))
    return {"results": table}


def mixed_loss(result: dict, ratio: int, docs: pd.DataFrame) -> float:
    """Per-token held-out loss with the parts weighted as in training (ratio : 1 documents)."""
    rare_tokens = docs.loc[docs.part == "rare", "response"].str.len().mean()
    common_tokens = docs.loc[docs.part == "common", "response"].str.len().mean()
    w_common, w_rare = ratio * common_tokens, rare_tokens
    return float(
        (w_common * result["common_loss"] + w_rare * result["rare_loss"]) / (w_common + w_rare)
    )


def ordering_summary(table: pd.DataFrame, study: OrderingStudy, docs: pd.DataFrame) -> str:
    n = len(docs)
    lines = [
        "# Ordering study: held-out loss per token (lower is better)",
        "",
        f"{int((docs.part == 'common').sum())} common documents ({study.text}, "
        f"{study.doc_chars} chars) + {int((docs.part == 'rare').sum())} rare ({study.rare}); "
        f"{study.n_clusters} clusters; {study.epochs} x {n} = {study.epochs * n} draws, batch "
        f"{study.train.batch_size}, consumed in order; seeds {', '.join(map(str, study.seeds))} "
        "(mean ± sd over seeds).",
        "",
        "| order | rare loss | common loss | mix loss (training ratio) | rare share of draws "
        "| in the second half | most draws of one rare doc |",
        "|---|---|---|---|---|---|---|",
    ]

    def spread(values: pd.Series) -> str:
        sd = f" ± {values.std(ddof=1):.4f}" if len(values) > 1 else ""
        return f"{values.mean():.4f}{sd}"

    for order, runs in table.groupby("order", sort=False):
        lines.append(
            f"| {order} | {spread(runs.rare_loss)} | {spread(runs.common_loss)} | "
            f"{spread(runs.overall_loss)} | {runs.rare_share_of_draws.mean():.3f} | "
            f"{runs.rare_share_second_half.mean():.3f} | {runs.rare_draws_per_doc_max.max()} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- shared


def build_target(texts: pd.DataFrame, cfg: ModelConfig, max_length: int, directory: Path) -> str:
    """A tiny character-level GPT-2 over the texts' alphabet, saved once in `directory`."""
    from pipeline.data import atomic_dir
    from pipeline.model import build_char_tokenizer, build_tiny_model, save_model

    if not (directory / "config.json").exists():
        alphabet = "".join(sorted(set("".join(texts["prompt"]) + "".join(texts["response"]))))
        tokenizer = build_char_tokenizer(alphabet)
        model = build_tiny_model(dataclasses.replace(cfg, max_length=max_length), tokenizer, 0)
        with atomic_dir(directory) as tmp:
            save_model(model, tokenizer, tmp)
    return str(directory)


def _params(cfg: ModelConfig, init: str) -> int:
    """Parameters of a tiny GPT-2 of shape `cfg` with the target's vocabulary and length."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2Config.from_pretrained(init)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=base.vocab_size,
            n_positions=base.n_positions,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
        )
    )
    return sum(p.numel() for p in model.parameters())


def train_and_score(
    rows: pd.DataFrame,
    heldout: dict[str, pd.DataFrame],
    *,
    init: str,
    study,
    steps: int,
    cell_dir: Path,
    in_order: bool = False,
) -> dict:
    """Train the target from `init` on `rows` for `steps` steps; per-token loss of each
    held-out set's responses (`<name>_loss`, `<name>_tokens`)."""
    import shutil

    from pipeline.inference import worker_env
    from pipeline.train import TrainJob, train_generation

    started = time.perf_counter()
    if cell_dir.exists():  # an unfinished earlier attempt: start the cell again
        shutil.rmtree(cell_dir)
    job = TrainJob(
        init_model=init,
        steps=steps,
        seed=0,
        max_length=study.max_length,
        add_eos=True,
        in_order=in_order,
    )
    cfg = dataclasses.replace(study.train, steps=steps)
    state = train_generation(
        job, rows, str(cell_dir / "ray"), cfg, worker_env(), cell_dir / "model"
    )
    trained = time.perf_counter() - started
    result = {
        "rows": len(rows),
        "distinct_rows": int(rows.drop_duplicates(["prompt", "response"]).shape[0]),
        "steps": steps,
        "train_seconds": trained,
        "final_train_loss": state["log"][-1]["loss"] if state.get("log") else None,
    }
    for name, (loss, tokens) in heldout_losses(heldout, str(cell_dir / "model"), study).items():
        result[f"{name}_loss"], result[f"{name}_tokens"] = loss, tokens
    result["seconds"] = time.perf_counter() - started
    shutil.rmtree(cell_dir / "ray", ignore_errors=True)  # checkpoints: the model is kept
    return result


def heldout_losses(
    heldout: dict[str, pd.DataFrame], model_dir: str, study
) -> dict[str, tuple[float, int]]:
    """name -> (per-token loss over every response token of that set, token count) under a
    model; every set is scored by one actor pool."""
    from pipeline.inference import ScoreActor, map_with_actors

    rows = pd.concat(
        [frame[["prompt", "response"]].assign(part=name) for name, frame in heldout.items()],
        ignore_index=True,
    )
    scored = map_with_actors(
        rows,
        ScoreActor,
        workers=1,
        use_gpu=False,
        rows_per_batch=512,
        constructor_kwargs=dict(
            model_dir=model_dir,
            trust_remote_code=False,
            use_gpu=False,
            batch_size=32,
            max_length=study.max_length,
            add_eos=True,
            train_on_prompt=True,
        ),
    )
    losses = {}
    for name, part in scored.groupby("part", sort=False):
        tokens = part["tokens"].to_numpy()
        losses[name] = (
            float((part["loss"].to_numpy() * tokens).sum() / tokens.sum()),
            int(tokens.sum()),
        )
    return losses


def write_tables(out: Path, table: pd.DataFrame, summary: str) -> None:
    """`results.csv` (one row per cell) and `summary.md`, each written atomically."""
    from pipeline.data import atomic_path, write_text

    with atomic_path(out / "results.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_text(summary, out / "summary.md")


def cached_cell(path: Path, work: Callable[[], dict]) -> dict:
    """`work()`'s result, stored in `path` (JSON, atomically); a stored one is loaded."""
    from pipeline.data import write_json

    if path.exists():
        return json.loads(path.read_text())
    result = work()
    write_json(result, path)
    return result


def _save_npy(array: np.ndarray, path: Path) -> None:
    from pipeline.data import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
