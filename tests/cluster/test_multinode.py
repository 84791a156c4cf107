"""genloop on a two-node Ray cluster (both nodes on this machine, token auth on).

One run is submitted through the job server (`genloop submit`), followed with
`genloop jobs logs --follow`, and in the middle of generation 0, right after the training
workers have stored a checkpoint, the worker node holding one of them is SIGKILLed whole
(raylet, agents, workers), as when a machine dies; a replacement node then joins, as an
autoscaler would bring one. The tests then check that
  - the run succeeded, with its training workers on two nodes in each attempt (Ray's state
    API), and the replacement workers also trained generation 1 (kept workers), and
  - training went on from that checkpoint, not from step 0, ending with complete metrics.
One job for both keeps the module at one run's length: every new Ray worker imports torch,
DeepSpeed and transformers, which takes most of the time on a small machine.

Slow and CPU-bound (both cores of a 2-core machine; 5-8 minutes there under load):
    pytest -m slow tests/cluster/test_multinode.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import requests

from tests.tiny import TINY_RUN

REPO = Path(__file__).resolve().parents[2]
# Needs both cores for minutes; part of `make test`, and alone: `make test-cluster`.
pytestmark = [pytest.mark.slow, pytest.mark.multinode]

ONE_PER_STAGE = ["train.workers=2", "generate.workers=1", "score.workers=1", "eval.workers=1"]
GEN0_STEPS, CHECKPOINT_EVERY = 60, 10  # room to kill a worker between two checkpoints
TIMEOUT_S = 1200


def genloop(cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The genloop command line, as a user with the cluster's token would run it."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=cluster.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _get(cluster, path: str, **params) -> dict:
    r = requests.get(
        cluster.dashboard_url + path,
        params=params,
        headers={"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"},
        timeout=10,
    )
    r.raise_for_status()
    return r.json()


def state(cluster, resource: str, **filters: str) -> list[dict]:
    """Ray's state API (what `ray list actors --detail` shows), over HTTP."""
    params = {"limit": 1000, "detail": 1}
    if filters:
        params.update(
            filter_keys=list(filters),
            filter_predicates=["="] * len(filters),
            filter_values=list(filters.values()),
        )
    return _get(cluster, f"/api/v0/{resource}", **params)["data"]["result"]["result"]


def train_workers(cluster, job_id: str) -> list[dict]:
    ray_job = _get(cluster, f"/api/jobs/{job_id}")["job_id"]  # the driver's job, e.g. 02000000
    actors = state(cluster, "actors", class_name="RayTrainWorker")
    return [a for a in actors if a["job_id"] == ray_job]


@dataclass
class KilledRun:
    """What the test saw of the run, for the assertions."""

    job_id: str
    run_dir: Path
    status: str = ""
    seconds: float = 0.0
    follow: subprocess.CompletedProcess | None = None  # `genloop jobs logs --follow`
    killed: dict | None = None  # the RayTrainWorker actor that was SIGKILLed
    killed_at_step: int = 0  # the newest whole checkpoint at that moment
    first_attempt: list[dict] = field(default_factory=list)  # workers alive at the kill
    checkpoints_before: dict[str, int] = field(default_factory=dict)  # directory -> step
    checkpoints_after: dict[str, int] = field(default_factory=dict)


@pytest.fixture(scope="module")
def killed_run(two_nodes, tmp_path_factory) -> KilledRun:
    cluster, url = two_nodes, two_nodes.dashboard_url
    run_dir = tmp_path_factory.mktemp("multinode") / "run"
    started = time.perf_counter()
    out = genloop(
        cluster,
        "submit",
        "--address",
        url,
        "--",
        "run",
        "--run-dir",
        str(run_dir),
        "loop.generations=1",
        "curate=none",  # generation 1 trains on every sample, so both generations train
        *TINY_RUN,
        *ONE_PER_STAGE,
        f"loop.gen0_steps={GEN0_STEPS}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}",
        "train.max_failures=2",
        "ray.address=auto",
    )
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"submitted job (\S+)", out.stdout).group(1)
    follower = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "jobs", "logs", job_id, "--address", url]
        + ["--follow"],
        env=cluster.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    train_dir = run_dir / "gen_00" / "train"
    run = KilledRun(job_id, run_dir)
    seen: dict[str, int] = {}
    try:
        while time.perf_counter() - started < TIMEOUT_S:
            run.status = _get(cluster, f"/api/jobs/{job_id}")["status"]
            if run.status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            # The newest whole checkpoint, from the same look that records what was there
            # before the kill (two looks could see a checkpoint land in between).
            _note_checkpoints(train_dir, seen)
            step = max(seen.values(), default=0)
            if run.killed is None and CHECKPOINT_EVERY <= step < GEN0_STEPS:
                alive = [w for w in train_workers(cluster, job_id) if w["state"] == "ALIVE"]
                nodes = {n["node_id"]: n for n in state(cluster, "nodes")}
                # Training workers on the worker node: the head node keeps the driver going.
                victims = [w for w in alive if not nodes[w["node_id"]]["is_head_node"]]
                if victims:
                    cluster.kill_node(cluster.worker)  # the machine dies, workers with it
                    run.killed, run.killed_at_step, run.first_attempt = victims[0], step, alive
                    run.checkpoints_before = dict(seen)
                    print(
                        f"\nkilled the worker node {victims[0]['node_id'][:12]} (its raylet, "
                        f"agents and RayTrainWorker pid {victims[0]['pid']}) "
                        f"{time.perf_counter() - started:.0f}s into job {job_id}; last "
                        f"committed checkpoint: step {step}"
                    )
                    # A replacement machine joins, as an autoscaler or KubeRay would bring.
                    cluster.worker = cluster.add_worker_node("replacement")
                    joined = time.perf_counter() - started
                    print(f"a replacement worker node joined {joined:.0f}s into the job")
            time.sleep(0.3)
        out, _ = follower.communicate(timeout=120)
    finally:
        if follower.poll() is None:
            follower.kill()
    _note_checkpoints(train_dir, seen)
    run.follow = subprocess.CompletedProcess(follower.args, follower.returncode, out, "")
    run.checkpoints_after = {k: v for k, v in seen.items() if k not in run.checkpoints_before}
    run.seconds = time.perf_counter() - started
    print(f"job {job_id}: {run.status} after {run.seconds:.0f}s")
    return run


