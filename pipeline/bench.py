"""`genloop bench`: genloop's compute paths against the plainest alternative, on this machine.

    genloop bench [--out DIR] [--quick] [--only scoring,generation,...] [--repeats N]
                  [--config PRESET] [key=value ...]

Each benchmark runs genloop's path and a plain baseline side by side in one run, `--repeats`
times, and reports medians and the ratio genloop / baseline: loss scoring (ScoreActor pool,
1 and 2 workers, vs a batched single-process loop), generation (batched KV-cache generation vs
per-prompt HF generate), training (Ray Train + DeepSpeed, 1 and 2 workers, vs a plain torch
loop; the plain loop also as 2 processes, with torch DDP and with no communication at all, for
what 2 workers can get on this machine without Ray; during each step loop, what the workers
and every other process used of the cores), embedding (EmbedActor pool vs
sentence-transformers), and one generation of the default run end to end (time per stage,
share outside model compute). The hardware limit (fp32 matmul FLOP/s) is always measured
first, for each path's model FLOP utilisation. Writes
`DIR/bench.json` and `DIR/bench.md` (the tables, the machine, and each target met or not).
Sizes come from the run config (the embedded default unless --config / key=value);
`--quick` shrinks everything to a smoke test of a minute or two.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS = ("scoring", "generation", "training", "embedding", "end_to_end")

# --quick: the default run, shrunk so that every path runs in seconds. Its generation 0 is
# barely trained and gets almost no answer right, so the filter would leave a near-empty mix:
# the quick end-to-end generation keeps every sample instead (the same work per stage).
QUICK_OVERRIDES = [
    "curate.strategy=none",
    "diagnostics.mix_embedding_rows=0",
    "task.seed_examples=128",
    "task.pool_prompts=64",
    "task.heldout_prompts=32",
    "task.validation_prompts=16",
    "loop.gen0_steps=20",
    "loop.gen0_eval_every=10",
    "train.steps=10",
    "train.batch_size=16",
    "train.warmup_steps=2",
    "generate.batch_size=32",
    "score.batch_size=64",
    "eval.batch_size=32",
]


@dataclass(frozen=True)
class Target:
    """A goal from the issue: `lookup` leads to a {"steady": ..., "whole": ...} node of the
    results; the verdict is on "steady" (the whole call is shown beside it)."""

    key: str
    description: str
    lookup: tuple[str, ...]
    threshold: float
    at_least: bool = True  # ratio >= threshold (else share <= threshold)


TARGETS = (
    Target(
        "scoring_1w",
        "scoring, 1 worker / single-process loop",
        ("scoring", "ratios", "genloop_1w"),
        0.9,
    ),
    Target(
        "scoring_2w",
        "scoring, 2 workers / single-process loop",
        ("scoring", "ratios", "genloop_2w"),
        1.6,
    ),
    Target(
        "generation",
        "generation, actor pool / per-prompt generate",
        ("generation", "ratios", "genloop_pool"),
        5.0,
    ),
    Target(
        "training_1w",
        "training, 1 worker / plain loop",
        ("training", "ratios", "genloop_1w"),
        0.85,
    ),
    Target(
        "training_scaling",
        "training scaling efficiency, 1 -> 2 workers (same CPUs per worker)",
        ("training", "scaling"),
        0.80,
    ),
    Target(
        "overhead",
        "share of a generation's wall time outside model compute",
        ("end_to_end", "outside_compute"),
        0.20,
        at_least=False,
    ),
)


def register(commands) -> None:
    parser = commands.add_parser(
        "bench",
        help="benchmark genloop's paths against plain baselines on this machine",
        description=__doc__.split("\n\n")[2] if __doc__ else None,
    )
    parser.add_argument("--out", help="result directory (default: runs/bench-<time>)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, 1 repetition: a smoke test"
    )
    parser.add_argument(
        "--only",
        help=f"comma-separated benchmarks (default: all of {','.join(BENCHMARKS)})",
    )
    parser.add_argument(
        "--repeats", type=int, help="repetitions per path (default 3; 1 with --quick)"
    )
    parser.add_argument("--config", help="a preset YAML (default: the embedded default)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.n_layer=4"
    )
    parser.set_defaults(handler=cmd_bench)


def parse_only(text: str | None) -> list[str]:
    """`--only` -> benchmark names in the order they run; raises UsageError on unknown ones."""
    from pipeline.cli import UsageError

    if text is None:
        return list(BENCHMARKS)
    names = [n.strip().replace("-", "_") for n in text.split(",") if n.strip()]
    names = ["end_to_end" if n in ("e2e", "end2end") else n for n in names]
    unknown = [n for n in names if n not in BENCHMARKS and n != "hardware"]
    if unknown or not names:
        what = f"unknown benchmark {', '.join(unknown)}" if unknown else "names no benchmark"
        raise UsageError(f"--only {text!r}: {what}; choose from {','.join(BENCHMARKS)}")
    return [n for n in BENCHMARKS if n in names]


def cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.bench_stages import BenchSettings
    from pipeline.cli import UsageError, make_output_dir, path_or_default
    from pipeline.config import load_config

    only = parse_only(args.only)
    if args.repeats is not None and args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats}: must be at least 1")
    overrides = [*(QUICK_OVERRIDES if args.quick else []), *args.overrides]
    cfg = load_config(args.config, overrides)
    if cfg.train.use_gpu:
        raise UsageError("genloop bench times the CPU paths; drop train.use_gpu")
    if cfg.ray.address:
        raise UsageError("genloop bench starts its own local Ray; drop ray.address")
    settings = BenchSettings()
    if args.quick:
        settings = dataclasses.replace(
            settings,
            repeats=1,
            baseline_prompts=8,
            embed_texts=32,
            matmul_sizes=(128, 256),
            matmul_seconds=0.1,
        )
    if args.repeats is not None:
        settings = dataclasses.replace(settings, repeats=args.repeats)
    # Made now: the results come after minutes of work.
    default = f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(path_or_default(args.out, "--out", default))
    if out.is_dir() and any(out.iterdir()):  # an earlier bench.json would be replaced
        raise UsageError(f"--out {out}: not empty; choose a new directory")
    out = make_output_dir(out, "--out")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    result = run_bench(cfg, settings, only, quick=args.quick, overrides=overrides)
    from pipeline.data import write_json, write_text

    markdown = format_markdown(result)
    write_json(result, out / "bench.json")
    write_text(markdown, out / "bench.md")
    print()
    print(markdown)
    print(f"genloop bench: {out.resolve()}/bench.json, bench.md")
    failed = [name for name, b in result["benchmarks"].items() if "error" in b]
    if failed:
        print(f"genloop bench: failed: {', '.join(failed)} (see above)", file=sys.stderr)
        return 1
    return 0


def run_bench(cfg, settings, only: list[str], *, quick: bool, overrides: list[str]) -> dict:
    """Every chosen benchmark, in order, on one local Ray; returns the JSON-ready result."""
    import ray

    from cluster.connect import connect
    from pipeline import bench_stages
    from pipeline.bench_probes import PROBE_DIR_ENV
    from pipeline.cli import UsageError
    from pipeline.inference import quiet_logs, worker_env

    if ray.is_initialized():
        raise UsageError("genloop bench starts its own local Ray; Ray is already initialised")

    def echo(line: str) -> None:
        print(line, flush=True)

    started = time.time()
    machine = describe_machine()
    echo(f"[bench] {machine_line(machine)}")
    work_dir = bench_stages.temporary_dir()
    probe_dir = work_dir / "probes"
    probe_dir.mkdir()
    result: dict = {
        "genloop_bench": 1,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "quick": quick,
        "settings": dataclasses.asdict(settings),
        "overrides": overrides,
        "machine": machine,
        "benchmarks": {},
    }
    try:
        # The hardware limit first, before Ray's processes share the cores.
        hardware = bench_stages.bench_hardware(settings, echo)
        result["hardware"] = hardware
        peaks = {int(k): v for k, v in hardware["peak_flops_per_s"].items()}
        ray_started = time.perf_counter()
        connect(
            None,
            num_cpus=cfg.ray.num_cpus,
            env=dict(worker_env(), **{PROBE_DIR_ENV: str(probe_dir)}),
            log_to_driver=False,
        )
        quiet_logs()
        result["ray_start_s"] = time.perf_counter() - ray_started
        result["ray_cpus"] = int(ray.cluster_resources().get("CPU", 0))
        ctx = bench_stages.make_context(cfg, settings, work_dir, probe_dir, echo)
        runners = {
            "scoring": bench_stages.bench_scoring,
            "generation": bench_stages.bench_generation,
            "training": bench_stages.bench_training,
            "embedding": bench_stages.bench_embedding,
            "end_to_end": bench_stages.bench_end_to_end,
        }
        for name in only:
            echo(f"[bench] == {name} ==")
            began = time.perf_counter()
            try:
                raw = runners[name](ctx)
            except Exception as e:  # keep the other benchmarks' results; exit status says it
                traceback.print_exc()
                result["benchmarks"][name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            raw["bench_seconds"] = time.perf_counter() - began
            summary = (
                summarize_end_to_end(raw, peaks, result["ray_cpus"])
                if name == "end_to_end"
                else summarize_benchmark(name, raw, peaks)
            )
            result["benchmarks"][name] = summary
    finally:
        ray.shutdown()
        shutil.rmtree(work_dir, ignore_errors=True)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    result["seconds"] = time.time() - started
    result["targets"] = check_targets(result["benchmarks"])
    return result


# --------------------------------------------------------------------------- machine


def describe_machine() -> dict:
    """CPU, cores, memory, library versions, torch threads, GPUs, and the load right now."""
    import importlib.metadata as metadata

    import torch

    cpuinfo = _read("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    cores = {
        tuple(block)
        for block in _cpuinfo_blocks(cpuinfo, ("physical id", "core id"))
        if len(block) == 2
    }
    versions = {}
    for package in (
        "torch",
        "ray",
        "deepspeed",
        "transformers",
        "sentence-transformers",
        "genloop",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = None
    return {
        "cpu": models[0] if models else (platform.processor() or platform.machine()),
        "logical_cores": os.cpu_count(),
        "physical_cores": len(cores) or None,
        "usable_cores": usable,
        "ram_gib": round(ram, 1) if ram else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "gpus": gpus,
        "load_average_start": list(os.getloadavg()),
    }


def _read(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _cpuinfo_blocks(lines: list[str], keys: tuple[str, ...]) -> list[list[str]]:
    blocks, block = [], {}
    for line in [*lines, ""]:
        if not line.strip():
            if block:
                blocks.append([block[k] for k in keys if k in block])
            block = {}
            continue
        key, _, value = line.partition(":")
        if key.strip() in keys:
            block[key.strip()] = value.strip()
    return blocks


def machine_line(m: dict) -> str:
    v = m["versions"]
    gpu = ", ".join(m["gpus"]) if m["gpus"] else "no GPU"
    load = m["load_average_start"][0]
    return (
        f"{m['cpu']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), "
        f"{m['ram_gib']} GiB RAM; torch {v['torch']} ({m['torch_threads']} threads), "
        f"ray {v['ray']}, deepspeed {v['deepspeed']}, transformers {v['transformers']}; {gpu}; "
        f"load average {load:.2f} at start"
    )


def busy_machine(m: dict) -> bool:
    """Was something else using the cores when the bench started (timings distorted)?"""
    return m["load_average_start"][0] > 0.5 * max(1, m["usable_cores"] or 1)


# --------------------------------------------------------------------------- arithmetic


def median(values) -> float | None:
    """Median of the finite values; None when there are none."""
    finite = sorted(
        float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))
    )
    if not finite:
        return None
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def rates(work: list[float], seconds: list[float]) -> list[float | None]:
    return [w / s if s and s > 0 else None for w, s in zip(work, seconds)]


def model_flops(params: int, tokens: float, training: bool) -> float:
    """~6 x params x tokens for a training step (forward + backward), ~2 x for a forward."""
    return (6.0 if training else 2.0) * params * tokens


def peak_flops(peaks: dict[int, float], threads: int | None) -> float | None:
    """The hardware limit for work on `threads` threads: the best matmul FLOP/s measured at
    that many threads or fewer (more threads never lower the limit: a program could use
    fewer), or, for a thread count above every measured one, threads x the best rate per
    thread."""
    if not peaks or not threads:
        return None
    if threads > max(peaks):
        return threads * max(v / t for t, v in peaks.items())
    return max(v for t, v in peaks.items() if t <= threads)


def mfu(flops: float | None, seconds: float | None, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved model FLOP/s over the measured peak."""
    if not flops or not seconds or not peak:
        return None
    return flops / seconds / peak


