"""The benchmarks behind `genloop bench`: genloop's path and a plain baseline, side by side.

Each `bench_*` function runs genloop's own code path and the plainest alternative a user
could write, `settings.repeats` times, interleaved (baseline, then genloop, every repetition),
and returns a JSON-ready dict with, per path, the work done and the seconds per repetition.
`pipeline.bench` turns those into medians, ratios, FLOP utilisation and target checks.

What is timed, per repetition:
- whole call: what a user waits for. genloop's Ray paths: the driver-side call
  (`map_with_actors`, `train_generation`, `embed_texts`), actor or worker start-up and model
  loading included. Baselines: loading the model, then the loop (and, training, the save).
- steady state: the compute once everything is up. Actor pools: each actor's rows over its
  own span from its first batch's start to its last batch's end, summed over the actors
  (actor start-up, and start-up skew between actors, left out; an actor waiting for its next
  block counts). Training: the step loop, as the rank-0 worker times it itself (data
  iteration, tokenization, steps and the final checkpoint). Baselines: the loop alone
  (tokenization included, the model load not; training includes the final save).

Baselines run in the driver process with torch's default thread count, as a user's script
would (ratios are against that); scoring and training also time their baseline at one thread,
to tell how much of a one-worker gap is the thread count. Ray's actors and training workers
get one torch thread per CPU they hold (Ray sets OMP_NUM_THREADS), one CPU each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import bench_probes
from pipeline.bench import model_flops
from pipeline.bench_plain import (
    IGNORE,
    PlainTraining,
    load_plain,
    plain_batch,
    start_ids,
    train_loop,
    train_rank,
)
from pipeline.config import RunConfig
from pipeline.loop import Progress
from pipeline.tasks import Task


@dataclass
class BenchSettings:
    """Sizes of the benchmarks themselves (the model, task and batch sizes come from the run
    config: the embedded default unless --config / key=value say otherwise)."""

    repeats: int = 3  # repetitions of every timed path; medians are reported
    baseline_prompts: int = 200  # prompts the per-prompt generate baseline is timed on (slow)
    embed_texts: int = 500  # texts the embedding benchmark encodes
    embed_batch_size: int = 64  # texts per encoder forward (genloop select's default)
    matmul_sizes: tuple[int, ...] = (256, 512, 1024, 2048)  # square fp32 matmuls timed
    matmul_seconds: float = 0.5  # seconds each matmul size is timed, per thread count
    workers: tuple[int, ...] = (1, 2)  # actor-pool / data-parallel sizes compared


@dataclass
class BenchContext:
    """What every benchmark needs: the run config, its task, and where things go."""

    cfg: RunConfig
    task: Task
    settings: BenchSettings
    work_dir: Path  # models, Ray Train storage, the end-to-end run (removed afterwards)
    probe_dir: Path  # timing records from inside Ray workers (bench_probes)
    model_dir: str  # the base model every path loads
    echo: Callable[[str], None] = print


@dataclass
class PathRuns:
    """One path of one benchmark: the repetitions' work and seconds."""

    label: str
    unit: str = "tokens"
    threads: int | None = None  # torch threads doing the work, summed over processes
    work: list[float] = field(default_factory=list)  # units per repetition
    flops: list[float] = field(default_factory=list)  # model FLOPs per repetition
    steady_s: list[float] = field(default_factory=list)
    whole_s: list[float] = field(default_factory=list)
    extra: dict[str, list] = field(default_factory=dict)  # other timings, per repetition

    def add(self, work: float, flops: float, steady_s: float, whole_s: float, **extra) -> None:
        self.work.append(float(work))
        self.flops.append(float(flops))
        self.steady_s.append(float(steady_s))
        self.whole_s.append(float(whole_s))
        for key, value in extra.items():
            self.extra.setdefault(key, []).append(value)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- helpers


def compute_params(model) -> int:
    """Parameters that take part in a matmul per token: all but the embedding lookups, plus
    the output projection (tied to the token embedding in GPT-2)."""
    import torch

    embeddings = {
        id(p)
        for module in model.modules()
        if isinstance(module, torch.nn.Embedding)
        for p in module.parameters()
    }
    total = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and id(head.weight) in embeddings:
        total += head.weight.numel()
    return int(total)


def _timed_call(call: Callable):
    started, wall = time.time(), time.perf_counter()
    out = call()
    return out, time.perf_counter() - wall, started, time.time()


def pool_timing(records: list[dict], start: float, end: float) -> dict:
    """Steady state and start-up of one actor-pool call, from its actors' probe records.

    Returns: rows, rows_per_s (each actor's rows over its own first-batch-to-last-batch span,
    summed over actors), span_s (first batch start to last batch end), busy_fraction (time
    inside batches / (actors x span)), startup_s (call start to the first batch), tail_s (last
    batch to the call's return), actor_imports_s (median time a new actor process spent
    importing genloop's modules: torch, transformers, pandas), actor_init_s (median
    constructor time: the model load), actors, threads (torch threads, summed)."""
    batches = [r for r in records if r["kind"] == "batch"]
    actors = [r for r in records if r["kind"] == "actor"]
    imports = [r for r in records if r["kind"] == "imports"]
    if not batches:
        raise RuntimeError("no probe records from the actor pool (is GENLOOP_BENCH_PROBES set?)")
    by_actor: dict[int, list[dict]] = {}
    for b in batches:
        by_actor.setdefault(b["pid"], []).append(b)
    rows_per_s = 0.0
    for rows in by_actor.values():
        span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
        rows_per_s += sum(r["rows"] for r in rows) / max(span, 1e-9)
    first, last = min(b["start"] for b in batches), max(b["end"] for b in batches)
    busy = sum(b["end"] - b["start"] for b in batches)
    return {
        "rows": sum(b["rows"] for b in batches),
        "rows_per_s": rows_per_s,
        "span_s": last - first,
        "busy_fraction": busy / max(len(by_actor) * (last - first), 1e-9),
        "startup_s": first - start,
        "tail_s": end - last,
        "actor_imports_s": median_or_none([r["end"] - r["start"] for r in imports]),
        "actor_init_s": median_or_none([a["end"] - a["start"] for a in actors]),
        "actors": len(by_actor),
        "threads": sum(a["threads"] for a in actors) if actors else None,
    }


