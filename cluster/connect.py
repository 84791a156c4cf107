"""Start a local Ray for a run, or join an existing cluster; reach a cluster's job server.

Addresses, as `ray.address=` / `--address` / the RAY_ADDRESS variable take them:

    (none)              a local Ray for this run: loopback only, no dashboard
    auto                the cluster this machine belongs to (inside a Ray job: the job's cluster)
    HOST:6379           a cluster's GCS, from a machine inside the cluster's network
    ray://HOST:10001    Ray Client: the driver runs here, the work on the cluster
    http://HOST:8265    the dashboard's job server: for `genloop submit` / `genloop jobs`

A local Ray is started only when no address is given. A wrong address fails in seconds with
one line (`ClusterError`), instead of Ray's minute of retries: the port is probed first, and a
GCS is asked for its cluster id (which checks the token) before `ray.init`.

Token authentication is on by default from Ray 2.60. A client passes the cluster's token with
RAY_AUTH_MODE=token plus RAY_AUTH_TOKEN=<token>, RAY_AUTH_TOKEN_PATH=<file>, or the file
~/.ray/auth_token (`ray get-auth-token` on the head node prints the token).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

# Ray is imported where it is used: `genloop` builds its parser from this package, and a
# command that never touches a cluster should not pay for importing Ray.

PROBE_TIMEOUT_S = 3.0  # seconds to wait for a TCP connection or an HTTP answer
DEFAULT_PORTS = {"gcs": 6379, "client": 10001, "dashboard": 8265}
ADDRESS_FORMS = "auto, HOST:6379, ray://HOST:10001 or http://HOST:8265"
AUTH_HELP = (
    "set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN "
    "(or RAY_AUTH_TOKEN_PATH=FILE, or the file ~/.ray/auth_token); "
    "`ray get-auth-token` on the head node prints it"
)


class ClusterError(RuntimeError):
    """A cluster that cannot be reached, refuses us, or an address that is not one.

    The message is one line a person can act on; the CLI prints it and exits 2."""


@dataclass(frozen=True)
class Address:
    """A parsed cluster address: what it points at, and where."""

    kind: Literal["local", "auto", "gcs", "client", "dashboard"]
    text: str  # as given
    host: str | None = None
    port: int | None = None


def parse_address(text: str) -> Address:
    """Classify `text` (see the module docstring for the forms).

    Raises:
        ClusterError: `text` is none of the forms, or its port is not a number from 1 to
            65535.
    """
    text = text.strip()
    if text in ("local", "auto"):
        return Address(text, text)
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    kind = {"": "gcs", "ray": "client", "http": "dashboard", "https": "dashboard"}.get(
        scheme.lower()
    )
    not_an_address = ClusterError(f"{text!r} is not a Ray address; expected {ADDRESS_FORMS}")
    if kind is None or not rest:
        raise not_an_address
    try:
        parts = urlsplit("//" + rest)
    except ValueError:  # e.g. an IPv6 bracket left open, "http://[::1"
        raise not_an_address from None
    try:
        port = parts.port
    except ValueError as e:
        problem = "out of range (1-65535)" if "out of range" in str(e) else "not a number"
        raise ClusterError(f"{text!r}: the port is {problem}; expected {ADDRESS_FORMS}") from None
    if port == 0:
        raise ClusterError(
            f"{text!r}: the port is out of range (1-65535); expected {ADDRESS_FORMS}"
        )
    if not parts.hostname or (kind != "dashboard" and parts.path not in ("", "/")):
        raise not_an_address
    if port is None:
        port = DEFAULT_PORTS[kind] if kind != "dashboard" else (443 if scheme == "https" else 80)
    return Address(kind, text, parts.hostname, port)


def probe_tcp(host: str, port: int, what: str, timeout: float | None = None) -> None:
    """Raise ClusterError unless something accepts TCP connections at host:port."""
    timeout = timeout or PROBE_TIMEOUT_S
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except socket.gaierror:
        reason = "unknown host"
    except TimeoutError:
        reason = f"no answer within {timeout:g}s"
    except ConnectionRefusedError:
        reason = "connection refused"
    except OSError as e:
        reason = e.strerror or e.__class__.__name__
    raise ClusterError(
        f"cannot reach {what} at {host}:{port} ({reason}); is the cluster up, and is the port "
        "open from here (firewall, SSH tunnel, kubectl port-forward)?"
    )


def check_token_settings() -> None:
    """With RAY_AUTH_MODE=token, a token must be findable; Ray itself would abort the process
    on an unreadable RAY_AUTH_TOKEN_PATH, and only warn when there is no token at all."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            if Path(path).expanduser().read_text().strip():
                return
        except OSError as e:
            raise ClusterError(
                f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token ({e.strerror})"
            ) from None
        raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: the file is empty")
    if (Path.home() / ".ray" / "auth_token").is_file():
        return
    raise ClusterError(f"RAY_AUTH_MODE=token but no token was found; {AUTH_HELP}")


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    env: dict[str, str] | None = None,
    log_to_driver: bool = True,
) -> str:
    """Initialise Ray in this process. Returns a one-line description of what it joined.

    Raises:
        ClusterError: the address is malformed, unreachable, refuses our token, or is a
            job-server URL (which `genloop submit` takes, not `genloop run`).
    """
    global _started_local
    import ray

    if ray.is_initialized():
        return "Ray already initialised in this process"
    address = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = {"env_vars": dict(env or {})}
    where = preflight(address)
    if where.kind == "local":
        runtime_env["env_vars"] = {**local_train_settings(), **runtime_env["env_vars"]}
        runtime_env["worker_process_setup_hook"] = LOCAL_WORKER_SETUP
        # An explicit "local": a bare ray.init() would attach to any cluster an earlier
        # `ray start` left recorded on this machine, even a dead one. Ray warns on every start
        # that it turned token authentication on; for a Ray of this process's own, bound to
        # 127.0.0.1, that is nothing the user has to act on.
        auth_notice = logging.getLogger(AUTH_NOTICE_LOGGER)
        level = auth_notice.level
        auth_notice.setLevel(logging.ERROR)
        try:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                runtime_env=runtime_env,
                logging_level=logging.WARNING,
                log_to_driver=log_to_driver,
            )
        finally:
            auth_notice.setLevel(level)
        _started_local = True
        cpus = int(ray.cluster_resources().get("CPU", 0))
        return f"local Ray on 127.0.0.1 with {cpus} CPUs"
    try:
        ray.init(
            address=address,
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
            log_to_driver=log_to_driver,
        )
    except Exception as e:  # Ray raises ConnectionError, RuntimeError or its own errors
        raise ClusterError(_join_failure(address, e)) from e
    return f"Ray cluster at {address}"