def summarize_path(path: dict, peaks: dict[int, float]) -> dict:
    """Medians of one path's repetitions: throughput (steady and whole call) and MFU."""
    steady = median(rates(path["work"], path["steady_s"]))
    whole = median(rates(path["work"], path["whole_s"]))
    flop_rate = median(rates(path["flops"], path["steady_s"]))
    peak = peak_flops(peaks, path.get("threads"))
    return {
        **path,
        "steady_per_s": steady,
        "whole_per_s": whole,
        "steady_s_median": median(path["steady_s"]),
        "whole_s_median": median(path["whole_s"]),
        "model_flops_per_s": flop_rate,
        "peak_flops_per_s": peak,
        "mfu": ratio(flop_rate, peak),
        "extra_median": {k: _median_or_last(v) for k, v in path.get("extra", {}).items()},
    }


def _median_or_last(values: list):
    """The median of numbers; of anything else (a list of the top CPU users), the last
    repetition's."""
    if any(isinstance(v, (list, dict, str)) for v in values):
        return values[-1]
    return median(values)


def summarize_benchmark(name: str, raw: dict, peaks: dict[int, float]) -> dict:
    """Each path's medians, every genloop path's ratio to the baseline, and (training) the
    scaling efficiency from 1 to 2 workers."""
    if "skipped" in raw:
        return raw
    paths = {key: summarize_path(p, peaks) for key, p in raw["paths"].items()}
    base = paths["baseline"]
    ratios = {
        key: {
            "steady": ratio(p["steady_per_s"], base["steady_per_s"]),
            "whole": ratio(p["whole_per_s"], base["whole_per_s"]),
            "steady_range": per_repetition_range(p, base),
        }
        for key, p in paths.items()
        if key != "baseline"
    }
    out = {**raw, "paths": paths, "ratios": ratios}
    if name == "training" and "genloop_1w" in paths and "genloop_2w" in paths:
        # Scaling: each added worker brings its own CPUs, so 2 workers are compared with one
        # worker that has what each of them has. Where the bench also ran one worker on the
        # whole machine, `scaling_same_machine` compares with that.
        one = scaling_reference(paths)
        out["scaling_reference"] = one
        out["scaling"] = _scaling(paths, one)
        if one != "genloop_1w":
            out["scaling_same_machine"] = _scaling(paths, "genloop_1w")
        if "genloop_2w_weak" in paths:
            # Weak scaling, the usual data-parallel measure: each worker keeps the batch one
            # worker had, so 2 workers train a global batch twice as large.
            out["scaling_weak"] = _scaling(paths, one, many="genloop_2w_weak")
        # The same 1 -> 2 step without Ray, from the plain loop at one thread: torch DDP, and
        # two processes that never communicate (the most the machine gives a second worker).
        for plain in ("plain_ddp_2w", "plain_alone_2w"):
            if plain in paths and "baseline_1t" in paths:
                out[f"scaling_{plain}"] = _scaling(paths, "baseline_1t", many=plain)
    return out


