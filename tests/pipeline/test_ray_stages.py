"""Generate, score and train on a real local Ray (actor pools, TorchTrainer + DeepSpeed)."""

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import TrainConfig
from pipeline.data import write_parquet
from pipeline.inference import (
    GenerateActor,
    GenerateAndScoreActor,
    ScoreActor,
    _ModelActor,
    kept_workers,
    map_with_actors,
    release_workers,
    worker_env,
)
from pipeline.model import example_losses, load_model
from pipeline.train import TRAIN_STATE, TrainJob, train_generation
from tests.waiting import free_cpus

POOL = pd.DataFrame(
    {
        "prompt_id": range(24),
        "prompt": [f"{i:03d}+{i:03d}=" for i in range(24)],
        "reference": [str(2 * i).zfill(4)[::-1] for i in range(24)],
    }
)

SAMPLING = dict(
    samples_per_prompt=3, max_new_tokens=4, temperature=1.0, top_p=1.0, batch_size=8, max_length=32
)
SCORING = dict(batch_size=16, max_length=32, add_eos=True, train_on_prompt=True)


def test_generate_then_score_on_an_actor_pool(ray_local, tiny_model_dir):
    common = dict(model_dir=tiny_model_dir, trust_remote_code=False, use_gpu=False)
    samples = map_with_actors(
        POOL,
        GenerateActor,
        workers=2,
        use_gpu=False,
        rows_per_batch=8,
        constructor_kwargs=dict(common, **SAMPLING),
    )
    assert len(samples) == 72
    assert samples["prompt_id"].tolist() == [i for i in range(24) for _ in range(3)]
    assert samples["sample"].tolist() == [0, 1, 2] * 24
    assert samples["response"].str.len().max() <= 4

    scored = map_with_actors(
        samples,
        ScoreActor,
        workers=2,
        use_gpu=False,
        rows_per_batch=16,
        constructor_kwargs=dict(common, **SCORING),
    )
    assert len(scored) == 72 and {"loss", "tokens", "length"} <= set(scored.columns)
    # The actor's losses equal a single-process computation on the same rows.
    model, tok = load_model(tiny_model_dir)
    local, _ = example_losses(
        model,
        tok,
        scored["prompt"].tolist()[:5],
        scored["response"].tolist()[:5],
        max_length=32,
        add_eos=True,
        batch_size=5,
    )
    assert scored["loss"].to_numpy()[:5] == pytest.approx(local, abs=1e-5)

    # Generating actors that score their own samples give the ScoreActor pool's columns.
    fused = map_with_actors(
        POOL,
        GenerateAndScoreActor,
        workers=1,
        use_gpu=False,
        rows_per_batch=8,
        constructor_kwargs=dict(
            common, **SAMPLING, score_batch_size=16, add_eos=True, train_on_prompt=True
        ),
    )
    rescored = map_with_actors(
        fused.drop(columns=["loss", "tokens", "length"]),
        ScoreActor,
        workers=1,
        use_gpu=False,
        rows_per_batch=16,
        constructor_kwargs=dict(common, **SCORING),
    )
    assert len(fused) == 72 and fused["tokens"].tolist() == rescored["tokens"].tolist()
    assert fused["loss"].to_numpy() == pytest.approx(rescored["loss"].to_numpy(), abs=1e-5)


def test_seeded_samples_do_not_depend_on_what_the_worker_sampled_before(ray_local, tiny_model_dir):
    stage = dict(
        workers=2,
        use_gpu=False,
        rows_per_batch=8,
        constructor_kwargs=dict(
            model_dir=tiny_model_dir,
            trust_remote_code=False,
            use_gpu=False,
            seed=[0, 14, 1],
            **SAMPLING,
        ),
    )
    with kept_workers():
        first = map_with_actors(POOL, GenerateActor, **stage)
        # The same workers again: their generators have moved on, the samples have not.
        again = map_with_actors(POOL, GenerateActor, **stage)
        stage["constructor_kwargs"]["seed"] = [0, 14, 2]
        other = map_with_actors(POOL, GenerateActor, **stage)
    assert first["response"].tolist() == again["response"].tolist()
    assert first["response"].tolist() != other["response"].tolist()


