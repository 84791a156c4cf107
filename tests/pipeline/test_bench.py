"""`genloop bench`: the arithmetic, targets and report by hand; the whole suite (--quick) on a
real local Ray."""

import hashlib
import json
import math
import os
import time

import numpy as np
import pytest

from pipeline import bench
from pipeline.bench_probes import (
    CpuSampler,
    cpu_shares,
    name_from_argv,
    parse_train_line,
    process_name,
)
from pipeline.bench_stages import (
    PathRuns,
    _training_path,
    compute_params,
    generation_budget,
    plain_scoring,
    pool_timing,
    sampled_tokens,
    stage_timing,
)

# --------------------------------------------------------------------------- arithmetic


def test_median_ignores_missing_values():
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert bench.median([None, 5.0, float("nan")]) == 5.0
    assert bench.median([]) is None and bench.median([None]) is None


def test_ratio_and_rates():
    assert bench.ratio(3.0, 2.0) == 1.5
    assert bench.ratio(3.0, 0.0) is None and bench.ratio(None, 2.0) is None
    assert bench.rates([100.0, 100.0], [2.0, 0.0]) == [50.0, None]


def test_flops_and_mfu():
    assert bench.model_flops(1000, 10, training=True) == 60_000
    assert bench.model_flops(1000, 10, training=False) == 20_000
    # 2e9 model FLOPs in 2 s against a 10 GFLOP/s peak: 10%.
    assert bench.mfu(2e9, 2.0, 1e10) == pytest.approx(0.1)
    assert bench.mfu(None, 2.0, 1e10) is None and bench.mfu(1.0, 2.0, None) is None


def test_peak_flops_per_thread_count():
    peaks = {1: 10e9, 2: 16e9}
    assert bench.peak_flops(peaks, 2) == 16e9
    assert bench.peak_flops(peaks, 1) == 10e9
    # Not measured: threads x the best rate per thread (10 GFLOP/s at 1 thread).
    assert bench.peak_flops(peaks, 4) == 40e9
    assert bench.peak_flops({}, 2) is None and bench.peak_flops(peaks, None) is None
    # Two threads measured slower than one (a busy machine): the limit is still the better one.
    assert bench.peak_flops({1: 10e9, 2: 2e9}, 2) == 10e9


def test_scaling_efficiency():
    assert bench.scaling_efficiency(100.0, 160.0, 2) == pytest.approx(0.8)
    assert bench.scaling_efficiency(None, 160.0, 2) is None


def test_compute_params_counts_matmul_weights(tiny_model_dir):
    from pipeline.model import load_model

    model, _ = load_model(tiny_model_dir)
    d, layers, vocab = model.config.n_embd, model.config.n_layer, model.config.vocab_size
    # Per block: qkv 3d^2+3d, attention out d^2+d, MLP 4d^2+4d and 4d^2+d, two LayerNorms 4d;
    # the final LayerNorm 2d; the output projection (tied to the token embedding) vocab x d;
    # the position embedding is a lookup and does not count.
    expected = layers * (12 * d * d + 13 * d) + 2 * d + vocab * d
    assert compute_params(model) == expected


# --------------------------------------------------------------------------- summaries


def _raw_benchmark(steady_base, steady_1, steady_2, label="pool", steady_1t=None):
    def path(label, seconds, whole, threads):
        runs = PathRuns(label, threads=threads)
        for s in seconds:
            runs.add(1000.0, 2e9, s, whole, startup_s=1.0, busy_fraction=0.95)
        return runs.to_dict()

    paths = {"baseline": path("base", steady_base, 10.0, 2)}
    if steady_1t is not None:
        paths["baseline_1t"] = path("base, 1 thread", steady_1t, 12.0, 1)
    paths["genloop_1w"] = path(f"{label} 1", steady_1, 20.0, 1)
    paths["genloop_2w"] = path(f"{label} 2", steady_2, 12.5, 2)
    return {"paths": paths}


