"""`genloop submit` / `genloop jobs` without a cluster: what is uploaded, what runs, and every
way of not reaching a job server ends in one line and exit status 2 within seconds."""

from __future__ import annotations

import json
import shlex
import socket
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cluster import connect as connect_module
from cluster.connect import ClusterError
from cluster.submit import (
    PROJECT_ROOT,
    UPLOAD_EXCLUDES,
    _check_genloop_args,
    build_runtime_env,
    entrypoint_for,
)
from pipeline.cli import main


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_cluster_in_environment(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setattr(connect_module, "PROBE_TIMEOUT_S", 1.0)


@pytest.fixture(scope="module", autouse=True)
def imported():
    """Import what the commands import, so the timings below are of the network alone."""
    import ray.job_submission  # noqa: F401

    from pipeline.cli import _parser
    from pipeline.config import load_config

    _parser()
    load_config(None, [])


@pytest.fixture
def http_server():
    """A local HTTP server answering /api/version with a chosen status (and delay)."""
    answer = {"status": 200, "body": "", "delay": 0.0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server interface
            time.sleep(answer["delay"])
            body = answer["body"].encode()
            try:
                self.send_response(answer["status"])
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting, as it should

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", answer
    server.shutdown()
    server.server_close()


def _run(capsys, *argv) -> tuple[int, str, str, float]:
    started = time.perf_counter()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err, time.perf_counter() - started


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("genloop: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- unreachable / auth


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "--address", "{url}", "--", "run", "loop.generations=1"],
        ["jobs", "status", "raysubmit_x", "--address", "{url}"],
        ["jobs", "logs", "raysubmit_x", "--address", "{url}", "--follow"],
        ["jobs", "stop", "raysubmit_x", "--address", "{url}"],
        ["jobs", "list", "--address", "{url}"],
    ],
    ids=["submit", "status", "logs", "stop", "list"],
)
def test_unreachable_job_server_exits_2_in_seconds(capsys, argv):
    url = f"http://127.0.0.1:{closed_port()}"
    code, _, err, seconds = _run(capsys, *[a.format(url=url) for a in argv])
    assert code == 2 and seconds < 5
    line = _one_error_line(err)
    assert f"cannot reach the job server at {url} (connection refused)" in line


def test_ray_client_address_means_the_dashboard_on_the_same_host(capsys):
    port = closed_port()
    code, _, err, _ = _run(capsys, "jobs", "status", "x", "--address", f"ray://127.0.0.1:{port}")
    assert code == 2 and "job server at http://127.0.0.1:8265" in _one_error_line(err)


def test_unreachable_gcs_address_exits_2(capsys):
    port = closed_port()
    code, _, err, seconds = _run(capsys, "jobs", "list", "--address", f"127.0.0.1:{port}")
    assert code == 2 and seconds < 5
    assert f"cannot reach the Ray cluster (GCS) at 127.0.0.1:{port}" in _one_error_line(err)


def test_slow_job_server_times_out(capsys, http_server):
    url, answer = http_server
    answer["delay"] = 3.0
    code, _, err, seconds = _run(capsys, "jobs", "status", "x", "--address", url)
    assert code == 2 and seconds < 3
    assert "no answer within 1s" in _one_error_line(err)


@pytest.mark.parametrize(
    "status, says",
    [
        (401, "wants a token; set RAY_AUTH_MODE=token"),
        (403, "refused this client's token; set RAY_AUTH_MODE=token"),
        (404, "does not look like a Ray job server (HTTP 404"),
    ],
)
def test_auth_failures_and_strangers_are_named(capsys, http_server, status, says):
    url, answer = http_server
    answer["status"] = status
    code, _, err, _ = _run(capsys, "submit", "--address", url, "--", "run")
    assert code == 2 and says in _one_error_line(err)
    assert "RAY_AUTH_TOKEN" in err or status == 404


def test_no_address_anywhere(capsys):
    code, _, err, _ = _run(capsys, "jobs", "status", "x")
    assert code == 2 and "no cluster address: pass --address" in _one_error_line(err)


