"""The whole loop on a real local Ray: a 2-generation smoke run, a resume, and a crash."""

import json
import os
import shutil
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
        "select.pool=both",
        "mix.real_fraction=0.2",
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
    # select.pool=both: the real rows too, scored by generation 0's model; only those mix in.
    real = pd.read_parquet(run_dir / "gen_01" / "selected_real.parquet")
    assert len(real) == 100 and real["selection_reason"].str.contains("loss").all()
    mix = pd.read_parquet(run_dir / "gen_01" / "mix.parquet")
    assert set(mix.loc[mix.source == "real", "prompt"]) <= set(real["prompt"])
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
    # Each marker records the files its stage wrote; a resume refuses a run that lost one.
    trained = json.loads((run_dir / "gen_03" / ".done" / "train").read_text())["outputs"]
    assert {"train.json", "model/model.safetensors", "model/config.json"} <= set(trained)
    (run_dir / "gen_01" / "curated.parquet").unlink()
    assert main(["run", "--run-dir", "run", "--resume"]) == 2
    assert "gen_01/curated.parquet: missing, yet gen_01/.done/curate" in capsys.readouterr().err


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
    printed = []
    for line in proc.stdout:
        printed.append(line)
        if "[gen 1/2] score" in line or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    # Ray's notice that it turned token auth on is not the user's business on a local Ray.
    assert printed and not any("Token authentication" in line for line in printed), printed
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


@pytest.fixture
def s3_bucket(tmp_path, monkeypatch):
    """A real S3 API (moto's server, on loopback) with an empty bucket; genloop, Ray Train and
    the Ray workers reach it through pyarrow, the endpoint given as AWS_ENDPOINT_URL the way a
    user points at MinIO or another S3-compatible store."""
    import socket
    import urllib.request

    pafs = pytest.importorskip("pyarrow.fs")
    if not shutil.which("moto_server", path=os.path.dirname(sys.executable)):
        pytest.skip("moto[server] is not installed (the dev extra has it)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "moto_server"),
            "-H",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    s3 = pafs.S3FileSystem(
        endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True
    )
    s3.create_dir("genloop-test")
    yield s3, "genloop-test"
    server.terminate()
    server.wait(timeout=30)


def _s3_markers(s3, run: str) -> dict[str, int]:
    from pyarrow.fs import FileSelector

    return {
        info.path[len(run) + 1 :]: info.mtime_ns
        for info in s3.get_file_info(FileSelector(run, recursive=True))
        if "/.done/" in info.path and info.path[len(run) + 1 :].startswith("gen_")
    }


@pytest.mark.slow
def test_a_run_on_s3_resumes_on_another_machine(tmp_path, capsys, monkeypatch, s3_bucket):
    """`--run-dir s3://...`: every stage lands in the bucket, Ray Train checkpoints included,
    and a second machine (a fresh cache, so no local mirror) resumes from the URI alone
    without redoing anything. file:// URIs take the same path (tests/pipeline/test_storage.py)."""
    s3, bucket = s3_bucket
    run, uri = f"{bucket}/run", f"s3://{bucket}/run"
    monkeypatch.setenv("GENLOOP_CACHE", str(tmp_path / "machine_a"))
    argv = ["run", "--run-dir", uri, "loop.generations=1", "curate=none", *TINY]
    assert main(argv) == 0
    assert uri in capsys.readouterr().out
    assert sorted(name.split("/")[-1] for name in _s3_markers(s3, run) if "gen_01" in name) == (
        sorted(set(STAGES) - {"select"})
    )
    assert s3.get_file_info(f"{run}/gen_01/model/model.safetensors").size > 0
    from pyarrow.fs import FileSelector

    listed = s3.get_file_info(FileSelector(f"{run}/gen_01/train", recursive=True))
    assert any(info.path.endswith("/train_state.json") for info in listed)
    with s3.open_input_stream(f"{run}/metrics.csv") as f:
        assert pd.read_csv(f)["generation"].tolist() == [0, 1]
    before = _s3_markers(s3, run)

    monkeypatch.setenv("GENLOOP_CACHE", str(tmp_path / "machine_b"))
    assert main(["run", "--run-dir", uri, "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("(done earlier)") == 3 + 6  # gen 0: mix, train, evaluate; gen 1: six
    assert _s3_markers(s3, run) == before  # nothing redone, nothing re-sent
    assert (tmp_path / "machine_b" / "mirrors").is_dir()
    assert main(["run", "--run-dir", uri, *TINY]) == 2  # a new run may not overwrite it
    assert "already holds a run" in capsys.readouterr().err