def scaling_reference(paths: dict) -> str:
    """The 1-worker path that 2 workers are measured against: the one with a 2-worker's CPUs."""
    same = [key for key in paths if key.startswith("genloop_1w_") and key.endswith("cpu")]
    return same[0] if same else "genloop_1w"


def _scaling(paths: dict, one: str, many: str = "genloop_2w") -> dict:
    out = {
        kind: scaling_efficiency(paths[one][f"{kind}_per_s"], paths[many][f"{kind}_per_s"], 2)
        for kind in ("steady", "whole")
    }
    spread = per_repetition_range(paths[many], paths[one])
    out["steady_range"] = None if spread is None else [v / 2 for v in spread]
    return out


def per_repetition_range(path: dict, reference: dict) -> list[float] | None:
    """[lowest, highest] of the steady ratio path / reference, repetition by repetition (the
    bench runs a repetition of every path before the next): how far the median can be
    trusted on a noisy machine. None with fewer than 2 repetitions."""
    mine = rates(path["work"], path["steady_s"])
    theirs = rates(reference["work"], reference["steady_s"])
    values = [ratio(a, b) for a, b in zip(mine, theirs)]
    values = [v for v in values if v is not None]
    return [min(values), max(values)] if len(values) >= 2 else None


def scaling_efficiency(one: float | None, many: float | None, workers: int) -> float | None:
    """Throughput at `workers` over `workers` x the throughput at one."""
    return ratio(many, None if one is None else workers * one)