def test_address_variable_and_flag(capsys, monkeypatch):
    from_env, from_flag = closed_port(), closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{from_env}")
    _, _, err, _ = _run(capsys, "jobs", "status", "x")
    assert f"127.0.0.1:{from_env}" in err
    _, _, err, _ = _run(capsys, "jobs", "status", "x", "--address", f"http://127.0.0.1:{from_flag}")
    assert f"127.0.0.1:{from_flag}" in err and str(from_env) not in err


def test_malformed_address(capsys):
    code, _, err, _ = _run(capsys, "jobs", "list", "--address", "htp:/head")
    assert code == 2 and "is not a Ray address" in _one_error_line(err)


# --------------------------------------------------------------------------- what is submitted


def test_config_errors_are_found_before_the_upload(capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    code, _, err, _ = _run(
        capsys, "submit", "--address", url, "--", "run", "mix.real_fraction=3", "train.workrs=2"
    )
    assert code == 2
    assert err.count("genloop: config error:") == 2 and "cannot reach" not in err


def test_nothing_to_run(capsys):
    code, _, err, _ = _run(capsys, "submit", "--address", "http://127.0.0.1:1", "--")
    assert code == 2 and "nothing to run" in _one_error_line(err)


def test_config_path_becomes_relative_to_the_uploaded_project():
    preset = PROJECT_ROOT / "ray_configs" / "gpu.yaml"
    args, notes = _check_genloop_args(
        ["run", "--config", str(preset), "--run-dir", "/mnt/shared/r", "loop.generations=2"]
    )
    assert args == ["run", "--config", "ray_configs/gpu.yaml", "--run-dir", "/mnt/shared/r"] + [
        "loop.generations=2"
    ]
    assert notes == []
    args, _ = _check_genloop_args(["run", f"--config={preset}", "--run-dir", "/mnt/r"])
    assert args[1] == "--config=ray_configs/gpu.yaml"


def test_relative_run_dir_and_data_get_a_note():
    _, notes = _check_genloop_args(
        ["run", "--config", "ray_configs/text.yaml", "task.path=data/input.txt"]
    )
    assert len(notes) == 2
    assert "task.path=data/input.txt" in notes[0] and "--run-dir" in notes[1]


def test_config_outside_the_project_is_refused(tmp_path):
    outside = tmp_path / "mine.yaml"
    outside.write_text("seed: 1\n")
    with pytest.raises(ClusterError, match="outside the project directory"):
        _check_genloop_args(["run", "--config", str(outside)])


def test_other_commands_pass_through():
    assert _check_genloop_args(["report", "/mnt/r"]) == (["report", "/mnt/r"], [])


@pytest.mark.parametrize(
    "command, says",
    [
        (
            ["bogus"],
            "-- bogus: not a genloop command; the command comes first after `--`, one of: run, ",
        ),
        (
            ["select", "--budget", "0"],
            "select: the following arguments are required: --data, --method, --out",
        ),
        (["run", "--bogus"], "run: unrecognized arguments: --bogus"),
        (["report", "/mnt/r", "a=1"], "report: unrecognized arguments: a=1"),
        (["jobs", "status"], "jobs status: the following arguments are required: JOB_ID"),
    ],
    ids=["unknown-command", "missing-flags", "unknown-flag", "stray-override", "nested"],
)
def test_a_command_genloop_would_refuse_is_refused_before_the_cluster(capsys, command, says):
    code, out, err, _ = _run(capsys, "submit", "--address", "http://127.0.0.1:1", "--", *command)
    assert code == 2 and out == ""
    assert _one_error_line(err).startswith(f"genloop: error: {says}")
    assert err.count("\n") == 1 and "usage:" not in err


def test_entrypoint_quotes_each_argument():
    argv = ["run", "task.fields={prompt: question}", "--run-dir", "/mnt/a b"]
    entrypoint = entrypoint_for(argv)
    assert entrypoint.startswith("python -m pipeline.cli run ")
    assert shlex.split(entrypoint)[3:] == argv


def test_runtime_env_defaults():
    env = build_runtime_env(None)
    assert env["working_dir"] == str(PROJECT_ROOT)
    assert {".venv/", ".git/", "runs/"} <= set(env["excludes"])
    assert "pip" not in env  # the cluster's image provides the dependencies by default


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_runtime_env_file_overrides_key_by_key(tmp_path, suffix):
    given = {
        "pip": ["transformers>=4.50"],
        "env_vars": {"HF_HOME": "/mnt/hf"},
        "excludes": ["data/"],
        "working_dir": "proj",
    }
    file = tmp_path / f"env{suffix}"
    file.write_text(json.dumps(given))  # JSON is YAML as well
    (tmp_path / "proj").mkdir()
    env = build_runtime_env(str(file))
    assert env["pip"] == ["transformers>=4.50"]
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "HF_HOME": "/mnt/hf"}
    assert env["excludes"][-1] == "data/" and ".venv/" in env["excludes"]
    assert env["working_dir"] == str(tmp_path / "proj")
    file.write_text("working_dir: s3://bucket/genloop.zip\n")
    assert build_runtime_env(str(file))["working_dir"] == "s3://bucket/genloop.zip"