def test_summarize_benchmark_medians_and_ratios():
    raw = _raw_benchmark([1.0, 2.0, 1.0], [2.0, 2.0, 4.0], [0.5, 0.5, 0.5])
    summary = bench.summarize_benchmark("scoring", raw, {1: 1e9, 2: 2e9})
    base, one = summary["paths"]["baseline"], summary["paths"]["genloop_1w"]
    assert base["steady_per_s"] == 1000.0  # median of 1000, 500, 1000
    assert one["steady_per_s"] == 500.0
    assert base["whole_per_s"] == 100.0
    assert summary["ratios"]["genloop_1w"] == {
        "steady": 0.5,
        "whole": 0.5,
        "steady_range": [0.25, 1.0],  # 500/1000, 500/500, 250/1000
    }
    assert summary["ratios"]["genloop_2w"]["steady"] == 2.0
    assert summary["ratios"]["genloop_2w"]["whole"] == pytest.approx(0.8)
    # 2e9 FLOPs in 2 s at 1 thread (peak 1e9): 100%.
    assert one["mfu"] == pytest.approx(1.0)
    assert one["extra_median"]["startup_s"] == 1.0
    assert "scaling" not in summary  # only training reports scaling


def test_ratios_carry_their_range_over_repetitions():
    # Repetition by repetition, 2 workers / baseline: 2000/1000, 500/500, 4000/1000.
    raw = _raw_benchmark([1.0, 2.0, 1.0], [2.0, 2.0, 4.0], [0.5, 2.0, 0.25])
    summary = bench.summarize_benchmark("training", raw, {1: 1e9})
    assert summary["ratios"]["genloop_2w"]["steady_range"] == pytest.approx([1.0, 4.0])
    # Scaling, 2 workers over 2 x 1 worker per repetition: 2000/1000, 500/1000, 4000/500.
    assert summary["scaling"]["steady_range"] == pytest.approx([0.5, 8.0])
    one = _raw_benchmark([1.0], [2.0], [0.5])
    assert (
        bench.summarize_benchmark("scoring", one, {})["ratios"]["genloop_1w"]["steady_range"]
        is None
    )  # one repetition: no range
    target = {t["key"]: t for t in bench.check_targets({"scoring": summary})}["scoring_2w"]
    assert target["range"] == pytest.approx([1.0, 4.0])
    result = _result(targets=[target])
    assert "| >= 1.60x | 2.00x | 1.00-4.00 | 0.80x | met |" in bench.format_markdown(result)


def test_training_summary_reports_scaling():
    raw = _raw_benchmark([1.0], [1.0], [0.625])
    summary = bench.summarize_benchmark("training", raw, {1: 1e9})
    # 1000 tok/s at 1 worker, 1600 at 2: 80% of linear.
    assert summary["scaling"]["steady"] == pytest.approx(0.8)
    assert summary["scaling_reference"] == "genloop_1w" and "scaling_same_machine" not in summary


def test_training_scaling_compares_workers_with_the_same_cpus():
    raw = _raw_benchmark([1.0], [1.0], [0.625])
    one_cpu = PathRuns("1 worker with 1 CPU", threads=1)
    one_cpu.add(1000.0, 2e9, 2.0, 20.0)  # 500 tok/s on one of the two cores
    raw["paths"]["genloop_1w_1cpu"] = one_cpu.to_dict()
    summary = bench.summarize_benchmark("training", raw, {1: 1e9})
    assert summary["scaling_reference"] == "genloop_1w_1cpu"
    assert summary["scaling"]["steady"] == pytest.approx(1.6)  # 1600 / (2 x 500)
    assert summary["scaling_same_machine"]["steady"] == pytest.approx(0.8)  # 1600 / (2 x 1000)
    result = _result()
    result["benchmarks"]["training"] = summary
    text = bench.format_markdown(result)
    assert "same CPUs per worker | | | | 160%" in text
    assert "vs 1 worker on every CPU | | | | 80%" in text