@pytest.mark.parametrize("zero_stage, in_order", [(2, False), (3, True)])
def test_deepspeed_training_on_two_workers(
    ray_local, tiny_model_dir, tmp_path, zero_stage, in_order
):
    """ZeRO 2 and 3; the ZeRO-3 run also consumes its rows in a given order (ClusterClip's),
    handed over in memory where the ZeRO-2 run reads a Parquet file."""
    mix = pd.DataFrame({"prompt": POOL["prompt"], "response": POOL["reference"]})
    mix = pd.concat([mix] * 4, ignore_index=True)
    mix = mix.assign(position=range(len(mix))[::-1])
    write_parquet(mix, tmp_path / "mix.parquet")
    data = mix if in_order else str(tmp_path / "mix.parquet")
    cfg = TrainConfig(
        steps=12, batch_size=8, lr=3e-3, warmup_steps=0, workers=2, checkpoint_every=6
    )
    cfg.deepspeed.zero_stage = zero_stage
    job = TrainJob(
        init_model=tiny_model_dir, steps=12, seed=0, max_length=32, add_eos=True, in_order=in_order
    )
    checkpoint = tmp_path / "model"
    state = train_generation(job, data, str(tmp_path), cfg, worker_env(), checkpoint)
    assert state["step"] == 12 and state["final"]
    assert json.loads((Path(checkpoint) / TRAIN_STATE).read_text())["step"] == 12
    assert (Path(checkpoint) / "model.safetensors").exists()
    # The trained model loads through from_pretrained and fits the data better than before.
    before, tok = load_model(tiny_model_dir)
    after, _ = load_model(checkpoint)
    args = dict(max_length=32, add_eos=True, batch_size=24)
    loss_before, _ = example_losses(before, tok, mix["prompt"], mix["response"], **args)
    loss_after, _ = example_losses(after, tok, mix["prompt"], mix["response"], **args)
    assert loss_after.mean() < loss_before.mean()


def test_a_mix_smaller_than_one_batch_still_trains(ray_local, tiny_model_dir, tmp_path):
    """A filter that keeps two samples must not crash two data-parallel workers."""
    from pipeline.config import load_config
    from pipeline.loop import Generation, train_stage
    from pipeline.tasks import make_task

    cfg = load_config(None, ["train.steps=3", "train.batch_size=8", "model.max_length=32"])
    task = make_task(cfg.task, 0)
    gen = Generation(tmp_path, 1)
    tiny_mix = pd.DataFrame({"prompt": ["001+002=", "010+020="], "response": ["3000", "0300"]})
    model = train_stage(cfg, task, gen, tiny_model_dir, tiny_mix)
    assert (Path(model) / "model.safetensors").exists()
    assert json.loads(gen.path("train.json").read_text())["step"] == 3


def test_mix_similarity_sees_a_mix_drift_from_the_real_data(ray_local, tmp_path):
    """Generation 0's mix is the real data; a mix of the same kind of text stays close to it,
    a mix of different text moves away (higher MMD, lower centroid cosine)."""
    from pipeline.config import load_config
    from pipeline.loop import Generation, mix_similarity

    cfg = load_config(None, ["diagnostics.mix_embedding_rows=24"])
    sums = [(f"{i:03d}+{3 * i:03d}=", str(4 * i).zfill(4)[::-1]) for i in range(40)]
    words = [("", f"the {w} of the king and queen, my lord") for w in ("love", "war") * 20]
    for index, rows in enumerate([sums[:24], sums[16:40], words[:24]]):
        frame = pd.DataFrame(rows, columns=["prompt", "response"]).assign(source="synthetic")
        write_parquet(frame, Generation(tmp_path, index).path("mix.parquet"))

    assert mix_similarity(cfg, Generation(tmp_path, 0)) == {"rows": 24}
    close = mix_similarity(cfg, Generation(tmp_path, 1))
    far = mix_similarity(cfg, Generation(tmp_path, 2))
    assert close["real_cosine"] > far["real_cosine"]
    assert far["real_mmd"] > 5 * max(close["real_mmd"], 0.01)
    assert far["previous_mmd"] > 5 * max(close["previous_mmd"], 0.01)
    cached = pd.read_parquet(Generation(tmp_path, 2).path("mix_embeddings.parquet"))
    assert len(cached) == 24 and len(cached["embedding"].iloc[0]) == 384
    assert mix_similarity(cfg, Generation(tmp_path, 2)) == far  # from the cached embeddings