def summarize_end_to_end(raw: dict, peaks: dict[int, float], cpus: int) -> dict:
    """Per-generation wall, compute and overhead; medians over generations 1.. per stage."""
    peak = peak_flops(peaks, cpus)
    stages = raw["stages"]
    for s in stages:
        s["mfu_wall"] = mfu(s.get("flops"), s["seconds"], peak)
        s["mfu_compute"] = mfu(s.get("flops"), s["compute_s"], peak)
    generations = []
    for g in sorted({s["generation"] for s in stages}):
        mine = [s for s in stages if s["generation"] == g]
        wall = max(s["end"] for s in mine) - min(s["start"] for s in mine)
        compute = sum(s["compute_s"] for s in mine)
        generations.append(
            {
                "generation": g,
                "wall_s": wall,
                "compute_s": compute,
                "outside_compute_share": 1 - compute / wall if wall > 0 else None,
                "startup_s": sum(s["startup_s"] for s in mine),
                "idle_s": sum(s["idle_s"] for s in mine),
                "tail_s": sum(s["tail_s"] for s in mine),
                "driver_s": sum(s["seconds"] for s in mine if s["stage"] not in MODEL_STAGES),
                "flops": sum(s.get("flops") or 0.0 for s in mine),
            }
        )
    later = [g for g in generations if g["generation"] > 0] or generations
    per_stage = {}
    for name in dict.fromkeys(s["stage"] for s in stages if s["generation"] > 0):
        rows = [s for s in stages if s["stage"] == name and s["generation"] > 0]
        per_stage[name] = {
            key: median(r.get(key) for r in rows)
            for key in (
                "seconds",
                "compute_s",
                "startup_s",
                "idle_s",
                "tail_s",
                "other_s",
                "tokens",
                "mfu_wall",
                "mfu_compute",
            )
        }
    share = median(g["outside_compute_share"] for g in later)
    return {
        **raw,
        "peak_flops_per_s": peak,
        "generations": generations,
        "per_stage": per_stage,
        "wall_s": median(g["wall_s"] for g in later),
        "compute_s": median(g["compute_s"] for g in later),
        "outside_compute": {"steady": share, "whole": share},
        "breakdown": {
            key: median(g[key] for g in later)
            for key in ("startup_s", "idle_s", "tail_s", "driver_s")
        },
        "mfu_wall": mfu(
            median(g["flops"] for g in later), median(g["wall_s"] for g in later), peak
        ),
    }


