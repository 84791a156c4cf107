"""Start a local Ray for a run, or attach to an existing cluster.

A local Ray is started only when no address is given (neither `ray.address` nor the
RAY_ADDRESS variable); it listens on loopback only and has no dashboard.
"""

from __future__ import annotations

import logging
import os

import ray


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    env: dict[str, str] | None = None,
    log_to_driver: bool = True,
) -> str:
    """Initialise Ray in this process. Returns a one-line description of what it joined."""
    if ray.is_initialized():
        return "Ray already initialised in this process"
    address = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = {"env_vars": dict(env or {})}
    if address is None:
        # An explicit "local": a bare ray.init() would attach to any cluster an earlier
        # `ray start` left recorded on this machine, even a dead one.
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
            log_to_driver=log_to_driver,
        )
        cpus = int(ray.cluster_resources().get("CPU", 0))
        return f"local Ray on 127.0.0.1 with {cpus} CPUs"
    ray.init(
        address=address,
        runtime_env=runtime_env,
        logging_level=logging.WARNING,
        log_to_driver=log_to_driver,
    )
    return f"Ray cluster at {address}"