def run_pool(ctx: BenchContext, call: Callable) -> tuple[object, float, dict]:
    """Run an inference-worker call twice on the same workers, as a run does
    (`kept_workers`): the first call, on new workers, gives the whole time a caller waits and
    the start-up figures; the second, on workers that have run once, the steady rate (a new
    process runs its first batches slower). Returns (the second call's result, the first
    call's whole seconds, the second call's pool_timing with the first call's start-up)."""
    from pipeline.inference import kept_workers

    with bench_probes.installed(), kept_workers():
        _, whole, start, end = _timed_call(call)
        first = pool_timing(bench_probes.read_records(ctx.probe_dir, start, end), start, end)
        out, _, start, end = _timed_call(call)
        again = pool_timing(bench_probes.read_records(ctx.probe_dir, start, end), start, end)
    startup = ("startup_s", "actor_imports_s", "actor_init_s")
    return out, whole, {**again, **{key: first[key] for key in startup}}


def _steady_seconds(timing: dict) -> float:
    """Seconds the pool's work takes at its steady rate (rows / summed per-actor rate)."""
    return timing["rows"] / max(timing["rows_per_s"], 1e-9)


def median_or_none(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _driver_threads() -> int:
    import torch

    return torch.get_num_threads()


def _baselines(label: str) -> dict[str, PathRuns]:
    """The baseline at torch's default thread count (what a user's script gets, and what the
    ratios are against) and, when that is more than one, the same at one thread: it tells how
    much of a one-thread actor's gap is the thread count."""
    threads = _driver_threads()
    out = {"baseline": PathRuns(label, threads=threads)}
    if threads > 1:
        out["baseline_1t"] = PathRuns(f"{label}, 1 thread", threads=1)
    return out


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` torch threads (None: leave them)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _lengths(tokenizer, texts: list[str]) -> np.ndarray:
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return np.array([len(i) for i in ids], dtype=np.int64)


def scoring_rows(ctx: BenchContext) -> pd.DataFrame:
    """A generation's worth of samples to score: every pool prompt k times, with its answer."""
    pool = ctx.task.prompt_pool(1)
    k = ctx.cfg.generate.samples_per_prompt
    rows = pool.loc[pool.index.repeat(k)].reset_index(drop=True)
    rows["sample"] = np.tile(np.arange(k), len(pool))
    rows["response"] = rows["reference"]
    return rows


def _score_texts(ctx: BenchContext, rows: pd.DataFrame) -> tuple[list[str], list[str]]:
    prompts = rows["prompt"].tolist() if ctx.task.train_on_prompt else [""] * len(rows)
    return prompts, rows["response"].tolist()


def _example_tokens(ctx: BenchContext, tokenizer, prompts, responses) -> np.ndarray:
    """Tokens each (prompt, response) row puts through the model (no padding)."""
    start = len(start_ids(tokenizer))
    n = start + _lengths(tokenizer, prompts) + _lengths(tokenizer, responses)
    n = n + (1 if ctx.task.add_eos else 0)
    return np.minimum(n, ctx.cfg.model.max_length)


def _scored_tokens(ctx: BenchContext, model, tokenizer, prompts, responses) -> float:
    """Tokens genloop's scoring puts through `model`: a prompt that rows share runs once when
    scoring takes that plan (`pipeline.model.sharing_plan`, the decision scoring makes)."""
    from pipeline.model import shared_prompt_tokens, sharing_plan, tokenize_examples

    rows = tokenize_examples(
        tokenizer, prompts, responses, max_length=ctx.cfg.model.max_length, add_eos=ctx.task.add_eos
    )
    shared = sharing_plan(model, rows, ctx.cfg.score.batch_size)
    if shared is None:
        return float(sum(len(ids) for ids, _ in rows))
    return float(shared_prompt_tokens(rows, shared))


# --------------------------------------------------------------------------- hardware


def bench_hardware(settings: BenchSettings, echo: Callable[[str], None]) -> dict:
    """Measured fp32 matmul FLOP/s at 1 thread and at torch's default thread count."""
    import torch

    default = torch.get_num_threads()
    counts = sorted({1, default})
    rows = []
    try:
        for threads in counts:
            torch.set_num_threads(threads)
            for n in settings.matmul_sizes:
                rates = [_matmul_rate(n, settings.matmul_seconds) for _ in range(settings.repeats)]
                rows.append({"threads": threads, "n": n, "flops_per_s": rates})
                best = max(rates) / 1e9
                echo(f"[bench] matmul fp32 {n}x{n}, {threads} thread(s): {best:.1f} GFLOP/s")
    finally:
        torch.set_num_threads(default)
    peaks = {
        str(t): max(float(np.median(r["flops_per_s"])) for r in rows if r["threads"] == t)
        for t in counts
    }
    result = {"default_threads": default, "matmul": rows, "peak_flops_per_s": peaks}
    if torch.cuda.is_available():
        result["gpu_matmul"] = _gpu_matmul(settings)
    return result


def _matmul_rate(n: int, seconds: float) -> float:
    import torch

    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)  # warm-up
    reps, started = 0, time.perf_counter()
    while True:
        torch.mm(a, b, out=c)
        reps += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return 2.0 * n**3 * reps / elapsed


def _gpu_matmul(settings: BenchSettings) -> dict:
    """fp32 and bf16 matmul FLOP/s on the first GPU (only measured when one is present)."""
    import torch

    out = {}
    n = 8192
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        torch.mm(a, b)
        torch.cuda.synchronize()
        reps, started = 0, time.perf_counter()
        while time.perf_counter() - started < settings.matmul_seconds:
            torch.mm(a, b)
            reps += 1
        torch.cuda.synchronize()
        out[name] = 2.0 * n**3 * reps / (time.perf_counter() - started)
    return out


# --------------------------------------------------------------------------- scoring


def bench_scoring(ctx: BenchContext) -> dict:
    """genloop's ScoreActor pool (map_with_actors) vs a batched single-process loop."""
    from pipeline.inference import map_with_actors
    from pipeline.model import load_model

    cfg, s = ctx.cfg, ctx.cfg.score
    rows = scoring_rows(ctx)
    prompts, responses = _score_texts(ctx, rows)
    model, tokenizer = load_model(ctx.model_dir)
    n_params = compute_params(model)
    tokens = float(_example_tokens(ctx, tokenizer, prompts, responses).sum())
    flops = model_flops(n_params, tokens, training=False)
    # genloop runs a prompt its k samples share once: fewer tokens, the same losses.
    forward_tokens = _scored_tokens(ctx, model, tokenizer, prompts, responses)
    genloop_flops = model_flops(n_params, forward_tokens, training=False)
    baselines = _baselines(f"single-process torch loop, batch {s.batch_size}")
    pools = {w: PathRuns(f"genloop ScoreActor pool, {w} worker(s)") for w in ctx.settings.workers}
    max_diff = 0.0
    for rep in range(ctx.settings.repeats):
        for key, runs in baselines.items():
            with torch_threads(runs.threads):
                losses, steady, whole = plain_scoring(
                    ctx.model_dir,
                    prompts,
                    responses,
                    batch_size=s.batch_size,
                    add_eos=ctx.task.add_eos,
                    max_length=cfg.model.max_length,
                )
            runs.add(tokens, flops, steady, whole)
            ctx.echo(f"[bench] scoring {rep + 1}: {key} {tokens / steady:,.0f} tokens/s")
        for workers, runs in pools.items():
            scored, whole, timing = run_pool(
                ctx,
                lambda workers=workers: map_with_actors(
                    rows,
                    bench_probes.TimedScoreActor,
                    workers=workers,
                    use_gpu=False,
                    rows_per_batch=s.batch_size,
                    constructor_kwargs=dict(
                        model_dir=ctx.model_dir,
                        trust_remote_code=cfg.model.trust_remote_code,
                        use_gpu=False,
                        batch_size=s.batch_size,
                        max_length=cfg.model.max_length,
                        add_eos=ctx.task.add_eos,
                        train_on_prompt=ctx.task.train_on_prompt,
                    ),
                ),
            )
            steady = _steady_seconds(timing)
            runs.threads = timing["threads"]
            runs.add(tokens, genloop_flops, steady, whole, **_pool_extra(timing))
            max_diff = max(max_diff, float(np.nanmax(np.abs(scored["loss"].to_numpy() - losses))))
            ctx.echo(
                f"[bench] scoring {rep + 1}: genloop {workers} worker(s) "
                f"{tokens / steady:,.0f} tokens/s steady, {tokens / whole:,.0f} whole call"
            )
    paths = {**baselines, **{f"genloop_{w}w": r for w, r in pools.items()}}
    return {
        "what": "mean response-token loss of every sample of a generation",
        "rows": len(rows),
        "params": n_params,
        "flops_per_token": 2 * n_params,
        "tokens": tokens,
        "genloop_forward_tokens": forward_tokens,
        "paths": {name: runs.to_dict() for name, runs in paths.items()},
        "checks": {"max_abs_loss_difference": max_diff},
    }


def _pool_extra(timing: dict) -> dict:
    return {
        key: timing[key]
        for key in (
            "startup_s",
            "actor_imports_s",
            "actor_init_s",
            "span_s",
            "busy_fraction",
            "tail_s",
            "actors",
        )
    }


def plain_scoring(model_dir, prompts, responses, *, batch_size, add_eos, max_length):
    """The baseline: one process, batches of `batch_size`, per-example mean response loss.

    Returns (losses, loop seconds, whole seconds including the model load)."""
    import torch
    import torch.nn.functional as F

    wall = time.perf_counter()
    model, tokenizer = load_plain(model_dir)
    model.eval()
    started = time.perf_counter()
    out = []
    with torch.no_grad():
        for lo in range(0, len(prompts), batch_size):
            ids, mask, labels = plain_batch(
                tokenizer,
                prompts[lo : lo + batch_size],
                responses[lo : lo + batch_size],
                add_eos=add_eos,
                max_length=max_length,
            )
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            targets = labels[:, 1:]
            ce = F.cross_entropy(
                logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
            )
            counts = (targets != IGNORE).sum(dim=1)
            out.append((ce.sum(dim=1) / counts.clamp(min=1)).numpy())
    end = time.perf_counter()
    return np.concatenate(out), end - started, end - wall


# --------------------------------------------------------------------------- generation


def bench_generation(ctx: BenchContext) -> dict:
    """genloop's batched KV-cache generation (its GenerateActor pool, and in-process) vs
    per-prompt HF `generate`, at the same sampling settings."""
    from pipeline.inference import map_with_actors
    from pipeline.model import context_length, generate, load_model

    cfg, g = ctx.cfg, ctx.cfg.generate
    pool = ctx.task.prompt_pool(1)
    subset = pool.iloc[: ctx.settings.baseline_prompts]
    model, tokenizer = load_model(ctx.model_dir)
    n_params = compute_params(model)
    max_length = min(cfg.model.max_length, context_length(model) or cfg.model.max_length)
    budget = generation_budget(
        tokenizer, pool["prompt"].tolist(), ctx.task.max_new_tokens, max_length
    )
    settings = dict(
        samples_per_prompt=g.samples_per_prompt,
        max_new_tokens=ctx.task.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        batch_size=g.batch_size,
        max_length=cfg.model.max_length,
    )

    def work(prompts: list[str], responses: list[str]) -> tuple[float, float]:
        sampled = sampled_tokens(tokenizer, responses, budget)
        prompt_tokens = (_lengths(tokenizer, prompts) + len(start_ids(tokenizer))).sum()
        processed = prompt_tokens * g.samples_per_prompt + sampled
        return float(sampled), model_flops(n_params, float(processed), training=False)

    baseline = PathRuns(f"per-prompt HF generate ({len(subset)} prompts)")
    inproc = PathRuns(f"genloop generate() in-process, batch {g.batch_size}")
    ray_pool = PathRuns(f"genloop GenerateActor pool, {g.workers} worker(s)")
    for rep in range(ctx.settings.repeats):
        responses, steady, whole = plain_generation(
            ctx.model_dir,
            subset["prompt"].tolist(),
            samples_per_prompt=g.samples_per_prompt,
            max_new_tokens=budget,
            temperature=g.temperature,
            top_p=g.top_p,
        )
        baseline.threads = _driver_threads()
        tokens, flops = work(subset["prompt"].tolist(), responses)
        baseline.add(tokens, flops, steady, whole)
        ctx.echo(
            f"[bench] generation {rep + 1}: per-prompt generate {tokens / steady:,.0f} tokens/s"
        )

        wall = time.perf_counter()
        model, tokenizer = load_model(ctx.model_dir)
        started = time.perf_counter()
        responses = generate(model, tokenizer, pool["prompt"].tolist(), greedy=False, **settings)
        end = time.perf_counter()
        tokens, flops = work(pool["prompt"].tolist(), responses)
        inproc.threads = _driver_threads()
        inproc.add(tokens, flops, end - started, end - wall)
        rate = tokens / (end - started)
        ctx.echo(f"[bench] generation {rep + 1}: genloop in-process {rate:,.0f} tokens/s")

        samples, whole, timing = run_pool(
            ctx,
            lambda: map_with_actors(
                pool,
                bench_probes.TimedGenerateActor,
                workers=g.workers,
                use_gpu=False,
                rows_per_batch=g.batch_size,
                constructor_kwargs=dict(
                    model_dir=ctx.model_dir,
                    trust_remote_code=cfg.model.trust_remote_code,
                    use_gpu=False,
                    **settings,
                ),
            ),
        )
        tokens, flops = work(pool["prompt"].tolist(), samples["response"].tolist())
        steady = _steady_seconds(timing)
        ray_pool.threads = timing["threads"]
        ray_pool.add(tokens, flops, steady, whole, **_pool_extra(timing))
        ctx.echo(
            f"[bench] generation {rep + 1}: genloop pool {tokens / steady:,.0f} tokens/s steady, "
            f"{tokens / whole:,.0f} whole call"
        )
    return {
        "what": (
            f"{g.samples_per_prompt} samples per prompt, up to {budget} new tokens, "
            f"temperature {g.temperature}, top_p {g.top_p}; tokens = sampled tokens"
        ),
        "prompts": len(pool),
        "baseline_prompts": len(subset),
        "params": n_params,
        "paths": {
            "baseline": baseline.to_dict(),
            "genloop_inproc": inproc.to_dict(),
            "genloop_pool": ray_pool.to_dict(),
        },
    }


def generation_budget(tokenizer, prompts: list[str], max_new_tokens: int, max_length: int) -> int:
    """New tokens per sample, as `pipeline.model.generate` allows them."""
    start = len(start_ids(tokenizer))
    keep = max_length - max(1, min(max_new_tokens, max_length // 2))
    longest = int(np.minimum(_lengths(tokenizer, prompts) + start, keep).max()) if prompts else 0
    return max(1, min(max_new_tokens, max_length - longest))


def sampled_tokens(tokenizer, responses: list[str], budget: int) -> int:
    """Tokens the samples took: each response's tokens, plus the end-of-sequence token when
    it stopped before the budget; counted the same way for every path."""
    n = _lengths(tokenizer, responses)
    return int(np.minimum(n + 1, budget).sum())


def plain_generation(
    model_dir, prompts, *, samples_per_prompt, max_new_tokens, temperature, top_p
) -> tuple[list[str], float, float]:
    """The baseline: HF `generate` once per prompt (k samples each, KV cache on).

    Returns (responses, prompt-major; loop seconds; whole seconds with the model load)."""
    import torch

    wall = time.perf_counter()
    model, tokenizer = load_plain(model_dir)
    model.eval()
    start = start_ids(tokenizer)
    started = time.perf_counter()
    out: list[str] = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([start + tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            generated = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=samples_per_prompt,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row in generated[:, ids.shape[1] :].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                out.append(tokenizer.decode(row, skip_special_tokens=True))
    end = time.perf_counter()
    return out, end - started, end - wall


# --------------------------------------------------------------------------- training


def bench_training(ctx: BenchContext) -> dict:
    """One generation's training: genloop's Ray Train + DeepSpeed path (train_generation) at
    1 and 2 workers, and at 1 worker with the CPUs each of the 2 has (for scaling), vs a plain
    single-process torch loop, same model, data, steps and batch. For weak scaling, the most
    workers also train with the batch per worker that one worker has (the global batch times
    the workers). For what the machine allows that many workers without Ray, the plain loop
    also runs as that many 1-thread processes (`plain_parallel_training`)."""
    from cluster.connect import cpus_per_worker as share
    from pipeline.inference import worker_env
    from pipeline.model import load_model
    from pipeline.train import TrainJob, train_generation

    cfg, t = ctx.cfg, ctx.cfg.train
    data = training_rows(ctx)
    model, _ = load_model(ctx.model_dir)
    n_params = compute_params(model)
    job = TrainJob(
        init_model=ctx.model_dir,
        steps=t.steps,
        seed=cfg.seed,
        max_length=cfg.model.max_length,
        add_eos=ctx.task.add_eos,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    env = dict(worker_env(), **{bench_probes.PROBE_DIR_ENV: str(ctx.probe_dir)})
    baselines = _baselines(f"plain torch loop, AdamW, batch {t.batch_size}")
    label = f"genloop Ray Train + DeepSpeed ZeRO-{t.deepspeed.zero_stage}"
    batch = t.batch_size
    genloop = {(w, None, batch): PathRuns(f"{label}, {w} worker(s)") for w in ctx.settings.workers}
    # Scaling adds workers with their own CPUs: the many-worker run is also compared with one
    # worker given only what each of them gets (on 2 cores: 1 worker with 1 CPU).
    most = max(ctx.settings.workers)
    each = share(most, None)
    if each < share(1, None):
        genloop[(1, each, batch)] = PathRuns(f"{label}, 1 worker with {each} CPU(s)")
    if most > 1:
        genloop[(most, None, batch * most)] = PathRuns(
            f"{label}, {most} worker(s), global batch {batch * most} ({batch} per worker)"
        )
    # What the machine gives `most` workers without Ray: the plain loop as `most` processes
    # of one thread each (against the plain loop at one thread), with torch DDP, and with no
    # communication at all.
    plain_parallel = {}
    if most > 1 and "baseline_1t" in baselines:
        plain_parallel = {
            True: PathRuns(
                f"plain torch DDP (gloo), {most} processes, 1 thread each", threads=most
            ),
            False: PathRuns(
                f"plain torch loop, {most} processes training alone on their share of the "
                "batch (no communication)",
                threads=most,
            ),
        }
    for rep in range(ctx.settings.repeats):
        for key, runs in baselines.items():
            with torch_threads(runs.threads):
                tokens, steady, whole = plain_training(ctx, data, ctx.work_dir / f"plain-{rep}")
            flops = model_flops(n_params, tokens, training=True)
            runs.add(tokens, flops, steady, whole, step_ms=1e3 * steady / t.steps)
            ctx.echo(f"[bench] training {rep + 1}: {key} {tokens / steady:,.0f} tokens/s")
        for communicate, runs in plain_parallel.items():
            tokens, steady, whole = plain_parallel_training(
                ctx, data, ctx.work_dir / f"plain-parallel-{rep}", most, communicate=communicate
            )
            flops = model_flops(n_params, tokens, training=True)
            runs.add(tokens, flops, steady, whole, step_ms=1e3 * steady / t.steps)
            ctx.echo(f"[bench] training {rep + 1}: {runs.label} {tokens / steady:,.0f} tokens/s")
        for (workers, cpus, batch_size), runs in genloop.items():
            storage = ctx.work_dir / f"train-{workers}w-{cpus}cpu-{batch_size}-{rep}"
            train_cfg = dataclasses.replace(
                t, workers=workers, use_gpu=False, batch_size=batch_size
            )
            with bench_probes.installed(), bench_probes.CpuSampler() as sampler:
                _, whole, start, end = _timed_call(
                    lambda train_cfg=train_cfg, storage=storage, cpus=cpus: train_generation(
                        job,
                        data,
                        str(storage),
                        train_cfg,
                        env,
                        storage / "model",
                        cpus_per_worker=cpus,
                    )
                )
            timing = training_timing(
                bench_probes.read_records(ctx.probe_dir, start, end), start, end
            )
            cpu = step_loop_cpu(sampler, timing)
            runs.threads = timing["threads"]
            runs.add(
                timing["tokens"],
                model_flops(n_params, timing["tokens"], training=True),
                timing["loop_s"],
                whole,
                step_ms=1e3 * timing["loop_s"] / max(1, timing["steps"]),
                **{k: timing[k] for k in ("startup_s", "worker_setup_s", "teardown_s")},
                **cpu,
            )
            shutil.rmtree(storage, ignore_errors=True)
            ctx.echo(
                f"[bench] training {rep + 1}: {runs.label} "
                f"{timing['tokens'] / timing['loop_s']:,.0f} tokens/s step loop, "
                f"{timing['tokens'] / whole:,.0f} whole call"
            )
    paths = {
        **baselines,
        **{_plain_parallel_path(most, c): r for c, r in plain_parallel.items()},
        **{_training_path(w, c, b != batch): r for (w, c, b), r in genloop.items()},
    }
    return {
        "what": (
            f"{t.steps} optimizer steps, global batch {t.batch_size}, lr {t.lr}, fp32, "
            f"on {len(data):,} rows; tokens = non-padding tokens trained on"
        ),
        "rows": len(data),
        "params": n_params,
        "flops_per_token": 6 * n_params,
        "paths": {name: runs.to_dict() for name, runs in paths.items()},
    }


def _training_path(workers: int, cpus: int | None, weak: bool = False) -> str:
    """genloop_2w, genloop_1w_1cpu (1 worker on fewer CPUs), genloop_2w_weak (the batch per
    worker of 1 worker)."""
    name = f"genloop_{workers}w" if cpus is None else f"genloop_{workers}w_{cpus}cpu"
    return f"{name}_weak" if weak else name


def _plain_parallel_path(workers: int, communicate: bool) -> str:
    """plain_ddp_2w (torch DDP), plain_alone_2w (no communication)."""
    return f"plain_{'ddp' if communicate else 'alone'}_{workers}w"


def training_rows(ctx: BenchContext) -> pd.DataFrame:
    """A training mix the size of a generation's: the pool prompts with their answers."""
    pool = ctx.task.prompt_pool(1)
    data = pd.DataFrame({"prompt": pool["prompt"], "response": pool["reference"]})
    if not ctx.task.train_on_prompt:
        data["prompt"] = ""
    copies = -(-ctx.cfg.train.batch_size // max(1, len(data)))
    return pd.concat([data] * copies, ignore_index=True) if copies > 1 else data


def training_timing(records: list[dict], start: float, end: float) -> dict:
    """Where one train_generation call spent its time, from the workers' probe records."""
    workers = [r for r in records if r["kind"] == "train_worker"]
    rank0 = next((r for r in workers if r["rank"] == 0 and "loop_s" in r), None)
    if rank0 is None:
        raise RuntimeError("no step-loop report from the rank-0 training worker")
    return {
        "tokens": rank0["tokens"],
        "steps": rank0["steps"],
        "loop_s": rank0["loop_s"],
        # Ray Train controller, worker group, process group and dataset set-up.
        "startup_s": min(r["start"] for r in workers) - start,
        # Inside the worker, around the step loop: model load, deepspeed.initialize, and the
        # end of the worker function.
        "worker_setup_s": (rank0["end"] - rank0["start"]) - rank0["loop_s"],
        # After the workers finish: shutdown, the result and checkpoint hand-back.
        "teardown_s": end - max(r["end"] for r in workers),
        "threads": sum(r["threads"] for r in workers),
        "workers": len(workers),
        "worker_pids": sorted({r["pid"] for r in workers}),
        "worker_start_s": rank0["start"],
        "worker_end_s": rank0["end"],
    }


def step_loop_cpu(sampler: bench_probes.CpuSampler, timing: dict) -> dict:
    """What the training workers and every other process used of the cores during the step
    loop (the rank-0 worker's loop: the last `loop_s` of its job), in cores: the workers'
    mean, the rest together, its largest users (`other_top`), and the machine's idle time.
    Empty where the loop was too short for two samples or /proc is missing."""
    end = timing["worker_end_s"]
    shares = bench_probes.cpu_shares(
        sampler.samples, sampler.names, end - timing["loop_s"], end, set(timing["worker_pids"])
    )
    if shares is None:
        return {}
    return {
        "worker_cpu": sum(shares["workers"]) / len(shares["workers"]),
        "other_cpu": shares["others"],
        "idle_cpu": shares["idle"],
        "other_top": shares["top_others"],
    }


def plain_training(
    ctx: BenchContext, data: pd.DataFrame, out_dir: Path
) -> tuple[int, float, float]:
    """The baseline: one process, AdamW with the same learning rate, warm-up, weight decay and
    clipping as genloop's DeepSpeed config; tokenizes each batch; saves the model at the end.

    Returns (tokens trained on, loop seconds including the save, whole seconds)."""
    wall = time.perf_counter()
    model, tokenizer = load_plain(ctx.model_dir)
    tokens, loop_s = train_loop(
        model,
        tokenizer,
        data["prompt"].to_numpy(),
        data["response"].to_numpy(),
        PlainTraining.of(ctx.cfg.train),
        seed=ctx.cfg.seed,
        add_eos=ctx.task.add_eos,
        max_length=ctx.cfg.model.max_length,
        out_dir=out_dir,
    )
    return tokens, loop_s, time.perf_counter() - wall


def plain_parallel_training(
    ctx: BenchContext, data: pd.DataFrame, out_dir: Path, workers: int, *, communicate: bool
) -> tuple[int, float, float]:
    """The plain data-parallel baseline: `workers` processes of one torch thread each, no
    Ray, each training the plain loop on its share of the rows with the global batch split
    between them. With `communicate`, the model is wrapped in torch's
    DistributedDataParallel (gloo): what a user would write for 2 workers. Without it, each
    process trains alone on its half batch: two programs that share nothing but the
    machine, the most any data-parallel training can get from its cores here.

    Returns (tokens over all processes, seconds of the slowest process's loop, whole
    seconds: process start, imports and model load included)."""
    import multiprocessing
    import socket

    t = ctx.cfg.train
    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn = multiprocessing.get_context("spawn")  # this process runs Ray's threads: no fork
    results = spawn.Queue()
    shard = PlainTraining.of(t, batch_size=t.batch_size // workers)
    prompts, responses = data["prompt"].to_numpy(), data["response"].to_numpy()
    wall = time.perf_counter()
    ranks = [
        spawn.Process(
            target=train_rank,
            args=(
                rank,
                workers,
                port,
                ctx.model_dir,
                prompts[rank::workers],
                responses[rank::workers],
                shard,
                ctx.cfg.seed + rank,
                ctx.task.add_eos,
                ctx.cfg.model.max_length,
                out_dir,
                communicate,
                results,
            ),
        )
        for rank in range(workers)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join()
    whole = time.perf_counter() - wall
    failed = [r for r, process in enumerate(ranks) if process.exitcode != 0]
    if failed:
        raise RuntimeError(f"plain data-parallel training: rank(s) {failed} failed")
    measured = [results.get(timeout=10) for _ in ranks]
    return sum(tokens for tokens, _ in measured), max(loop for _, loop in measured), whole


# --------------------------------------------------------------------------- embedding


def bench_embedding(ctx: BenchContext) -> dict:
    """genloop's EmbedActor pool (embed_texts) vs sentence-transformers' `encode` in one
    process, on the same texts with the same encoder and batch size."""
    from pipeline.embed import default_embedding_model, embed_texts

    try:
        encoder = default_embedding_model()
        from sentence_transformers import SentenceTransformer  # noqa: F401
    except Exception as e:  # the optional [embed] extra is missing
        return {"skipped": f"the embed extra is not installed ({e})"}
    from transformers import AutoModel, AutoTokenizer

    rows = scoring_rows(ctx).iloc[: ctx.settings.embed_texts]
    texts = [f"{p}\n{r}" if p else r for p, r in zip(rows["prompt"], rows["response"])]
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    n_params = compute_params(AutoModel.from_pretrained(encoder))
    tokens = float(sum(map(len, tokenizer(texts, truncation=True, max_length=256)["input_ids"])))
    flops = model_flops(n_params, tokens, training=False)
    batch = ctx.settings.embed_batch_size
    baseline = PathRuns(f"sentence-transformers encode, batch {batch}")
    pools = {w: PathRuns(f"genloop EmbedActor pool, {w} worker(s)") for w in ctx.settings.workers}
    min_cosine = 1.0
    for rep in range(ctx.settings.repeats):
        reference, steady, whole = plain_embedding(encoder, texts, batch)
        baseline.threads = _driver_threads()
        baseline.add(tokens, flops, steady, whole)
        ctx.echo(
            f"[bench] embedding {rep + 1}: sentence-transformers {tokens / steady:,.0f} tokens/s"
        )
        for workers, runs in pools.items():
            with bench_probes.installed():
                vectors, whole, timing = run_pool(
                    ctx,
                    lambda workers=workers: embed_texts(
                        texts, model=encoder, workers=workers, batch_size=batch
                    ),
                )
            min_cosine = min(min_cosine, float(np.min(np.sum(vectors * reference, axis=1))))
            steady = _steady_seconds(timing)
            runs.threads = timing["threads"]
            runs.add(tokens, flops, steady, whole, **_pool_extra(timing))
            ctx.echo(
                f"[bench] embedding {rep + 1}: genloop {workers} worker(s) "
                f"{tokens / steady:,.0f} tokens/s steady, {tokens / whole:,.0f} whole call"
            )
    paths = {"baseline": baseline, **{f"genloop_{w}w": r for w, r in pools.items()}}
    return {
        "what": f"{len(texts):,} 'prompt\\nresponse' texts, all-MiniLM-L6-v2, mean-pooled",
        "texts": len(texts),
        "params": n_params,
        "flops_per_token": 2 * n_params,
        "paths": {name: runs.to_dict() for name, runs in paths.items()},
        "checks": {"min_cosine_to_baseline": min_cosine},
    }


def plain_embedding(encoder: str, texts: list[str], batch_size: int):
    """The baseline: SentenceTransformer(encoder).encode(texts), normalised."""
    from sentence_transformers import SentenceTransformer

    wall = time.perf_counter()
    model = SentenceTransformer(encoder, device="cpu")
    started = time.perf_counter()
    vectors = model.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
    )
    end = time.perf_counter()
    return np.asarray(vectors, dtype=np.float32), end - started, end - wall


# --------------------------------------------------------------------------- end to end


def bench_end_to_end(ctx: BenchContext) -> dict:
    """The default run itself: generation 0, then `repeats` generations, on the bench's Ray,
    with every stage timed by the loop and, inside its actors and workers, by the probes."""
    from pipeline.loop import run_loop

    cfg = dataclasses.replace(
        ctx.cfg, loop=dataclasses.replace(ctx.cfg.loop, generations=ctx.settings.repeats)
    )
    run_dir = ctx.work_dir / "end_to_end"
    clock = StageClock(cfg.loop.generations, echo=lambda line: ctx.echo(f"[bench] e2e {line}"))
    started, wall = time.time(), time.perf_counter()
    with bench_probes.installed(), bench_probes.recording_here(ctx.probe_dir):
        run_loop(cfg, run_dir, clock, log_to_driver=False)
    total = time.perf_counter() - wall
    records = bench_probes.read_records(ctx.probe_dir, started, time.time())
    stages = [stage_timing(stage, records) for stage in clock.stages]
    _add_stage_flops(ctx, run_dir, stages)
    return {
        "what": (
            f"genloop run with loop.generations={cfg.loop.generations}: generation 0, then "
            f"{cfg.loop.generations} generation(s) of the run config"
        ),
        "run_seconds": total,
        "stages": stages,
    }


@dataclass
class StageClock(Progress):
    """The loop's `Progress`, also keeping every stage's start and end (time.time())."""

    stages: list[dict] = field(default_factory=list)

    def stage(self, generation: int, name: str, detail: str, seconds: float | None) -> None:
        super().stage(generation, name, detail, seconds)
        if seconds is not None:
            end = time.time()
            self.stages.append(
                {
                    "generation": generation,
                    "stage": name,
                    "seconds": seconds,
                    "start": end - seconds,
                    "end": end,
                    "detail": detail,
                }
            )


def stage_timing(stage: dict, records: list[dict]) -> dict:
    """Split one stage's wall time into model compute and the rest.

    The stage's compute segments, in order: each actor pool that ran in it (generate, score,
    evaluate; evaluate may also embed the mix) and the rank-0 training step loop. compute: a
    pool's time inside batches divided by its actors (what the pool takes kept busy), or the
    step loop. start-up: before each segment, since the stage began or the previous segment
    ended (scheduling, actor or Ray Train worker start, model load, DeepSpeed init, driver
    work between pools). idle: actors waiting between a pool's first and last batch. tail:
    after the last segment (collecting rows, Parquet writes, checkpoint copy, diagnostics).
    Driver stages (curate, mix, select) have no segments: all of their time is `other`."""
    inside = [r for r in records if r["start"] >= stage["start"] and r["end"] <= stage["end"]]
    segments = []
    pools: dict[str, list[dict]] = {}
    for r in inside:
        if r["kind"] == "batch":
            pools.setdefault(r["actor"], []).append(r)
    for actor, batches in pools.items():
        pids = {b["pid"] for b in batches}
        mine = [r for r in inside if r["pid"] in pids]
        segments.append(
            {
                "what": actor,
                "first": min(b["start"] for b in batches),
                "last": max(b["end"] for b in batches),
                "compute_s": sum(b["end"] - b["start"] for b in batches) / len(pids),
                "actors": len(pids),
                "actor_imports_s": median_or_none(
                    [r["end"] - r["start"] for r in mine if r["kind"] == "imports"]
                ),
                "actor_init_s": median_or_none(
                    [r["end"] - r["start"] for r in mine if r["kind"] == "actor"]
                ),
            }
        )
    workers = [r for r in inside if r["kind"] == "train_worker"]
    for r in workers:
        if r["rank"] == 0 and "loop_s" in r:
            segments.append(
                {
                    "what": "train step loop",
                    "first": r["end"] - r["loop_s"],
                    "last": r["end"],
                    "compute_s": r["loop_s"],
                    "workers": len(workers),
                    "tokens": r["tokens"],
                }
            )
    segments.sort(key=lambda seg: seg["first"])
    out = dict(stage, compute_s=0.0, startup_s=0.0, idle_s=0.0, tail_s=0.0, segments=segments)
    reached = stage["start"]
    for seg in segments:
        out["startup_s"] += max(0.0, seg["first"] - reached)
        out["idle_s"] += max(0.0, seg["last"] - max(seg["first"], reached) - seg["compute_s"])
        out["compute_s"] += seg["compute_s"]
        reached = max(reached, seg["last"])
    if segments:
        out["tail_s"] = max(0.0, stage["end"] - reached)
    train = [seg for seg in segments if "tokens" in seg]
    if train:
        out["tokens"] = train[0]["tokens"]
    out["other_s"] = (
        stage["seconds"] - out["compute_s"] - out["startup_s"] - out["idle_s"] - out["tail_s"]
    )
    return out


def _add_stage_flops(ctx: BenchContext, run_dir: Path, stages: list[dict]) -> None:
    """Model FLOPs of each model stage, from what the stage produced (forward ~2 x params x
    tokens, training ~6 x params x tokens; attention left out). Evaluation counts its passes
    over the held-out rows, not an embedding of the mix."""
    from pipeline.model import load_model

    model, tokenizer = load_model(ctx.model_dir)
    n_params = compute_params(model)
    start = len(start_ids(tokenizer))
    eos = 1 if ctx.task.add_eos else 0
    heldout = ctx.task.heldout
    held_p = _lengths(tokenizer, heldout["prompt"].tolist()) + start
    held_r = _lengths(tokenizer, heldout["response"].tolist())
    budget = generation_budget(
        tokenizer, heldout["prompt"].tolist(), ctx.task.max_new_tokens, ctx.cfg.model.max_length
    )
    # Evaluation: greedy (verifiable tasks) and sampled answers, then the real responses' losses.
    passes = 2 if ctx.task.verifiable else 1
    eval_tokens = float(passes * (held_p + budget).sum() + (held_p + held_r + eos).sum())
    for stage in stages:
        gen_dir = run_dir / f"gen_{stage['generation']:02d}"
        tokens = None
        if stage["stage"] == "generate" and (gen_dir / "samples.parquet").exists():
            samples = pd.read_parquet(gen_dir / "samples.parquet")
            prompt = _lengths(tokenizer, samples["prompt"].tolist()) + start
            tokens = float(
                prompt.sum() + sampled_tokens(tokenizer, samples["response"].tolist(), budget)
            )
            if "loss" in samples.columns:  # the generating actors scored their samples, too
                prompts, responses = _score_texts(ctx, samples)
                tokens += _scored_tokens(ctx, model, tokenizer, prompts, responses)
            stage["flops"] = model_flops(n_params, tokens, training=False)
        elif stage["stage"] == "score" and _ran(stage, "ScoreActor"):
            scored = pd.read_parquet(gen_dir / "scored.parquet", columns=["prompt", "response"])
            prompts, responses = _score_texts(ctx, scored)
            tokens = _scored_tokens(ctx, model, tokenizer, prompts, responses)
            stage["flops"] = model_flops(n_params, tokens, training=False)
        elif stage["stage"] == "train" and "tokens" in stage:
            tokens = float(stage["tokens"])
            stage["flops"] = model_flops(n_params, tokens, training=True)
        elif stage["stage"] == "evaluate":
            tokens = eval_tokens
            stage["flops"] = model_flops(n_params, tokens, training=False)
        if tokens is not None:
            stage["tokens"] = tokens


def _ran(stage: dict, actor: str) -> bool:
    return any(segment["what"] == actor for segment in stage.get("segments", []))


def make_context(
    cfg: RunConfig, settings: BenchSettings, work_dir: Path, probe_dir: Path, echo
) -> BenchContext:
    """The task and the base model (built from config, or the user's model.path)."""
    from pipeline.loop import prepare_base_model
    from pipeline.tasks import make_task

    task = make_task(cfg.task, cfg.seed)
    model_dir = prepare_base_model(cfg, task, work_dir)
    return BenchContext(cfg, task, settings, work_dir, probe_dir, model_dir, echo)


def temporary_dir(parent: Path | None = None) -> Path:
    return Path(tempfile.mkdtemp(prefix="genloop-bench-", dir=parent))
