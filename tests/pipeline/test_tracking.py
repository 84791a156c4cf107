"""Per-generation numbers to TensorBoard and MLflow, once per generation, across a resume."""

import pytest

from pipeline.config import load_config
from pipeline.tracking import Tracker

ROWS = [
    {"generation": 0, "accuracy": 0.5, "perplexity": 3.0, "mix_real_mmd": float("nan")},
    {"generation": 1, "accuracy": 0.7, "perplexity": 2.5, "mix_real_mmd": 0.1},
]


def _event_scalars(directory) -> list[tuple[str, int, float]]:
    """Every scalar in the TFRecord event files (length, crc, Event proto, crc per record)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    found = []
    for path in sorted(directory.glob("events.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            found += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return sorted(found)


def test_tensorboard_gets_each_generation_once_across_a_resume(tmp_path):
    pytest.importorskip("tensorboardX")
    cfg = load_config(None, [])
    tracker = Tracker(cfg, tmp_path)
    tracker.log(ROWS[0])
    tracker.close()
    resumed = Tracker(cfg, tmp_path)  # a resumed run loads generation 0 and logs it again
    for row in ROWS:
        resumed.log(row)
    resumed.close()
    scalars = _event_scalars(tmp_path / "tensorboard")
    assert ("accuracy", 0, 0.5) in scalars and ("accuracy", 1, pytest.approx(0.7)) in scalars
    assert [s for s in scalars if s[0] == "accuracy"] == [
        ("accuracy", 0, 0.5),
        ("accuracy", 1, pytest.approx(0.7)),
    ]
    assert ("mix_real_mmd", 0) not in [(t, s) for t, s, _ in scalars]  # NaN is not sent


def test_mlflow_gets_params_and_one_run_per_genloop_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    cfg = load_config(
        None, [f"diagnostics.mlflow_uri={uri}", "diagnostics.tensorboard=false", "seed=3"]
    )
    run_dir = tmp_path / "run"
    Tracker(cfg, run_dir).log(ROWS[0])
    Tracker(cfg, run_dir).log(ROWS[1])  # resumed: the same MLflow run continues

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("genloop")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["seed"] == "3" and run.data.params["mix.real_fraction"] == "0.0"
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.7)]
    assert not (run_dir / "tensorboard").exists()


def test_an_mlflow_server_that_does_not_answer_is_a_config_error():
    """MLflow's client retried a server that was down for minutes, then raised."""
    import http.server
    import socket
    import threading

    from pipeline.config import ConfigError
    from pipeline.tracking import check_mlflow_server

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError) as info:
        check_mlflow_server(f"http://127.0.0.1:{port}", timeout_s=2)
    assert info.value.errors[0].startswith(
        f"diagnostics.mlflow_uri: no MLflow server answers at http://127.0.0.1:{port} ("
    )
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.handle_request, daemon=True).start()
    check_mlflow_server(f"http://127.0.0.1:{server.server_port}")  # any answer will do (501)
    server.server_close()
    check_mlflow_server("sqlite:///nowhere/mlflow.db")  # a store MLflow creates: not checked