# Where Ray logs "Token authentication is enabled for this Ray cluster" on a local start.
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


# Ray Train settings for a local Ray (one machine): its controller polls the workers every
# 0.25 s instead of 2 s, so a finished training is seen ~1-2 s sooner, and it starts no
# node-preemption watcher (there is no other node to drain). Together they take ~4 s off each
# generation's training on 2 cores. A cluster keeps Ray's defaults.
LOCAL_TRAIN_SETTINGS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def local_train_settings() -> dict[str, str]:
    """LOCAL_TRAIN_SETTINGS, less any the user set in the environment."""
    return {key: value for key, value in LOCAL_TRAIN_SETTINGS.items() if key not in os.environ}


# Run in every worker process of a local Ray (its runtime env names it).
LOCAL_WORKER_SETUP = "cluster.connect.quiet_placement_group_cleaner"

# Ray Train's PlacementGroupCleaner asks Ray's state API, once a second for the length of
# every fit, whether the fit's controller is alive, and logs a warning each time the API does
# not answer. A local Ray has no dashboard, so no state API: with --verbose, one line a
# second. Nor does it need the cleaner: its placement groups end with the driver.
PLACEMENT_GROUP_CLEANER_LOGGER = (
    "ray.train.v2._internal.execution.controller.placement_group_cleaner"
)


