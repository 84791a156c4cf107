"""Waiting on a real Ray for what it does asynchronously."""

import time


def free_cpus(ray, expected: float, timeout_s: float = 10.0) -> float:
    """The cluster's free CPUs, once they reach `expected`: killed actors and removed
    placement groups hand theirs back soon, not at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        free = ray.available_resources().get("CPU", 0)
        if free >= expected or time.monotonic() > deadline:
            return free
        time.sleep(0.1)
