"""Addresses: the forms genloop takes, and a wrong one refused in seconds with one line."""

from __future__ import annotations

import socket
import time

import pytest

from cluster import connect as connect_module
from cluster.connect import ClusterError, check_token_settings, connect, parse_address, preflight


def closed_port() -> int:
    """A port on loopback that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_cluster_in_environment(monkeypatch, tmp_path):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setattr(connect_module, "PROBE_TIMEOUT_S", 1.0)


@pytest.mark.parametrize(
    "text, kind, host, port",
    [
        ("auto", "auto", None, None),
        ("local", "local", None, None),
        ("10.0.0.5:6380", "gcs", "10.0.0.5", 6380),
        ("head", "gcs", "head", 6379),
        ("ray://head", "client", "head", 10001),
        ("ray://head:10002", "client", "head", 10002),
        ("http://head:8265", "dashboard", "head", 8265),
        ("http://head:8265/", "dashboard", "head", 8265),
        ("https://ray.example.com", "dashboard", "ray.example.com", 443),
        ("[::1]:6379", "gcs", "::1", 6379),
        (" ray://head:10001 ", "client", "head", 10001),
    ],
)
def test_address_forms(text, kind, host, port):
    where = parse_address(text)
    assert (where.kind, where.host, where.port) == (kind, host, port)


@pytest.mark.parametrize(
    "text, says",
    [
        ("foo://head", "is not a Ray address"),
        ("ray://", "is not a Ray address"),
        ("head:port", "the port is not a number"),
        ("head:99999", r"the port is out of range \(1-65535\)"),
        ("head:0", r"the port is out of range \(1-65535\)"),
        ("http://[::1", "is not a Ray address"),
        ("ray://head/path", "is not a Ray address"),
        ("http://", "is not a Ray address"),
    ],
)
def test_malformed_addresses_are_refused_with_the_valid_forms(text, says):
    with pytest.raises(ClusterError, match=says) as caught:
        parse_address(text)
    assert "ray://HOST:10001" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_unreachable_cluster_fails_in_seconds_without_starting_ray(form):
    import ray

    address = form.format(port=closed_port())
    started = time.perf_counter()
    with pytest.raises(ClusterError, match="connection refused") as caught:
        connect(address)
    assert time.perf_counter() - started < 5
    message = str(caught.value)
    assert f"127.0.0.1:{address.rsplit(':', 1)[1]}" in message and "\n" not in message
    assert not ray.is_initialized()


def test_ray_address_variable_is_the_default(monkeypatch):
    port = closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ClusterError, match=f"127.0.0.1:{port}"):
        preflight(None)


def test_local_needs_no_checks():
    assert preflight(None).kind == "local"
    assert preflight("local").kind == "local"


def test_a_job_server_address_points_to_submit():
    with pytest.raises(ClusterError, match="genloop submit --address http://head:8265"):
        connect("http://head:8265")


def test_auto_without_a_cluster(monkeypatch):
    monkeypatch.setattr(
        "ray._private.services.canonicalize_bootstrap_address", lambda address: None
    )
    with pytest.raises(ClusterError, match="address auto: no Ray cluster found"):
        preflight("auto")


def test_token_mode_needs_a_token(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    with pytest.raises(ClusterError, match="no token was found.*RAY_AUTH_TOKEN"):
        check_token_settings()
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ClusterError, match="missing: cannot read the token"):
        check_token_settings()
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "empty"))
    with pytest.raises(ClusterError, match="the file is empty"):
        check_token_settings()
    (tmp_path / "token").write_text("abc\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    check_token_settings()
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    check_token_settings()


def test_no_token_needed_without_token_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    check_token_settings()


def test_genloop_run_with_an_unreachable_address_exits_2(tmp_path, capsys):
    from pipeline.cli import main

    port = closed_port()
    code = main(["run", "--run-dir", str(tmp_path / "r"), f"ray.address=127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the Ray cluster" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before any work, like a config error


def test_a_local_ray_gets_quick_ray_train_settings_unless_the_user_set_them(monkeypatch):
    from cluster.connect import LOCAL_TRAIN_SETTINGS, local_train_settings

    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    assert local_train_settings() == LOCAL_TRAIN_SETTINGS
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "5")
    assert local_train_settings() == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
