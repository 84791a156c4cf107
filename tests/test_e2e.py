"""The whole loop on a real local Ray: a 2-generation smoke run, a resume, and a crash."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import main
from tests.tiny import TINY_RUN

TINY = [*TINY_RUN, "diagnostics.mix_embedding_rows=32"]  # the mix-drift stage runs too
STAGES = ["generate", "score", "curate", "select", "mix", "train", "evaluate", "tracked"]


def _markers(run_dir: Path) -> dict[str, float]:
    return {
        str(p.relative_to(run_dir)): p.stat().st_mtime_ns
        for p in sorted(run_dir.glob("gen_*/.done/*"))
    }


@pytest.mark.slow
def test_two_generations_then_resume_for_a_third(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --run-dir: Ray workers must still find the models
    run_dir = tmp_path / "run"
    argv = [
        "run",
        "--run-dir",
        "run",
        "loop.generations=2",
        "curate=none",
        "select.method=loss-lowest",
        "select.budget=0.5",
        *TINY,
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[gen 2/2] evaluate" in out and str(run_dir.resolve()) in out

    table = pd.read_csv(run_dir / "metrics.csv")
    assert table["generation"].tolist() == [0, 1, 2]
    assert table["accuracy"].between(0, 1).all() and (table["perplexity"] > 1).all()
    for gen in ("gen_01", "gen_02"):
        assert sorted(p.name for p in (run_dir / gen / ".done").iterdir()) == sorted(STAGES)
        scored = pd.read_parquet(run_dir / gen / "curated_samples.parquet")
        assert len(scored) == 48 * 4
        assert {"loss", "correct", "length", "kept", "drop_reason"} <= set(scored.columns)
        assert (scored.loc[~scored["kept"], "drop_reason"] != "").all()
        assert (run_dir / gen / "model" / "model.safetensors").exists()
    assert (run_dir / "metrics.png").stat().st_size > 1000
    # Data selection kept the half of the samples with the lowest loss, and only those trained.
    selected = pd.read_parquet(run_dir / "gen_01" / "selected.parquet")
    losses = pd.read_parquet(run_dir / "gen_01" / "curated_samples.parquet")["loss"]
    assert len(selected) == 48 * 4 // 2
    assert selected["loss"].max() <= losses.sort_values().iloc[len(selected) - 1] + 1e-6
    assert table.loc[1, "synthetic"] == len(selected)
    metrics = json.loads((run_dir / "gen_01" / "metrics.json").read_text())
    assert metrics["curate"]["kept"] + metrics["curate"]["dropped"] == 48 * 4
    # The mix's drift from the real data, from 32 embedded rows per mix.
    assert metrics["mix_similarity"]["rows"] == 32
    assert -1 <= metrics["mix_similarity"]["real_cosine"] <= 1
    assert table["mix_real_mmd"].iloc[1:].notna().all()
    gen2 = json.loads((run_dir / "gen_02" / "metrics.json").read_text())
    assert set(gen2["tokens"]["mean_delta_vs_gen0"]) == set(gen2["tokens"]["mean_delta"])

    before = _markers(run_dir)
    assert main(["run", "--run-dir", "run", "--resume", "loop.generations=3"]) == 0
    out = capsys.readouterr().out
    assert out.count("(done earlier)") == 3 + 7 * 2  # gen 0: mix, train, evaluate
    after = _markers(run_dir)
    assert {k: after[k] for k in before} == before  # nothing finished was redone
    assert pd.read_csv(run_dir / "metrics.csv")["generation"].tolist() == [0, 1, 2, 3]


PAIRS = [
    "task.name=pairs",
    "task.fields={prompt: question, response: answer}",
    "task.verifier=final-number",
    "task.heldout_limit=30",
    "task.pool_prompts=24",
    "task.validation_prompts=0",
    "loop.gen0_steps=10",
    "loop.gen0_target_accuracy=null",
    "train.steps=6",
    "train.batch_size=8",
    "generate.samples_per_prompt=2",
    "generate.batch_size=24",
    "eval.batch_size=30",
    "model.max_length=64",
    "diagnostics.mix_embedding_rows=16",
]


@pytest.mark.slow
def test_a_killed_driver_resumes_without_recomputing(tmp_path, gsm8k, tiny_model_dir):
    """User data (GSM8K question/answer) and a user model (an HF directory via model.path);
    the driver and its local Ray are killed after generation 1's scoring, then resumed."""
    data = tmp_path / "gsm8k_head.jsonl"
    data.write_text("".join(gsm8k.read_text().splitlines(keepends=True)[:300]))
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        "--run-dir",
        str(run_dir),
        "loop.generations=2",
        f"task.path={data}",
        f"model.path={tiny_model_dir}",
        *PAIRS,
    ]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    deadline = time.time() + 300
    for line in proc.stdout:
        if "[gen 1/2] score" in line or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    before = _markers(run_dir)
    assert "gen_01/.done/score" in before and "gen_02/.done/train" not in before

    assert main(["run", "--run-dir", str(run_dir), "--resume"]) == 0
    after = _markers(run_dir)
    assert {k: after[k] for k in before} == before
    table = pd.read_csv(run_dir / "metrics.csv")
    assert table["generation"].tolist() == [0, 1, 2]
    assert not list(run_dir.rglob(".*.tmp"))
    scored = pd.read_parquet(run_dir / "gen_02" / "curated_samples.parquet")
    assert len(scored) == 24 * 2 and scored["response"].str.len().max() > 0


@pytest.mark.slow
def test_a_run_at_a_storage_uri_resumes_on_another_machine(tmp_path, capsys, monkeypatch):
    """`--run-dir` as a URI (file:// here; s3:// or gs:// the same way through pyarrow): every
    stage lands at the URI, Ray Train checkpoints included, and a second machine (a fresh
    cache, so no local mirror) resumes from the URI alone without redoing anything."""
    bucket = tmp_path / "bucket"
    uri = (bucket / "run").as_uri()
    monkeypatch.setenv("GENLOOP_CACHE", str(tmp_path / "machine_a"))
    argv = ["run", "--run-dir", uri, "loop.generations=1", "curate=none", *TINY]
    assert main(argv) == 0
    assert uri in capsys.readouterr().out
    run = bucket / "run"
    assert sorted(p.name for p in (run / "gen_01" / ".done").iterdir()) == sorted(
        set(STAGES) - {"select"}
    )
    assert (run / "gen_01" / "model" / "model.safetensors").exists()
    assert list((run / "gen_01" / "train").glob("checkpoint_*/train_state.json"))
    assert pd.read_csv(run / "metrics.csv")["generation"].tolist() == [0, 1]
    before = _markers(run)

    monkeypatch.setenv("GENLOOP_CACHE", str(tmp_path / "machine_b"))
    assert main(["run", "--run-dir", uri, "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("(done earlier)") == 3 + 6  # gen 0: mix, train, evaluate; gen 1: six
    assert _markers(run) == before  # nothing redone, nothing re-sent
    assert (tmp_path / "machine_b" / "mirrors").is_dir()
    assert main(["run", "--run-dir", uri, *TINY]) == 2  # a new run may not overwrite it
    assert "already holds a run" in capsys.readouterr().err