@pytest.mark.parametrize(
    "content, says",
    [
        (None, "cannot read it (No such file or directory)"),
        ("pip: [a\n", "not YAML or JSON (while parsing a flow sequence)"),
        ("- a\n", "expected a mapping, e.g. pip: [...]"),
        (bytes(range(256)) * 10, "not UTF-8 text (byte 128)"),
        (
            "env_vars: [1, 2]\n",
            "env_vars: expected a mapping of variable names to values, "
            "e.g. env_vars: {HF_HOME: /mnt/hf}",
        ),
        ("env_vars: {HF_HOME: [1]}\n", "env_vars.HF_HOME: expected text or a number, got [1]"),
        ("excludes: data/\n", "excludes: expected a list of paths, e.g. excludes: [data/]"),
        ("excludes: [1]\n", "excludes: expected a list of paths, e.g. excludes: [data/]"),
        ("working_dir: 3\n", "working_dir: expected a directory or a URI, got 3"),
        ("working_dir: nowhere\n", "working_dir: {tmp}/nowhere does not exist"),
        (  # Ray's own check
            "pip: [1, 2]\n",
            "runtime_env['pip'] must be of type str or List[str], got <class 'list'>",
        ),
    ],
    ids=[
        "missing",
        "not-yaml",
        "not-a-mapping",
        "not-utf8",
        "env-vars-list",
        "env-var-list",
        "excludes-text",
        "excludes-numbers",
        "working-dir-number",
        "working-dir-missing",
        "pip-numbers",
    ],
)
def test_bad_runtime_env_file_is_one_line_before_the_cluster(tmp_path, capsys, content, says):
    file = tmp_path / "env.yaml"
    if isinstance(content, str):
        file.write_text(content)
    elif content is not None:
        file.write_bytes(content)
    code, out, err, _ = _run(
        capsys, "submit", "--address", "http://127.0.0.1:1", "--runtime-env", str(file), "--", "run"
    )
    assert code == 2 and out == ""
    says = says.replace("{tmp}", str(tmp_path))
    assert _one_error_line(err) == f"genloop: error: --runtime-env {file}: {says}"
    assert err.count("\n") == 1


def test_the_uploaded_package_is_the_source_only(tmp_path):
    """Ray's own packaging, with genloop's excludes: code and presets, no venv or runs."""
    packaging = pytest.importorskip("ray._private.runtime_env.packaging")
    target = tmp_path / "package.zip"
    packaging.create_package(
        str(PROJECT_ROOT), target, include_gitignore=True, excludes=list(UPLOAD_EXCLUDES)
    )
    names = zipfile.ZipFile(target).namelist()
    assert {"pipeline/cli.py", "cluster/submit.py", "ray_configs/gpu.yaml"} <= set(names)
    for banned in (".venv/", ".git/", "runs/", "__pycache__/"):
        assert not any(banned in name for name in names), banned
    assert target.stat().st_size < 5 * 2**20
    assert Path(names[0]).parts  # a non-empty package