MODEL_STAGES = ("generate", "score", "train", "evaluate")


# --------------------------------------------------------------------------- targets


def check_targets(benchmarks: dict) -> list[dict]:
    """Every target with its measured value, the whole-call value, and met / not met
    (None where the benchmark was not run)."""
    rows = []
    for t in TARGETS:
        node = benchmarks
        for key in t.lookup:
            node = node.get(key) if isinstance(node, dict) else None
        node = node or {}
        value, whole, spread = node.get("steady"), node.get("whole"), node.get("steady_range")
        met = None
        if value is not None:
            met = value >= t.threshold if t.at_least else value <= t.threshold
        rows.append(
            {
                "key": t.key,
                "description": t.description,
                "threshold": t.threshold,
                "comparison": ">=" if t.at_least else "<=",
                "value": value,
                "whole_call": whole,
                "range": spread,
                "met": met,
                "why": None if met in (True, None) else explain(t.key, benchmarks),
            }
        )
    return rows


def _one_thread_note(bench: dict, path: str) -> list[str]:
    """How much of a gap the thread count explains, from the 1-thread baseline."""
    one_thread = bench["ratios"].get("baseline_1t", {}).get("steady")
    mine = bench["ratios"].get(path, {}).get("steady")
    if not one_thread or not mine:
        return []
    threads = bench["paths"]["baseline"].get("threads")
    return [
        f"the plain loop at 1 thread runs at {one_thread:.2f}x its {threads}-thread speed, and "
        f"genloop at {mine / one_thread:.2f}x the 1-thread plain loop"
    ]