def test_weak_scaling_keeps_the_batch_per_worker():
    raw = _raw_benchmark([1.0], [1.0], [0.625])
    one_cpu = PathRuns("1 worker with 1 CPU", threads=1)
    one_cpu.add(1000.0, 2e9, 2.0, 20.0)  # 500 tok/s
    raw["paths"]["genloop_1w_1cpu"] = one_cpu.to_dict()
    weak = PathRuns("2 workers, the batch per worker of 1", threads=2)
    weak.add(2000.0, 4e9, 2.5, 25.0)  # twice the tokens per step: 800 tok/s
    raw["paths"]["genloop_2w_weak"] = weak.to_dict()
    summary = bench.summarize_benchmark("training", raw, {1: 1e9})
    assert summary["scaling_weak"]["steady"] == pytest.approx(0.8)  # 800 / (2 x 500)
    assert summary["scaling"]["steady"] == pytest.approx(1.6)  # the target keeps its measure
    result = _result()
    result["benchmarks"]["training"] = summary
    assert "(weak scaling) | | | | 80%" in bench.format_markdown(result)
    assert _training_path(2, None, weak=True) == "genloop_2w_weak"


def test_plain_scaling_shows_what_the_machine_allows():
    raw = _raw_benchmark([1.0], [1.0], [0.625], steady_1t=[1.25])  # 800 tok/s at 1 thread
    for key, seconds in (("plain_ddp_2w", 0.8), ("plain_alone_2w", 0.625)):
        runs = PathRuns(key, threads=2)
        runs.add(1000.0, 2e9, seconds, 10.0, step_ms=1.0)
        raw["paths"][key] = runs.to_dict()
    summary = bench.summarize_benchmark("training", raw, {1: 1e9})
    # Against the 1-thread plain loop: 1250 / (2 x 800), 1600 / (2 x 800).
    assert summary["scaling_plain_ddp_2w"]["steady"] == pytest.approx(0.78125)
    assert summary["scaling_plain_alone_2w"]["steady"] == pytest.approx(1.0)
    assert summary["scaling"]["steady"] == pytest.approx(0.8)  # genloop's own: unchanged
    result = _result()
    result["benchmarks"]["training"] = summary
    text = bench.format_markdown(result)
    assert "plain torch DDP, no Ray (vs the 1-thread plain loop) | | | | 78%" in text
    assert "never communicate (the machine's limit) | | | | 100%" in text
    why = bench.explain("training_scaling", {"training": summary})
    assert "the plain loop scales 78% as torch DDP and 100% as two processes" in why


def test_unmet_scaling_says_what_the_cores_did_while_the_workers_stepped():
    raw = _raw_benchmark([1.0], [1.0], [0.7])
    two = PathRuns("2 workers", threads=2)
    for other, top in ((0.10, [["ray::TrainController", 0.02]]), (0.14, [["raylet", 0.03]])):
        two.add(
            1000.0, 2e9, 0.7, 12.5, worker_cpu=0.9, other_cpu=other, idle_cpu=0.05, other_top=top
        )
    raw["paths"]["genloop_2w"] = two.to_dict()
    summary = bench.summarize_benchmark("training", raw, {1: 1e9})
    cpu = summary["paths"]["genloop_2w"]["extra_median"]
    assert cpu["other_cpu"] == pytest.approx(0.12)  # numbers: the median
    assert cpu["other_top"] == [["raylet", 0.03]]  # the top users: the last repetition's
    why = bench.explain("training_scaling", {"training": summary})
    assert (
        "while 2 workers stepped, each ran 90% of a core, other processes took 12% of one "
        "(raylet 3%), and 5% of one sat idle" in why
    )


def test_cpu_shares_over_a_window():
    names = {10: "ray::RayTrainWorker", 11: "ray::RayTrainWorker", 20: "raylet", 21: "gcs_server"}
    samples = [
        (99.0, 0.0, {10: 0.0, 11: 0.0, 20: 0.0}),  # before the window: not used
        (100.0, 5.0, {10: 1.0, 11: 1.0, 20: 1.0}),
        (102.0, 5.5, {10: 2.8, 11: 2.6, 20: 1.1, 21: 0.3}),  # 21 started inside
        (104.0, 6.0, {10: 4.6, 11: 4.2, 20: 1.2, 21: 0.5}),
        (106.0, 9.0, {10: 9.0, 11: 9.0, 20: 9.0}),  # after the window
    ]
    shares = cpu_shares(samples, names, 100.0, 105.0, {10, 11})
    assert shares["window_s"] == 4.0
    assert shares["workers"] == pytest.approx([0.9, 0.8])
    assert shares["others"] == pytest.approx((0.2 + 0.5) / 4)
    assert [name for name, _ in shares["top_others"]] == ["gcs_server", "raylet"]
    assert [share for _, share in shares["top_others"]] == pytest.approx([0.125, 0.05])
    assert shares["idle"] == pytest.approx(0.25)
    assert cpu_shares(samples, names, 101.0, 103.0, {10}) is None  # one sample inside


