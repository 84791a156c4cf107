"""Where each generation's numbers go besides the run directory: TensorBoard and MLflow.

    diagnostics.tensorboard=true          RUN_DIR/tensorboard (tensorboardX event files)
    diagnostics.mlflow_uri=URI            an MLflow tracking server or store; one MLflow run per
                                          genloop run, the generation as the step

A generation is sent once: `gen_XX/.done/tracked` marks it, so a resumed run does not send
the generations it loads from disk again, and it continues the same MLflow run (its id is kept
in RUN_DIR/mlflow_run_id). Under `genloop tune` each trial keeps its own TensorBoard events,
and MLflow gets the trials through Ray Tune's `MLflowLoggerCallback` instead.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from pipeline.config import DiagnosticsConfig, RunConfig, flatten
from pipeline.data import write_text


class Tracker:
    """Sends per-generation summary rows to the configured trackers."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.run_dir = Path(run_dir)
        settings: DiagnosticsConfig = cfg.diagnostics
        self._tensorboard = None
        self._mlflow = None
        if settings.tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                # A resumed run adds an event file; a unique suffix keeps it from replacing
                # the first one when both start within the same second.
                self._tensorboard = SummaryWriter(
                    str(self.run_dir / "tensorboard"), filename_suffix=f".{time.time_ns()}"
                )
        if settings.mlflow_uri:
            self._mlflow = _start_mlflow(cfg, self.run_dir)

    def log(self, row: dict) -> None:
        generation = int(row["generation"])
        marker = self.run_dir / f"gen_{generation:02d}" / ".done" / "tracked"
        if marker.exists():
            return
        scalars = {
            key: float(value)
            for key, value in row.items()
            if key != "generation"
            and isinstance(value, (int, float))
            and not math.isnan(float(value))
        }
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, global_step=generation)
            self._tensorboard.flush()
        if self._mlflow is not None:
            client, run_id = self._mlflow
            client.log_batch(
                run_id,
                metrics=[_mlflow_metric(key, value, generation) for key, value in scalars.items()],
            )
        write_text("tracked\n", marker)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def check_mlflow_server(uri: str, timeout_s: float = 5.0) -> None:
    """An http(s) tracking URI answers (any HTTP status will do). MLflow's own client retries
    a server that is down for minutes before it gives up with a traceback.

    Raises:
        ConfigError: nothing answers at `uri`.
    """
    import urllib.error
    import urllib.request

    from pipeline.config import ConfigError

    if not uri.startswith(("http://", "https://")):
        return  # a local store (a path, sqlite:///...): MLflow creates it
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(
            [f"diagnostics.mlflow_uri: no MLflow server answers at {uri} ({reason})"]
        ) from None


def _start_mlflow(cfg: RunConfig, run_dir: Path):
    """An MLflow client and the run of this genloop run (created once, then reused)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        from pipeline.config import ConfigError

        raise ConfigError(
            ["diagnostics.mlflow_uri: needs MLflow (pip install 'genloop[mlflow]')"]
        ) from None
    from mlflow.entities import Param

    client = MlflowClient(tracking_uri=cfg.diagnostics.mlflow_uri)
    id_file = run_dir / "mlflow_run_id"
    if id_file.exists():
        return client, id_file.read_text().strip()
    experiment = client.get_experiment_by_name(cfg.diagnostics.mlflow_experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(cfg.diagnostics.mlflow_experiment)
    )
    run = client.create_run(experiment_id, run_name=run_dir.name)
    params = [Param(key, str(value)[:500]) for key, value in flatten(cfg).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    write_text(run.info.run_id + "\n", id_file)
    return client, run.info.run_id


def _mlflow_metric(key: str, value: float, step: int):
    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), step)