def explain(key: str, b: dict) -> str:
    """What limits an unmet target, in one line, from the measurements themselves."""
    parts: list[str] = []
    if key in ("scoring_1w", "scoring_2w", "generation"):
        bench = b["generation" if key == "generation" else "scoring"]
        path = bench["paths"]["genloop_pool" if key == "generation" else f"genloop_{key[-2]}w"]
        base = bench["paths"]["baseline"]
        extra = path["extra_median"]
        if (path.get("threads") or 0) < (base.get("threads") or 0):
            parts.append(
                f"the pool computes with {path['threads']} torch thread(s) in all (Ray sets "
                f"OMP_NUM_THREADS to each actor's CPUs), the baseline with {base['threads']}"
            )
        parts += _one_thread_note(
            bench, "genloop_pool" if key == "generation" else f"genloop_{key[-2]}w"
        )
        if extra.get("busy_fraction") is not None and extra["busy_fraction"] < 0.9:
            parts.append(f"actors busy {extra['busy_fraction']:.0%} of the pool's span")
        if key == "generation":
            inproc = bench["ratios"].get("genloop_inproc", {}).get("steady")
            if inproc is not None:
                parts.append(f"batched generate in one process is {inproc:.1f}x per-prompt")
        whole, steady = path.get("whole_s_median"), path.get("steady_s_median")
        if extra.get("startup_s") and whole:
            parts.append(
                f"a call spends {extra['startup_s']:.1f}s of {whole:.1f}s before the first batch "
                f"(per actor: {extra.get('actor_imports_s') or 0:.1f}s importing torch/"
                f"transformers, {extra.get('actor_init_s') or 0:.1f}s loading the model; the "
                "rest is Ray Data planning, scheduling and process start), "
                f"{steady or 0:.1f}s computing"
            )
    elif key in ("training_1w", "training_scaling"):
        bench = b["training"]
        p = bench["paths"]
        one, base = p["genloop_1w"], p["baseline"]
        if key == "training_1w":
            if (one.get("threads") or 0) < (base.get("threads") or 0):
                parts.append(
                    f"the worker trains with {one['threads']} torch thread(s), the plain loop "
                    f"with {base['threads']}"
                )
            parts += _one_thread_note(bench, "genloop_1w")
            parts.append(
                f"step {one['extra_median'].get('step_ms', 0):.1f} ms vs "
                f"{base['extra_median'].get('step_ms', 0):.1f} ms in the plain loop"
            )
        else:
            two = p.get("genloop_2w", {})
            reference = p[bench.get("scaling_reference", "genloop_1w")]
            step_one = reference["extra_median"].get("step_ms") or 0
            parts.append(
                f"step {two.get('extra_median', {}).get('step_ms') or 0:.1f} ms at 2 workers "
                f"(half the batch each, plus a gradient all-reduce) vs {step_one:.1f} ms at 1 "
                f"with {reference.get('threads') or '?'} thread(s) "
                f"(linear scaling: {step_one / 2:.1f} ms)"
            )
            weak = bench.get("scaling_weak", {}).get("steady")
            if weak is not None:
                step_weak = p["genloop_2w_weak"]["extra_median"].get("step_ms") or 0
                parts.append(
                    f"with the batch per worker of 1 worker (weak scaling) {weak:.0%}: "
                    f"step {step_weak:.1f} ms at 2 workers vs {step_one:.1f} ms at 1"
                )
            cpu = two.get("extra_median", {})
            if cpu.get("worker_cpu") is not None:
                top = ", ".join(f"{name} {share:.0%}" for name, share in cpu["other_top"][:3])
                parts.append(
                    f"while 2 workers stepped, each ran {cpu['worker_cpu']:.0%} of a core, "
                    f"other processes took {cpu['other_cpu']:.0%} of one ({top}), and "
                    f"{cpu['idle_cpu']:.0%} of one sat idle"
                )
            ddp = bench.get("scaling_plain_ddp_2w", {}).get("steady")
            alone = bench.get("scaling_plain_alone_2w", {}).get("steady")
            if ddp is not None and alone is not None:
                parts.append(
                    f"without Ray, the plain loop scales {ddp:.0%} as torch DDP and {alone:.0%} "
                    "as two processes that never communicate (the machine's own limit for "
                    "this step)"
                )
        e = one["extra_median"]
        if e.get("startup_s") is not None:
            parts.append(
                f"per call {e['startup_s']:.1f}s Ray Train start-up + "
                f"{e.get('worker_setup_s', 0):.1f}s model load/DeepSpeed init + "
                f"{e.get('teardown_s', 0):.1f}s teardown around a "
                f"{one.get('steady_s_median') or 0:.1f}s step loop"
            )
    elif key == "overhead":
        e = b["end_to_end"]
        wall = e.get("wall_s") or 0
        costs = {}
        for name, s in e["per_stage"].items():
            if name in MODEL_STAGES:
                costs[f"{name} start-up"] = s.get("startup_s") or 0
                costs[f"{name} idle actors"] = s.get("idle_s") or 0
                costs[f"{name} after compute"] = s.get("tail_s") or 0
                costs[f"{name} other"] = s.get("other_s") or 0
            else:
                costs[f"{name} (driver)"] = s.get("seconds") or 0
        top = sorted(costs.items(), key=lambda kv: -kv[1])[:3]
        parts.append(
            f"of a {wall:.1f}s generation, "
            + ", ".join(f"{name} {sec:.1f}s" for name, sec in top if sec > 0)
        )
    return "; ".join(parts)


# --------------------------------------------------------------------------- markdown


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:{spec}}"
    if text.startswith("-") and not text.strip("-0.,%"):
        text = text[1:]  # -0.0: a rounding residue, not a negative time
    return f"{text}{suffix}"


def _rate(value) -> str:
    return _fmt(value, ",.0f")