def test_cpu_sampler_sees_this_process_compute():
    data = b"x" * (1 << 22)
    with CpuSampler(interval=0.05) as sampler:
        start = time.time()
        while time.time() - start < 0.4:
            hashlib.sha256(data).digest()  # releases the GIL: the sampler thread runs
        end = time.time()
    shares = cpu_shares(sampler.samples, sampler.names, start, end, {os.getpid()})
    assert shares["workers"][0] > 0.5  # most of a core, at the clock tick's resolution
    name = process_name(os.getpid())
    assert name and "/" not in name


def test_process_names_are_short():
    assert name_from_argv(["ray::TrainController.run       "]) == "ray::TrainController"
    assert name_from_argv(["ray::IDLE"]) == "ray::IDLE"
    assert name_from_argv(["/v/bin/python3", "-u", "/v/ray/_private/log_monitor.py", "--x=1"]) == (
        "log_monitor.py"
    )
    assert name_from_argv(["/v/ray/core/src/ray/raylet/raylet", "--head"]) == "raylet"
    starting = ["/v/bin/python", "/v/ray/_private/workers/setup_worker.py", "/v/default_worker.py"]
    assert name_from_argv(starting) == "ray worker starting"


def _stage(generation, name, start, seconds, **extra):
    times = dict(compute_s=0.0, startup_s=0.0, idle_s=0.0, tail_s=0.0, other_s=0.0)
    return {
        "generation": generation,
        "stage": name,
        "start": start,
        "end": start + seconds,
        "seconds": seconds,
        **times,
        **extra,
    }