def quiet_placement_group_cleaner() -> None:
    """A local Ray's worker-process setup: the cleaner's warnings are not logged."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)


# Whether `connect` started a local Ray in this process: no node can join it.
_started_local = False


def check_local_fit(stages: dict[str, int], requested: int | None = None) -> None:
    """On a local Ray that `connect` started, every stage's CPU workers (config key ->
    workers) must fit at once, or the stage would wait forever for CPUs. A cluster may grow
    (an autoscaler), so nothing is checked there.

    Raises:
        ClusterError: naming the first key whose workers cannot fit.
    """
    if not _started_local:
        return
    import ray

    cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive", False)]
    check_fit(stages, requested, cpus)


def check_fit(stages: dict[str, int], requested: int | None, cpus: list[float]) -> None:
    """`check_local_fit` on nodes with `cpus` CPUs each; `genloop run` also calls it before
    a local Ray starts, with the CPUs that Ray will have.

    Raises:
        ClusterError: naming the first key whose workers cannot fit.
    """
    total, largest = sum(cpus), max(cpus, default=0.0)
    for key, workers in stages.items():
        each = requested if requested is not None else cpu_share(workers, cpus)
        if workers * each > total or each > largest:
            lower = f"lower {key}" + (" or ray.cpus_per_worker" if requested else "")
            raise ClusterError(
                f"{key}={workers}: {workers} worker(s) x {each} CPU(s) do not fit on the local "
                f"Ray's {int(total)} CPUs; {lower}, or raise ray.num_cpus"
            )


def cpus_per_worker(workers: int, requested: int | None = None) -> int:
    """CPUs each of a stage's `workers` asks Ray for: `requested`, or else an equal share of
    the cluster's CPUs that still fits on its largest node (at least 1). A stage's workers run
    alone (stages run one after another), so a share of everything keeps every core busy:
    Ray gives a task as many torch threads as CPUs."""
    if requested is not None:
        return requested
    import ray

    cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive", False)]
    return cpu_share(workers, cpus)


def cpu_share(workers: int, cpus: list[float]) -> int:
    """An equal share of the nodes' `cpus` for each of `workers`, that still fits on the
    largest node (at least 1)."""
    if not cpus:
        return 1
    return max(1, min(int(max(cpus)), int(sum(cpus) // max(1, workers))))


def preflight(address: str | None) -> Address:
    """Check, without starting or joining Ray, that a run could join `address` (or the
    RAY_ADDRESS variable): the form, the port, and the token. Takes a second or two.

    Raises:
        ClusterError: as `connect` would, but before any work has started.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    where = parse_address(address) if address is not None else Address("local", "local")
    if where.kind == "local":
        return where
    if where.kind == "dashboard":
        raise ClusterError(
            f"{address} is a job server (dashboard) address: a run joins a cluster through "
            "auto, HOST:6379 or ray://HOST:10001; to run on the cluster from here, use "
            f"`genloop submit --address {address} -- run ...`"
        )
    check_token_settings()
    if where.kind == "client":
        probe_tcp(where.host, where.port, "the Ray Client server")
    else:
        _probe_gcs(_gcs_address(where))
    return where


def _gcs_address(where: Address) -> str:
    """host:port of the GCS behind `auto` or HOST:PORT."""
    if where.kind == "gcs":
        return f"{where.host}:{where.port}"
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found = canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError):
        found = None
    if not found:
        raise ClusterError(
            "address auto: no Ray cluster found on this machine (RAY_ADDRESS is not set and "
            "no `ray start` is recorded); start one, or give HOST:6379 or ray://HOST:10001"
        )
    return found


def _probe_gcs(gcs_address: str) -> None:
    """Port open, then the cluster id: fails in about a second when the token is wrong,
    where `ray.init` would retry for twenty."""
    host, _, port = gcs_address.rpartition(":")
    probe_tcp(host.strip("[]"), int(port), "the Ray cluster (GCS)")
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:  # another Ray version: ray.init reports what goes wrong
        return
    try:
        GcsClient(address=gcs_address)
    except AuthenticationError:
        raise ClusterError(
            f"the Ray cluster at {gcs_address} refused this client's token; {AUTH_HELP}"
        ) from None
    except Exception:
        return  # not ours to judge: ray.init gives the full story