def _note_checkpoints(train_dir: Path, seen: dict[str, int]) -> None:
    """Whole checkpoint directories in the order they appear, with the step each holds. Its
    train state is written last: a directory without one may still be being copied."""
    for state_file in sorted(train_dir.glob("checkpoint_*/train_state.json")):
        if state_file.parent.name not in seen:
            try:
                seen[state_file.parent.name] = json.loads(state_file.read_text())["step"]
            except (OSError, ValueError):
                pass  # being written; seen on the next look


def test_a_submitted_run_succeeds_and_trains_on_both_nodes(two_nodes, killed_run):
    url, job_id = two_nodes.dashboard_url, killed_run.job_id
    status = genloop(two_nodes, "jobs", "status", job_id, "--address", url)
    logs = genloop(two_nodes, "jobs", "logs", job_id, "--address", url).stdout
    assert f"{job_id}: SUCCEEDED" in status.stdout, logs[-4000:]
    assert "Ray cluster at auto" in logs and "[gen 1/1] evaluate" in logs
    assert "genloop: finished" in logs
    follow = killed_run.follow
    assert follow.returncode == 0 and "genloop: finished" in follow.stdout
    assert f"genloop: job {job_id} SUCCEEDED" in follow.stdout

    table = pd.read_csv(killed_run.run_dir / "metrics.csv")
    assert table["generation"].tolist() == [0, 1]
    assert table["perplexity"].notna().all() and table["accuracy"].between(0, 1).all()

    nodes = {n["node_id"]: n for n in state(two_nodes, "nodes")}
    assert len(nodes) == 3  # the head, the killed worker node, its replacement
    workers = train_workers(two_nodes, job_id)
    first = {w["pid"] for w in killed_run.first_attempt}
    dead = {node for node, n in nodes.items() if n["state"] == "DEAD"}
    assert len(dead) == 1 and not nodes[next(iter(dead))]["is_head_node"]
    before = [w for w in workers if w["pid"] in first]
    after = [w for w in workers if w["pid"] not in first]
    assert {w["node_id"] for w in before} == dead | {_head(nodes)}, "not on both first nodes"
    assert {w["node_id"] for w in after} == set(nodes) - dead, "not on the head and replacement"
    for w in workers:
        role = "head" if nodes[w["node_id"]]["is_head_node"] else "worker"
        print(f"  RayTrainWorker pid {w['pid']:>6} on the {role} node {w['node_id'][:12]}")


def _head(nodes: dict) -> str:
    return next(node for node, n in nodes.items() if n["is_head_node"])


def test_a_killed_node_is_replaced_and_training_resumes(two_nodes, killed_run):
    assert killed_run.killed is not None, (
        f"training ended before a checkpoint was committed: {killed_run.checkpoints_before}"
    )
    assert killed_run.status == "SUCCEEDED"
    gen0 = killed_run.run_dir / "gen_00"
    # The generation finished, with complete metrics.
    train = json.loads((gen0 / "train.json").read_text())
    assert train["step"] == GEN0_STEPS and train["final"] is True
    assert [e["step"] for e in train["log"]] == [50, GEN0_STEPS]
    metrics = json.loads((gen0 / "metrics.json").read_text())
    assert {"accuracy", "perplexity", "heldout_loss", "train"} <= set(metrics)
    assert metrics["train"]["step"] == GEN0_STEPS

    # The killed node's worker died with it, and a new group of two took over; the same
    # group then trained generation 1.
    workers = {w["pid"]: w for w in train_workers(two_nodes, killed_run.job_id)}
    gen1 = json.loads((killed_run.run_dir / "gen_01" / "train.json").read_text())
    assert gen1["step"] > 0 and gen1["final"] is True
    assert len(workers) == 2 + 2  # first attempt, its replacement
    # One resumption, from the checkpoint seen at the kill or a newer one.
    assert len(train["resumed"]) == 1 and train["resumed"][0] >= killed_run.killed_at_step
    # It is dead, with its node (Ray Train may have cleaned it up with ray.kill first).
    assert workers[killed_run.killed["pid"]]["state"] == "DEAD"
    nodes = {n["node_id"]: n for n in state(two_nodes, "nodes")}
    assert nodes[killed_run.killed["node_id"]]["state"] == "DEAD"
    # It went on from the committed checkpoint: every checkpoint written after the kill is
    # past that step (from scratch, the first would be step CHECKPOINT_EVERY again).
    after = sorted(killed_run.checkpoints_after.values())
    assert after and after[0] > killed_run.killed_at_step, killed_run
    assert after[-1] == GEN0_STEPS
    print(f"  gen 0 checkpoints before the kill: {sorted(killed_run.checkpoints_before.values())}")
    print(f"  gen 0 checkpoints after the kill:  {after}")


def test_an_unknown_job_id_is_one_line(two_nodes):
    out = genloop(
        two_nodes, "jobs", "status", "raysubmit_nope", "--address", two_nodes.dashboard_url
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip() == f"genloop: error: no job raysubmit_nope on {two_nodes.dashboard_url}"
    )