def test_summarize_end_to_end_share_outside_compute():
    stages = [
        _stage(0, "train", 0.0, 10.0, compute_s=5.0, startup_s=5.0),
        _stage(1, "generate", 10.0, 4.0, compute_s=2.0, startup_s=2.0, flops=4e9),
        _stage(1, "curate", 14.0, 1.0, other_s=1.0),
        _stage(1, "train", 15.0, 5.0, compute_s=4.0, startup_s=1.0, flops=4e9),
    ]
    summary = bench.summarize_end_to_end({"stages": stages}, {1: 1e9, 2: 2e9}, cpus=2)
    gen1 = summary["generations"][1]
    assert gen1["wall_s"] == 10.0 and gen1["compute_s"] == 6.0
    assert summary["outside_compute"]["steady"] == pytest.approx(0.4)  # generation 0 left out
    assert summary["breakdown"]["startup_s"] == 3.0
    assert summary["breakdown"]["driver_s"] == 1.0
    assert summary["per_stage"]["generate"]["seconds"] == 4.0
    # 4e9 FLOPs in 2 s of compute against 2e9 FLOP/s (2 CPUs): 100%; over the 4 s wall: 50%.
    assert summary["per_stage"]["generate"]["mfu_compute"] == pytest.approx(1.0)
    assert summary["per_stage"]["generate"]["mfu_wall"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- targets


def _benchmarks(scoring_1w, scoring_2w, overhead):
    scoring = bench.summarize_benchmark(
        "scoring",
        _raw_benchmark([1.0], [1.0 / scoring_1w], [1.0 / scoring_2w]),
        {1: 1e9, 2: 2e9},
    )
    pool = dict(
        what="GenerateActor",
        first=10 * overhead,
        last=10.0,
        compute_s=10.0 * (1 - overhead),
        actors=2,
        actor_imports_s=3.0,
        actor_init_s=0.25,
    )
    stages = [
        _stage(
            1,
            "generate",
            0.0,
            10.0,
            compute_s=10.0 * (1 - overhead),
            startup_s=10 * overhead,
            segments=[pool],
        )
    ]
    e2e = bench.summarize_end_to_end({"stages": stages}, {1: 1e9}, cpus=1)
    return {"scoring": scoring, "end_to_end": e2e}


def test_targets_met_not_met_and_not_measured():
    targets = {t["key"]: t for t in bench.check_targets(_benchmarks(0.95, 1.5, 0.1))}
    assert targets["scoring_1w"]["met"] is True
    assert targets["scoring_1w"]["value"] == pytest.approx(0.95)
    assert targets["scoring_2w"]["met"] is False
    assert targets["scoring_2w"]["why"]  # an explanation from the measurements
    assert targets["overhead"]["met"] is True and targets["overhead"]["comparison"] == "<="
    assert targets["overhead"]["value"] == pytest.approx(0.1)
    for key in ("generation", "training_1w", "training_scaling"):
        assert targets[key]["met"] is None and targets[key]["value"] is None
    assert [t["key"] for t in bench.check_targets({})] == [t.key for t in bench.TARGETS]


def test_unmet_overhead_names_the_biggest_cost():
    targets = {t["key"]: t for t in bench.check_targets(_benchmarks(1.0, 2.0, 0.5))}
    assert targets["overhead"]["met"] is False
    assert "generate start-up 5.0s" in targets["overhead"]["why"]


def test_unmet_scoring_names_the_thread_gap():
    targets = {t["key"]: t for t in bench.check_targets(_benchmarks(0.5, 2.0, 0.1))}
    assert "1 torch thread(s)" in targets["scoring_1w"]["why"]
    # With the 1-thread baseline at 0.625x the 2-thread one, genloop's 0.5x is 0.8x of it.
    benchmarks = {
        "scoring": bench.summarize_benchmark(
            "scoring", _raw_benchmark([1.0], [2.0], [1.0], steady_1t=[1.6]), {1: 1e9}
        )
    }
    why = {t["key"]: t for t in bench.check_targets(benchmarks)}["scoring_1w"]["why"]
    assert "runs at 0.62x its 2-thread speed, and genloop at 0.80x" in why


# --------------------------------------------------------------------------- probes and timing


def test_parse_train_line_uses_the_printed_rate():
    text = "noise\n[train] 300 steps, 268800 tokens in 12.3s (21,854 tokens/s)\n"
    parsed = parse_train_line(text)
    assert parsed["steps"] == 300 and parsed["tokens"] == 268800
    assert parsed["loop_s"] == pytest.approx(268800 / 21854)
    assert parse_train_line("no report here") is None


def _batch(pid, start, end, rows=10, actor="ScoreActor"):
    return dict(kind="batch", pid=pid, actor=actor, start=start, end=end, rows=rows)


def test_pool_timing_leaves_start_up_skew_out():
    records = [
        dict(kind="actor", pid=1, actor="ScoreActor", start=0.0, end=2.0, threads=1),
        dict(kind="actor", pid=2, actor="ScoreActor", start=0.0, end=4.0, threads=1),
        _batch(1, 3.0, 4.0),
        _batch(1, 4.0, 5.0),
        _batch(2, 5.0, 6.0),
        _batch(2, 6.0, 7.0),
    ]
    timing = pool_timing(records, start=0.0, end=8.0)
    # Each actor: 20 rows in 2 s; summed, 20 rows/s, though the pool's span is 4 s.
    assert timing["rows_per_s"] == pytest.approx(20.0)
    assert timing["span_s"] == 4.0 and timing["busy_fraction"] == pytest.approx(0.5)
    assert timing["startup_s"] == 3.0 and timing["tail_s"] == 1.0
    assert timing["actor_init_s"] == 3.0 and timing["threads"] == 2 and timing["actors"] == 2


def test_stage_timing_splits_a_pool_stage():
    stage = dict(generation=1, stage="evaluate", start=0.0, end=10.0, seconds=10.0)
    records = [
        _batch(1, 2.0, 4.0, actor="EvalActor"),
        _batch(2, 2.0, 3.0, actor="EvalActor"),
        _batch(3, 7.0, 8.0, actor="EmbedActor"),
        _batch(9, 11.0, 12.0, actor="EvalActor"),  # outside the stage
    ]
    out = stage_timing(stage, records)
    # EvalActor: 3 s of batches over 2 actors = 1.5 s compute in a 2 s span (0.5 s idle);
    # EmbedActor: 1 s; start-up 2 s before the first pool and 3 s between the pools.
    assert out["compute_s"] == pytest.approx(2.5)
    assert out["idle_s"] == pytest.approx(0.5)
    assert out["startup_s"] == pytest.approx(5.0)
    assert out["tail_s"] == pytest.approx(2.0)
    assert out["other_s"] == pytest.approx(0.0)


def test_stage_timing_of_training():
    stage = dict(generation=1, stage="train", start=0.0, end=20.0, seconds=20.0)
    records = [
        dict(kind="train_worker", pid=1, rank=0, start=5.0, end=18.0, loop_s=10.0, tokens=100),
        dict(kind="train_worker", pid=2, rank=1, start=5.0, end=18.0),
    ]
    out = stage_timing(stage, records)
    assert out["compute_s"] == 10.0 and out["startup_s"] == 8.0 and out["tail_s"] == 2.0
    assert out["tokens"] == 100


def test_driver_stage_is_all_other():
    stage = dict(generation=1, stage="curate", start=0.0, end=1.5, seconds=1.5)
    out = stage_timing(stage, [])
    assert out["compute_s"] == 0.0 and out["other_s"] == 1.5


# --------------------------------------------------------------------------- baselines


def test_generation_token_counts(tiny_model_dir):
    from pipeline.model import load_model

    _, tokenizer = load_model(tiny_model_dir)
    assert generation_budget(tokenizer, ["123+456="], max_new_tokens=4, max_length=64) == 4
    # A full answer takes the budget; a short one also took its end-of-sequence token.
    assert sampled_tokens(tokenizer, ["9751", "97", ""], budget=4) == 4 + 3 + 1


def test_plain_scoring_matches_genloop(tiny_model_dir):
    from pipeline.model import example_losses, load_model

    prompts = ["123+456=", "001+002=", "999+999="]
    responses = ["9751", "3000", "8991"]
    losses, steady, whole = plain_scoring(
        tiny_model_dir, prompts, responses, batch_size=2, add_eos=True, max_length=64
    )
    model, tokenizer = load_model(tiny_model_dir)
    expected, _ = example_losses(
        model, tokenizer, prompts, responses, max_length=64, add_eos=True, batch_size=3
    )
    assert losses == pytest.approx(expected, abs=1e-5)
    assert 0 < steady <= whole


# --------------------------------------------------------------------------- command line


def test_parse_only():
    assert bench.parse_only(None) == list(bench.BENCHMARKS)
    assert bench.parse_only("training,scoring") == ["scoring", "training"]
    assert bench.parse_only("e2e") == ["end_to_end"]
    assert bench.parse_only("end-to-end") == ["end_to_end"]
    from pipeline.cli import UsageError

    with pytest.raises(UsageError, match="unknown benchmark nope"):
        bench.parse_only("scoring,nope")
    for empty in ("", ","):  # `--only ""` (an unset shell variable) is not "everything"
        with pytest.raises(UsageError, match="names no benchmark"):
            bench.parse_only(empty)


def test_cli_refuses_bad_flags(capsys):
    from pipeline.cli import main

    assert main(["bench", "--only", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert main(["bench", "--repeats", "0"]) == 2
    assert main(["bench", "train.steps=0"]) == 2


def _result(load=0.1, targets=None):
    benchmarks = _benchmarks(0.95, 1.5, 0.1)
    return {
        "started": "2026-01-01T00:00:00",
        "quick": True,
        "settings": {"repeats": 3},
        "overrides": [],
        "ray_cpus": 2,
        "ray_start_s": 3.0,
        "machine": {
            "cpu": "Test CPU",
            "usable_cores": 2,
            "logical_cores": 2,
            "ram_gib": 8.0,
            "versions": {
                "torch": "2.x",
                "ray": "2.y",
                "deepspeed": "0.z",
                "transformers": "5.w",
            },
            "torch_threads": 2,
            "gpus": [],
            "load_average_start": [load, load, load],
        },
        "hardware": {"peak_flops_per_s": {"1": 1e10, "2": 2e10}},
        "benchmarks": {
            **benchmarks,
            "embedding": {"skipped": "no encoder"},
            "end_to_end": {**benchmarks["end_to_end"], "what": "one generation"},
        },
        "targets": targets if targets is not None else bench.check_targets(benchmarks),
        "seconds": 12.0,
    }


def test_markdown_report():
    text = bench.format_markdown(_result())
    assert "Test CPU" in text and "1 thread(s) 10.0 GFLOP/s" in text
    assert "| scoring | pool 1 | 1 |" in text
    assert "| embedding | skipped: no encoder |" in text
    assert "## End to end" in text and "| generate |" in text
    assert "1.0s from asking for the workers" in text and "spends 3.0s importing" in text
    assert "| scoring, 1 worker / single-process loop | >= 0.90x | 0.95x |" in text
    assert "| met |" in text and "**not met**" in text and "not measured" in text
    assert "- scoring_2w not met:" in text
    assert "Warning" not in text
    # Every table row has as many cells as its header.
    for block in text.split("\n\n"):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        if rows:
            assert len({row.count("|") for row in rows}) == 1, block
    json.dumps(_result())  # the result is JSON as it is


def test_markdown_warns_about_a_busy_machine():
    assert "distorted" in bench.format_markdown(_result(load=16.0))
    result = _result()
    result["hardware"]["peak_flops_per_s"] = {"1": 8e10, "2": 4e9}
    assert "matmul at 2 threads was slower than at 1" in bench.format_markdown(result)


# --------------------------------------------------------------------------- the whole suite


@pytest.mark.slow
def test_bench_quick_end_to_end(tmp_path):
    """`genloop bench --quick` on a real local Ray: every benchmark, real numbers."""
    import ray

    from pipeline.cli import main

    assert not ray.is_initialized()
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    assert not ray.is_initialized()
    result = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.md").read_text().startswith("# genloop bench")
    assert result["machine"]["torch_threads"] >= 1
    assert all(v > 0 for v in result["hardware"]["peak_flops_per_s"].values())
    benchmarks = result["benchmarks"]
    assert set(benchmarks) == set(bench.BENCHMARKS)
    for name in ("scoring", "generation", "training", "embedding"):
        b = benchmarks[name]
        if name == "embedding" and "skipped" in b:
            continue
        assert "error" not in b, b
        for path in b["paths"].values():
            assert path["steady_per_s"] > 0 and path["whole_per_s"] > 0, (name, path)
            assert path["threads"] >= 1
        for ratio in b["ratios"].values():
            assert ratio["steady"] > 0 and ratio["whole"] > 0
    assert benchmarks["scoring"]["checks"]["max_abs_loss_difference"] < 1e-4
    assert benchmarks["training"]["scaling"]["steady"] > 0
    if result["machine"]["torch_threads"] > 1:  # the plain 2-process runs need a second core
        for plain in ("plain_ddp_2w", "plain_alone_2w"):
            assert benchmarks["training"][f"scaling_{plain}"]["steady"] > 0
    e2e = benchmarks["end_to_end"]
    assert "error" not in e2e, e2e
    assert {"generate", "score", "train", "evaluate"} <= set(e2e["per_stage"])
    assert e2e["per_stage"]["train"]["compute_s"] > 0
    assert 0 <= e2e["outside_compute"]["steady"] < 1
    targets = {t["key"]: t for t in result["targets"]}
    assert set(targets) == {t.key for t in bench.TARGETS}
    assert all(t["met"] in (True, False) and not math.isnan(t["value"]) for t in targets.values())
    assert np.isfinite([t["value"] for t in targets.values()]).all()