class _ThreadsActor:
    """Reports the torch threads an actor of `map_with_actors` runs with."""

    def __init__(self):
        from pipeline.inference import use_all_assigned_cpus

        use_all_assigned_cpus()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import torch

        return batch.assign(threads=torch.get_num_threads())


def test_the_local_ray_passes_its_ray_train_settings_to_every_worker(ray_local):
    from cluster.connect import local_train_settings

    env = ray_local.get_runtime_context().runtime_env.get("env_vars", {})
    assert local_train_settings().items() <= env.items()


def test_a_local_rays_workers_do_not_log_the_placement_group_cleaners_warnings(ray_local):
    """A local Ray has no state API, which Ray Train's PlacementGroupCleaner asks once a
    second; each worker process sets its logger to errors only."""
    import logging

    from cluster.connect import PLACEMENT_GROUP_CLEANER_LOGGER

    @ray_local.remote(num_cpus=0)
    def cleaner_log_level() -> int:
        return logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).getEffectiveLevel()

    assert ray_local.get(cleaner_log_level.remote()) == logging.ERROR


def test_every_worker_process_starts_with_genloops_malloc_settings(ray_local):
    """glibc reads them when a process starts: they must be in the workers' environment."""
    from pipeline.inference import MALLOC_SETTINGS

    @ray_local.remote(num_cpus=0)
    def malloc_environment() -> dict:
        import os

        return {key: os.environ.get(key) for key in MALLOC_SETTINGS}

    assert ray_local.get(malloc_environment.remote()) == MALLOC_SETTINGS