def format_markdown(result: dict) -> str:
    """The whole report: machine, hardware limit, per-path table, end to end, targets."""
    m = result["machine"]
    lines = [f"# genloop bench, {result['started']}", ""]
    lines.append(f"Machine: {machine_line(m)}.")
    if busy_machine(m):
        lines.append(
            f"**Warning:** load average {m['load_average_start'][0]:.2f} on "
            f"{m['usable_cores']} cores when the bench started: something else was running, "
            "so these timings are distorted."
        )
    lines.append(
        f"Repetitions: {result['settings']['repeats']} (medians below)"
        + ("; --quick sizes" if result.get("quick") else "")
        + (f"; overrides: {' '.join(result['overrides'])}" if result.get("overrides") else "")
        + f". Local Ray with {result.get('ray_cpus', '?')} CPUs "
        f"(started in {_fmt(result.get('ray_start_s'), '.1f', 's')})."
    )
    hw = result.get("hardware")
    if hw:
        peaks = ", ".join(
            f"{t} thread(s) {v / 1e9:.1f} GFLOP/s" for t, v in hw["peak_flops_per_s"].items()
        )
        lines += ["", f"Hardware limit (torch fp32 matmul, best size): {peaks}."]
        measured = {int(t): v for t, v in hw["peak_flops_per_s"].items()}
        if len(measured) > 1 and measured[max(measured)] < measured[min(measured)]:
            lines.append(
                f"**Warning:** matmul at {max(measured)} threads was slower than at "
                f"{min(measured)}: the cores were shared, so every multi-threaded path (the "
                "default-thread baselines especially) is distorted."
            )
        if hw.get("gpu_matmul"):
            lines.append(
                "GPU matmul: "
                + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in hw["gpu_matmul"].items())
            )
    lines += [
        "",
        "## Throughput",
        "",
        "Steady: compute once actors/workers are up (inference workers: a second call on the "
        "workers of the first, as a run keeps them; the training step loop); whole call: what "
        "the caller waits for, start-up and model load included (both for baselines too; "
        "inference workers: the first call, on new workers). Ratio: genloop / baseline. "
        "MFU: model FLOPs (2 x params x tokens forward, 6 x training) per second over the "
        "measured matmul peak at the path's thread count.",
        "",
        "| benchmark | path | threads | steady /s | whole call /s | ratio steady | ratio whole "
        "| MFU steady | start-up s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, bench in result["benchmarks"].items():
        if name == "end_to_end":
            continue
        if "skipped" in bench or "error" in bench:
            why = (
                f"skipped: {bench['skipped']}"
                if "skipped" in bench
                else f"failed: {bench['error']}"
            )
            lines.append(f"| {name} | {why} | | | | | | | |")
            continue
        for key, p in bench["paths"].items():
            r = bench["ratios"].get(key, {})
            startup = p["extra_median"].get("startup_s")
            lines.append(
                f"| {name} | {p['label']} | {p.get('threads') or '-'} | "
                f"{_rate(p['steady_per_s'])} | {_rate(p['whole_per_s'])} | "
                f"{_fmt(r.get('steady'), '.2f', 'x') if key != 'baseline' else '1'} | "
                f"{_fmt(r.get('whole'), '.2f', 'x') if key != 'baseline' else '1'} | "
                f"{_fmt(p['mfu'], '.1%')} | {_fmt(startup, '.1f')} |"
            )
        scalings = [
            ("scaling", "same CPUs per worker"),
            ("scaling_weak", "same CPUs and batch per worker (weak scaling)"),
            ("scaling_same_machine", "vs 1 worker on every CPU"),
            ("scaling_plain_ddp_2w", "plain torch DDP, no Ray (vs the 1-thread plain loop)"),
            (
                "scaling_plain_alone_2w",
                "two plain processes that never communicate (the machine's limit)",
            ),
        ]
        for field_name, what in scalings:
            if field_name in bench:
                lines.append(
                    f"| {name} | scaling efficiency 1 -> 2 workers, {what} | | | | "
                    f"{_fmt(bench[field_name]['steady'], '.0%')} | "
                    f"{_fmt(bench[field_name]['whole'], '.0%')} | | |"
                )
    mfus = [
        p["mfu"]
        for b in result["benchmarks"].values()
        for p in b.get("paths", {}).values()
        if p.get("mfu") is not None
    ]
    if any(m > 1 for m in mfus):
        lines += [
            "",
            "MFU above 100%: the matmul peak was measured while something else used the cores; "
            "rerun on an idle machine.",
        ]
    units = {
        n: b.get("what")
        for n, b in result["benchmarks"].items()
        if n != "end_to_end" and b.get("what")
    }
    if units:
        lines += ["", *[f"- {name}: {what}" for name, what in units.items()]]
    scoring = result["benchmarks"].get("scoring", {})
    if scoring.get("genloop_forward_tokens") and scoring.get("tokens"):
        lines.append(
            f"- scoring: genloop puts {scoring['genloop_forward_tokens']:,.0f} of the "
            f"{scoring['tokens']:,.0f} tokens through the model (a prompt that k samples share "
            "runs once; the losses are the same); tokens/s count all of them for both paths"
        )
    e2e = result["benchmarks"].get("end_to_end")
    if e2e and "error" in e2e:
        lines += ["", f"End to end failed: {e2e['error']}"]
    elif e2e:
        lines += _e2e_markdown(e2e)
    lines += [
        "",
        "## Targets",
        "",
        "Measured: the steady ratio of medians; range: the lowest and highest ratio of single "
        "repetitions.",
        "",
        "| target | goal | measured | range | whole call | verdict |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for t in result.get("targets", []):
        spec = ".0%" if t["key"] in ("overhead", "training_scaling") else ".2f"
        unit = "" if spec == ".0%" else "x"
        goal = f"{t['comparison']} {t['threshold']:{spec}}{unit}"
        verdict = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
        spread = t.get("range")
        spread = f"{spread[0]:{spec}}-{spread[1]:{spec}}" if spread else "-"
        lines.append(
            f"| {t['description']} | {goal} | {_fmt(t['value'], spec, unit)} | {spread} | "
            f"{_fmt(t['whole_call'], spec, unit)} | {verdict} |"
        )
    unmet = [t for t in result.get("targets", []) if t["met"] is False and t["why"]]
    if unmet:
        lines += ["", *[f"- {t['key']} not met: {t['why']}." for t in unmet]]
    lines += ["", f"Bench wall time: {_fmt(result.get('seconds'), '.0f', 's')}.", ""]
    return "\n".join(lines)


def _stage_start(e: dict, segment: dict) -> float:
    """When the pool of `segment` was asked for: its stage's start, or the end of the
    stage's previous segment."""
    for stage in e["stages"]:
        segments = stage.get("segments", [])
        if segment in segments:
            i = segments.index(segment)
            return segments[i - 1]["last"] if i > 0 else stage["start"]
    return segment["first"]


def _e2e_markdown(e: dict) -> list[str]:
    lines = [
        "",
        "## End to end",
        "",
        f"{e['what']}. Per stage, median over generations 1..: wall time, model compute "
        "(actor batch time / actors; the training step loop), start-up (before the first "
        "batch, or around the step loop), idle actors, after compute (collecting, writing).",
        "",
        "| stage | wall s | compute s | start-up s | idle s | after s | other s | MFU wall | "
        "MFU compute |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in e["per_stage"].items():
        lines.append(
            f"| {name} | {_fmt(s['seconds'], '.1f')} | {_fmt(s['compute_s'], '.1f')} | "
            f"{_fmt(s['startup_s'], '.1f')} | {_fmt(s['idle_s'], '.1f')} | "
            f"{_fmt(s['tail_s'], '.1f')} | {_fmt(s['other_s'], '.1f')} | "
            f"{_fmt(s['mfu_wall'], '.1%')} | {_fmt(s['mfu_compute'], '.1%')} |"
        )
    share = e["outside_compute"]["steady"]
    lines.append(
        f"| **generation** | {_fmt(e['wall_s'], '.1f')} | {_fmt(e['compute_s'], '.1f')} | "
        f"{_fmt(e['breakdown']['startup_s'], '.1f')} | {_fmt(e['breakdown']['idle_s'], '.1f')} | "
        f"{_fmt(e['breakdown']['tail_s'], '.1f')} | | {_fmt(e['mfu_wall'], '.1%')} | |"
    )
    pools = [seg for s in e["stages"] for seg in s.get("segments", []) if "actors" in seg]
    if pools:
        wait = median(seg["first"] - _stage_start(e, seg) for seg in pools)
        imports = median(seg["actor_imports_s"] for seg in pools)
        load = median(seg["actor_init_s"] for seg in pools)
        lines += [
            "",
            f"Inference start-up, median over the run's {len(pools)} inference calls: "
            f"{_fmt(wait, '.1f')}s from asking for the workers (stage start, or the previous "
            f"call's end) to the first batch; a new worker spends {_fmt(imports, '.1f')}s "
            f"importing genloop's modules (torch, transformers), and a call "
            f"{_fmt(load, '.1f')}s loading the model (none while a kept worker has it).",
        ]
    gen0 = next((g for g in e["generations"] if g["generation"] == 0), None)
    lines += [
        "",
        f"Outside model compute: {_fmt(share, '.0%')} of a generation's wall time"
        + (
            f"; generation 0 (seed training with early-stop evaluations): "
            f"{gen0['wall_s']:.1f}s, {_fmt(gen0['outside_compute_share'], '.0%')} outside compute"
            if gen0
            else ""
        )
        + ".",
    ]
    return lines
