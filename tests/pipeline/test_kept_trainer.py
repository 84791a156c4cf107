"""Kept training workers (`kept_trainer`): one Ray Train fit serving job after job, on a real
local Ray with DeepSpeed, against fits of their own."""

import json
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from pipeline.config import TrainConfig
from pipeline.inference import worker_env
from pipeline.model import load_model
from pipeline.train import TRAIN_STATE, TrainJob, kept_trainer, train_generation
from tests.waiting import free_cpus

MIX = pd.DataFrame(
    {
        "prompt": [f"{i:03d}+{i:03d}=" for i in range(96)],
        "response": [str(2 * i).zfill(4)[::-1] for i in range(96)],
    }
)


def _job(model_dir: str | Path, steps: int, seed: int = 0) -> TrainJob:
    return TrainJob(init_model=str(model_dir), steps=steps, seed=seed, max_length=32, add_eos=True)


def _config(steps: int, checkpoint_every: int, max_failures: int = 0) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=8,
        lr=3e-3,
        warmup_steps=0,
        workers=2,
        checkpoint_every=checkpoint_every,
        max_failures=max_failures,
    )


def _train(job: TrainJob, cfg: TrainConfig, generation: Path, mix: pd.DataFrame = MIX) -> dict:
    """train_generation as the loop calls it: the generation's directory holds its `train`
    checkpoints, and the model lands in its `model`."""
    return train_generation(job, mix, str(generation), cfg, worker_env(), generation / "model")


def _same_weights(a: str | Path, b: str | Path) -> bool:
    first, _ = load_model(str(a))
    second, _ = load_model(str(b))
    return all((x == y).all() for x, y in zip(first.parameters(), second.parameters()))


def _checkpoint_steps(train_dir: Path) -> list[int]:
    return sorted(
        json.loads(state.read_text())["step"] for state in train_dir.glob(f"*/{TRAIN_STATE}")
    )


def test_one_set_of_workers_trains_each_generation_as_a_fit_of_its_own_would(
    ray_local, tiny_model_dir, tmp_path
):
    cfg = _config(steps=6, checkpoint_every=2)
    first, second, fresh = tmp_path / "g0", tmp_path / "g1", tmp_path / "fresh"
    with kept_trainer(tmp_path / "run") as trainer:
        states = [
            _train(_job(tiny_model_dir, 6), cfg, first),
            _train(_job(first / "model", 6, seed=1), cfg, second),
        ]
        # Between jobs the workers hold no CPU: inference stages get the cluster's CPUs.
        assert free_cpus(ray_local, 2) == 2
    assert trainer.fits == 1  # both generations on the same workers
    assert [s["step"] for s in states] == [6, 6] and all(s["final"] for s in states)
    # Two workers on one node, a core each: gradients averaged through shared memory.
    assert [s["gradient_sync"] for s in states] == ["shared-memory"] * 2
    # The second job on workers that trained before: bit for bit what a fit of its own trains.
    _train(_job(first / "model", 6, seed=1), cfg, fresh)
    assert _same_weights(second / "model", fresh / "model")
    assert not _same_weights(second / "model", first / "model")
    # Each job keeps its newest two checkpoints in its own train directory.
    assert _checkpoint_steps(second / "train") == [4, 6]


def _kill_a_worker_after_a_checkpoint(train_dir: Path, killed: list[int]) -> None:
    """Once `train_dir` holds a whole checkpoint, SIGKILL one Ray Train worker process."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _checkpoint_steps(train_dir):
        time.sleep(0.05)
    for process in psutil.process_iter(["pid", "cmdline"]):
        if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
            killed.append(_checkpoint_steps(train_dir)[-1])
            process.kill()
            return


def test_a_worker_that_dies_is_replaced_and_its_job_resumes_from_the_newest_checkpoint(
    ray_local, tiny_model_dir, tmp_path
):
    cfg = _config(steps=300, checkpoint_every=5, max_failures=1)
    killed: list[int] = []
    with kept_trainer(tmp_path / "run") as trainer:
        # The workers are up and warm: the kill lands in the middle of the second job.
        _train(_job(tiny_model_dir, 5), cfg, tmp_path / "g0")
        killer = threading.Thread(
            target=_kill_a_worker_after_a_checkpoint, args=(tmp_path / "g1" / "train", killed)
        )
        killer.start()
        state = _train(_job(tiny_model_dir, 300), cfg, tmp_path / "g1")
        killer.join()
    assert killed and 5 <= killed[0] < 300, "no worker was killed mid-job"
    assert trainer.fits == 2  # the fit that lost a worker, and its replacement
    assert state["step"] == 300 and state["final"]
    # The replacement went on from a checkpoint at or after the kill, not from step 0.
    assert len(state["resumed"]) == 1 and state["resumed"][0] >= killed[0]


def test_a_job_that_fails_raises_and_the_next_job_starts_new_workers(
    ray_local, tiny_model_dir, tmp_path
):
    cfg = _config(steps=2, checkpoint_every=0, max_failures=0)
    too_small = MIX.head(4)  # 2 rows per worker: less than one batch of 4
    with kept_trainer(tmp_path / "run") as trainer:
        with pytest.raises(Exception, match="smaller than one batch per worker"):
            _train(_job(tiny_model_dir, 2), cfg, tmp_path / "bad", mix=too_small)
        assert trainer.fits == 1  # no retry with train.max_failures=0
        state = _train(_job(tiny_model_dir, 2), cfg, tmp_path / "ok")
    assert state["step"] == 2 and trainer.fits == 2