def test_ray_train_does_not_print_a_workers_lines_twice(ray_local):
    """Ray Train's print patch would send every print to its logger and to stdout."""
    from pipeline.inference import PRINT_SETTINGS

    @ray_local.remote(num_cpus=0)
    def print_settings() -> dict:
        import os

        return {key: os.environ.get(key) for key in PRINT_SETTINGS}

    assert ray_local.get(print_settings.remote()) == {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def test_a_stage_shares_the_clusters_cpus_among_its_workers(ray_local):
    from cluster.connect import cpus_per_worker

    assert [cpus_per_worker(n) for n in (1, 2, 3)] == [2, 1, 1]  # a 2-CPU local Ray
    assert cpus_per_worker(1, requested=1) == 1
    rows = pd.DataFrame({"x": range(4)})
    common = dict(use_gpu=False, constructor_kwargs={}, rows_per_batch=2)
    alone = map_with_actors(rows, _ThreadsActor, workers=1, **common)
    assert alone["threads"].tolist() == [2] * 4  # one actor: both cores
    pinned = map_with_actors(rows, _ThreadsActor, workers=1, cpus_per_worker=1, **common)
    assert pinned["threads"].tolist() == [1] * 4


def test_an_in_order_job_reads_its_shard_in_position_order(ray_local, tiny_model_dir):
    """ClusterClip's order survives Ray Data: a worker sorts its shard by `position`."""
    import numpy as np
    import ray

    from pipeline.train import _tokenized_shard, consecutive_batches

    _, tokenizer = load_model(tiny_model_dir)
    rng = np.random.default_rng(0)
    positions = rng.permutation(40)
    rows = pd.DataFrame(
        {"prompt": "", "response": [f"{p:03d}" for p in positions], "position": positions}
    )
    shard = ray.data.from_pandas([rows.iloc[i : i + 10] for i in range(0, 40, 10)]).iterator()
    job = TrainJob(init_model=tiny_model_dir, steps=1, seed=0, max_length=8, add_eos=True)
    ordered = _tokenized_shard(shard, tokenizer, 8, dataclasses.replace(job, in_order=True))
    texts = [tokenizer.decode(ids[start:-1]) for ids, start in ordered]
    assert texts == [f"{p:03d}" for p in range(40)]
    batches = consecutive_batches(len(ordered), 16)
    assert [b.tolist() for b in batches] == [list(range(16)), list(range(16, 32))]


class _ProcessStage(_ModelActor):
    """Which process ran each row, and which loaded model object it used."""

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import os

        return batch.assign(pid=os.getpid(), model=id(self.model))


def test_kept_workers_serve_consecutive_stages_and_hand_their_cpus_back(ray_local, tiny_model_dir):
    rows = pd.DataFrame({"x": range(8)})
    stage = dict(
        use_gpu=False,
        rows_per_batch=2,
        constructor_kwargs=dict(model_dir=tiny_model_dir, trust_remote_code=False, use_gpu=False),
    )
    with kept_workers():
        first = map_with_actors(rows, _ProcessStage, workers=2, **stage)
        second = map_with_actors(rows, _ProcessStage, workers=2, **stage)
        assert first["x"].tolist() == second["x"].tolist() == list(range(8))
        # The same two processes, each still holding the model it loaded the first time.
        assert first["pid"].nunique() == 2
        assert set(zip(first["pid"], first["model"])) == set(zip(second["pid"], second["model"]))
        assert free_cpus(ray_local, 2) == 0  # the pool holds the cluster's CPUs meanwhile
        release_workers()  # what training does first
        assert free_cpus(ray_local, 2) == 2
        # The idle workers held no CPU; the next call leases the CPUs again for the same
        # processes, which still hold their model.
        third = map_with_actors(rows, _ProcessStage, workers=2, **stage)
        assert set(zip(third["pid"], third["model"])) == set(zip(first["pid"], first["model"]))
        assert free_cpus(ray_local, 2) == 0
        # One worker with both CPUs is what the two one-CPU workers hold in all: they serve it.
        both = map_with_actors(rows, _ProcessStage, workers=1, **stage)
        assert set(both["pid"]) == set(third["pid"])
        # One CPU is less than the pool holds: a pool of that size takes its place.
        alone = map_with_actors(rows, _ProcessStage, workers=1, cpus_per_worker=1, **stage)
        assert alone["pid"].nunique() == 1 and not set(alone["pid"]) & set(third["pid"])
        assert free_cpus(ray_local, 1) == 1
    assert free_cpus(ray_local, 2) == 2  # the block's end ends the pool
    # Outside kept_workers() every call starts its own workers and ends them.
    once = map_with_actors(rows, _ProcessStage, workers=2, **stage)
    assert not set(once["pid"]) & set(alone["pid"])
    assert free_cpus(ray_local, 2) == 2


def test_a_passed_lease_serves_the_next_stage_that_asks_for_the_same_cpus(ray_local):
    from pipeline import inference
    from pipeline.inference import drop_passed_lease, lease_cpus, pass_lease, return_lease

    lease = lease_cpus(1, 2)
    nodes = inference.lease_nodes(lease, 2)
    pass_lease(lease)
    assert free_cpus(ray_local, 2, timeout_s=0.5) == 0  # still held, for the next stage
    again = lease_cpus(1, 2, nodes)  # the same CPUs on the same nodes: the same lease
    assert again.id == lease.id
    # Another shape gets a lease of its own; the passed one goes back.
    pass_lease(again)
    other = lease_cpus(2, 1)
    assert other.id != lease.id
    return_lease(other)
    assert free_cpus(ray_local, 2) == 2
    # Nobody asking: it goes back by itself, so a task that needs the CPUs is not starved.
    pass_lease(lease_cpus(1, 2))
    assert free_cpus(ray_local, 2, timeout_s=inference.PASSED_LEASE_SECONDS + 5) == 2
    drop_passed_lease()  # nothing left to drop
    assert free_cpus(ray_local, 2) == 2


def test_a_model_directory_is_loaded_once_until_it_is_rewritten(tiny_model_dir, tmp_path):
    import shutil

    from pipeline.inference import _load_once

    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir, directory)
    model, _ = _load_once(str(directory), False, "cpu", None)
    assert _load_once(str(directory), False, "cpu", None)[0] is model
    # A new generation's model replaces the directory whole (written aside, renamed in).
    shutil.copytree(tiny_model_dir, tmp_path / "next")
    shutil.rmtree(directory)
    (tmp_path / "next").rename(directory)
    assert _load_once(str(directory), False, "cpu", None)[0] is not model


def test_workers_that_cannot_fit_on_the_local_ray_are_a_clear_error(ray_local):
    """A stage would wait forever for CPUs that a local Ray will never have."""
    from cluster.connect import ClusterError, check_local_fit

    check_local_fit({"generate.workers": 2, "train.workers": 1})  # 2 x 1 CPU, 1 x 2 CPUs
    with pytest.raises(ClusterError, match=r"^train\.workers=4: 4 worker\(s\) x 1 CPU\(s\)"):
        check_local_fit({"generate.workers": 2, "train.workers": 4})
    with pytest.raises(ClusterError, match="lower eval.workers or ray.cpus_per_worker"):
        check_local_fit({"eval.workers": 1}, requested=3)
