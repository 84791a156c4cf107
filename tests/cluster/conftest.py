"""A two-node Ray cluster on this one machine, started with `ray start` and token auth.

Both nodes listen on loopback and get their own ports (dashboard, agents, Ray Client), so the
cluster never collides with another Ray on the machine. The token is generated for the test
and passed in the environment (RAY_AUTH_TOKEN): `~/.ray/auth_token` is neither read nor
written. Teardown stops exactly the processes this fixture started: the two `ray start --block`
process groups and every process they had spawned (workers, job drivers), by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    """What a test needs to talk to the cluster, and the processes to stop afterwards."""

    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]  # the environment of a client allowed in (token auth)
    procs: list[subprocess.Popen] = field(default_factory=list)
    worker: subprocess.Popen | None = None  # the worker node's `ray start`

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def start_node(self, *args: str, name: str) -> None:
        command = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", *args]
        with open(self.temp_dir / f"{name}.log", "w") as log:
            proc = subprocess.Popen(
                [*command, "--disable-usage-stats"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: teardown signals the group
            )
        self.procs.append(proc)

    def add_worker_node(self, name: str) -> subprocess.Popen:
        """Start a worker node (1 CPU, resource `workernode`) and wait until it is alive."""
        known = _alive_node_ids(self)
        for attempt in (1, 2):  # a raylet may give up on its agents on a loaded machine
            self.start_node(
                f"--address={self.gcs_address}",
                *_node_ports(),
                "--num-cpus=1",
                "--resources=" + json.dumps({"workernode": 1}),
                name=f"{name}{attempt}",
            )
            node = self.procs[-1]
            wait_for(
                lambda: bool(_alive_node_ids(self) - known) or node.poll() is not None,
                120,
                f"the {name} node",
            )
            if node.poll() is None:
                return node
            _kill_group(node.pid)  # what the failed `ray start` left behind
        raise RuntimeError(f"the {name} node did not start; see {self.temp_dir}")

    def kill_node(self, node: subprocess.Popen) -> None:
        """SIGKILL a node as if its machine died: the `ray start` process group and every
        process it spawned (raylet, agents, workers)."""
        import psutil

        try:
            leader = psutil.Process(node.pid)
            victims = [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        _kill_group(node.pid)
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.kill()
        psutil.wait_procs(victims, timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to the processes this cluster started (never `ray stop`)."""
        import psutil

        leaders, spawned = [], []
        for proc in self.procs:
            try:
                leader = psutil.Process(proc.pid)
                leaders.append(leader)
                spawned += leader.children(recursive=True)  # workers, job drivers
            except psutil.NoSuchProcess:
                pass
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            for leader in reversed(leaders):  # worker node first
                try:
                    os.killpg(leader.pid, sig)
                except ProcessLookupError:
                    pass
            for child in spawned:
                try:
                    child.send_signal(sig)  # psutil refuses a PID that was reused
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(leaders + spawned, timeout=grace)
            if not alive:
                break
        for proc in self.procs:
            proc.wait(timeout=5)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _alive_nodes(cluster: LocalCluster) -> int:
    return len(_alive_node_ids(cluster))


def _alive_node_ids(cluster: LocalCluster) -> set[str]:
    import requests

    try:
        r = requests.get(
            cluster.dashboard_url + "/nodes?view=summary",
            headers={"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"},
            timeout=3,
        )
        nodes = r.json()["data"]["summary"]
    except Exception:
        return set()
    return {n["raylet"]["nodeId"] for n in nodes if n["raylet"]["state"] == "ALIVE"}


def _agents_ready(cluster: LocalCluster) -> bool:
    """The job server answers only once the head node's agent has registered."""
    import requests

    try:
        r = requests.get(
            cluster.dashboard_url + "/api/jobs/",
            headers={"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"},
            timeout=3,
        )
    except Exception:
        return False
    return r.status_code == 200


def _node_ports() -> list[str]:
    """Every port an agent would otherwise pick itself and announce through a file, which
    the raylet waits for only ~15 s: too short for a loaded 2-core machine."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


def start_two_node_cluster() -> LocalCluster:
    # Short path: Unix sockets live under it and their names are limited to ~100 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="glc_", dir="/tmp"))
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), DS_ACCELERATOR="cpu")
    # A job's entrypoint says `python`: on the nodes it must be the Python that has genloop's
    # dependencies, as it is in a Ray image.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cluster = LocalCluster(temp_dir, free_port(), free_port(), env)
    try:
        cluster.start_node(
            "--head",
            f"--port={cluster.gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={cluster.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            *_node_ports(),
            "--num-cpus=1",
            "--resources=" + json.dumps({"headnode": 1}),
            f"--temp-dir={temp_dir}",
            name="head",
        )
        wait_for(lambda: _alive_nodes(cluster) >= 1, 90, "the head node")
        cluster.worker = cluster.add_worker_node("worker")
        wait_for(lambda: _alive_nodes(cluster) >= 2, 5, "the worker node")
        wait_for(lambda: _agents_ready(cluster), 60, "the job server")
    except BaseException:
        cluster.stop()
        for log in sorted(temp_dir.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return cluster


@pytest.fixture(scope="module")
def two_nodes():
    """A head (resource `headnode`) and a worker node (`workernode`), 1 CPU each."""
    if shutil.which(RAY) is None and not Path(RAY).exists():
        pytest.skip("the `ray` command is not installed next to this Python")
    cluster = start_two_node_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