def _join_failure(address: str, error: Exception) -> str:
    text = f"{error} {error.__cause__ or ''}"
    if "InvalidAuthToken" in text or "AuthenticationError" in text or "Unauthenticated" in text:
        return f"the Ray cluster at {address} refused this client's token; {AUTH_HELP}"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"could not join the Ray cluster at {address}: {first}"


# --------------------------------------------------------------------------- job server


def job_server_url(address: str | None) -> str:
    """The http(s) URL of the job server behind `address`, or RAY_API_SERVER_ADDRESS /
    RAY_ADDRESS when no address is given. ray://HOST:PORT maps to http://HOST:8265.

    Raises:
        ClusterError: no address anywhere, a malformed one, or a cluster that cannot be asked.
    """
    text = (
        address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or None
    )
    if text is None:
        raise ClusterError(
            "no cluster address: pass --address http://HEAD:8265 (the dashboard) or set RAY_ADDRESS"
        )
    where = parse_address(text)
    if where.kind == "local":
        raise ClusterError(f"address 'local' has no job server; expected {ADDRESS_FORMS}")
    if where.kind == "dashboard":
        return where.text.rstrip("/")
    if where.kind == "client":
        host = f"[{where.host}]" if ":" in where.host else where.host
        return f"http://{host}:{DEFAULT_PORTS['dashboard']}"
    check_token_settings()
    gcs = _gcs_address(where)
    _probe_gcs(gcs)
    from ray.dashboard.utils import ray_address_to_api_server_url

    try:
        return ray_address_to_api_server_url(gcs)
    except Exception as e:
        raise ClusterError(f"the cluster at {gcs} did not say where its job server is: {e}") from e


def probe_job_server(url: str, timeout: float | None = None) -> None:
    """One GET of /api/version, with the headers Ray's job client would send.

    Raises:
        ClusterError: unreachable, no job server there, or the token is missing / refused.
    """
    import requests
    from ray._private.authentication.http_token_authentication import (
        get_auth_headers_if_auth_enabled,
    )

    check_token_settings()
    timeout = timeout or PROBE_TIMEOUT_S
    try:
        r = requests.get(
            url + "/api/version", headers=get_auth_headers_if_auth_enabled({}), timeout=timeout
        )
    except requests.exceptions.Timeout:
        raise ClusterError(
            f"cannot reach the job server at {url} (no answer within {timeout:g}s); is the "
            "cluster up, and is the port open from here (SSH tunnel, kubectl port-forward)?"
        ) from None
    except requests.exceptions.RequestException as e:
        reason = "connection refused" if "refused" in str(e).lower() else e.__class__.__name__
        raise ClusterError(
            f"cannot reach the job server at {url} ({reason}); is the cluster up, and is the "
            "port open from here (SSH tunnel, kubectl port-forward)?"
        ) from None
    if r.status_code == 401:
        raise ClusterError(f"the job server at {url} wants a token; {AUTH_HELP}")
    if r.status_code == 403:
        raise ClusterError(f"the job server at {url} refused this client's token; {AUTH_HELP}")
    if r.status_code != 200 or "ray_version" not in r.text:
        raise ClusterError(
            f"{url} does not look like a Ray job server (HTTP {r.status_code} from "
            "/api/version); give the dashboard address, e.g. http://HEAD:8265"
        )


def job_client(address: str | None):
    """A `JobSubmissionClient` for `address`, checked to answer. Returns (client, url)."""
    from ray.job_submission import JobSubmissionClient

    url = job_server_url(address)
    probe_job_server(url)
    # JobSubmissionClient lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it
    # is given; here an explicit --address wins, as everywhere else in genloop.
    with _environ_without("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        try:
            return JobSubmissionClient(url), url
        except Exception as e:
            raise ClusterError(f"the job server at {url} failed the version check: {e}") from e


@contextlib.contextmanager
def _environ_without(*names: str):
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
