"""Timing probes for `genloop bench`: genloop's own actors and train loop, timed from inside.

The benchmarks time genloop's real code paths. From the driver only the whole call can be
seen, so these probes report what happens inside the Ray workers: when an actor was built
(model loaded) and when each batch started and ended, and the step-loop time a training
worker measures itself. Each is a thin subclass (or wrapper) that adds the timing and changes
nothing else.

Records travel through files: every process appends JSON lines to
`$GENLOOP_BENCH_PROBES/<pid>.jsonl` (the bench sets the variable in the local Ray's runtime
env); the driver reads the records whose times fall inside a call. Without the variable the
probes record nothing, so they are harmless anywhere else.
"""

from __future__ import annotations

import time

# In a Ray worker this module is imported when the actor class arrives; what genloop's actor
# modules import (torch, transformers, pandas) is part of that actor's start-up.
_IMPORTS_STARTED = time.time()

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

from pipeline import embed, inference  # noqa: E402

_IMPORTS_ENDED = time.time()
PROBE_DIR_ENV = "GENLOOP_BENCH_PROBES"

# What the training workers print at the end of their step loop (pipeline/train.py).
_TRAIN_LINE = re.compile(
    r"\[train\] (?P<steps>\d+) steps, (?P<tokens>\d+) tokens in (?P<elapsed>[\d.]+)s "
    r"\((?P<rate>[\d,]+) tokens/s\)"
)
# The untimed train loop, while `installed()` has swapped it out in this process.
_UNTIMED: dict = {}


def record(kind: str, **fields) -> None:
    """Append one timing record for this process (no-op unless the bench asked for them)."""
    directory = os.environ.get(PROBE_DIR_ENV)
    if not directory:
        return
    row = {"kind": kind, "pid": os.getpid(), **fields}
    with open(Path(directory) / f"{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _record_imports() -> None:
    record("imports", start=_IMPORTS_STARTED, end=_IMPORTS_ENDED)


def read_records(directory: str | Path, start: float, end: float) -> list[dict]:
    """Every record written by any process between `start` and `end` (time.time())."""
    rows = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row["start"] >= start and row["end"] <= end:
                    rows.append(row)
    return rows


def _threads() -> int:
    import torch

    return torch.get_num_threads()


class _Timed:
    """Mixin: records the constructor (model load) and every batch of a Ray Data actor."""

    probe_name = ""  # the genloop class it times

    def __init__(self, *args, **kwargs):
        started = time.time()
        super().__init__(*args, **kwargs)
        record("actor", actor=self.probe_name, start=started, end=time.time(), threads=_threads())

    def __call__(self, batch):
        started = time.time()
        out = super().__call__(batch)
        record("batch", actor=self.probe_name, start=started, end=time.time(), rows=len(batch))
        return out


class TimedModelWorker(inference.ModelWorker):
    """inference.ModelWorker, unchanged, but defined here: a new worker process then imports
    genloop's modules through this module, which times that import (the `imports` record)."""


class TimedGenerateActor(_Timed, inference.GenerateActor):
    """inference.GenerateActor, timed."""

    probe_name = "GenerateActor"


class TimedGenerateAndScoreActor(_Timed, inference.GenerateAndScoreActor):
    """inference.GenerateAndScoreActor, timed."""

    probe_name = "GenerateAndScoreActor"


class TimedScoreActor(_Timed, inference.ScoreActor):
    """inference.ScoreActor, timed."""

    probe_name = "ScoreActor"


class TimedEvalActor(_Timed, inference.EvalActor):
    """inference.EvalActor, timed."""

    probe_name = "EvalActor"


class TimedEmbedActor(_Timed, embed.EmbedActor):
    """embed.EmbedActor, timed."""

    probe_name = "EmbedActor"


class _Tee(io.TextIOBase):
    """Writes to a stream and keeps a copy."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def parse_train_line(text: str) -> dict | None:
    """The step-loop report a training worker prints: steps, tokens (all workers) and
    seconds (tokens / the printed rate, which has more digits than the printed seconds)."""
    matches = list(_TRAIN_LINE.finditer(text))
    if not matches:
        return None
    found = matches[-1]
    steps, tokens = int(found["steps"]), int(found["tokens"])
    rate = float(found["rate"].replace(",", ""))
    seconds = tokens / rate if rate > 0 else float(found["elapsed"])
    return {"steps": steps, "tokens": tokens, "loop_s": seconds}


def timed_train_loop(config: dict) -> None:
    """pipeline.train._train_loop on a Ray Train worker, its job timed (`_time_jobs`)."""
    from pipeline import train

    os.environ.update(config["env"])  # the probe directory may come only with the job's env
    _time_jobs()
    _UNTIMED.get("train_loop", train._train_loop)(config)


def timed_serve_jobs(config: dict) -> None:
    """pipeline.train._serve_jobs on a kept trainer's worker, every job timed."""
    from pipeline import train

    os.environ.update(config["env"])
    _time_jobs()
    _UNTIMED.get("serve_jobs", train._serve_jobs)(config)


def _time_jobs() -> None:
    """In a training worker: every `_train_job` this process runs records its whole time and
    the step loop as the worker itself reports it (a `train_worker` record)."""
    import ray.train

    from pipeline import train

    untimed = train._train_job
    if getattr(untimed, "timed", False):
        return

    def timed(config: dict, *args):
        started = time.time()
        context = ray.train.get_context()
        tee = _Tee(sys.stdout)
        with contextlib.redirect_stdout(tee):
            result = untimed(config, *args)
        loop = parse_train_line(tee.copy.getvalue()) or {}
        record(
            "train_worker",
            start=started,
            end=time.time(),
            rank=context.get_world_rank(),
            world=context.get_world_size(),
            threads=_threads(),
            **loop,
        )
        return result

    timed.timed = True
    train._train_job = timed


@contextlib.contextmanager
def recording_here(directory: str | Path) -> Iterator[None]:
    """This process records too while the block runs: the driver's own model compute (the
    evaluation's embedding of the mix sample, `embed.embed_here`) is then timed as well."""
    before = os.environ.get(PROBE_DIR_ENV)
    os.environ[PROBE_DIR_ENV] = str(directory)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PROBE_DIR_ENV, None)
        else:
            os.environ[PROBE_DIR_ENV] = before


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Swap genloop's actor classes and train loops for the timed ones while the block runs,
    so that unmodified genloop code (run_loop, embed_texts, train_generation) reports timings."""
    from pipeline import train

    _UNTIMED["train_loop"] = train._train_loop
    _UNTIMED["serve_jobs"] = train._serve_jobs
    swaps = [
        (inference, "ModelWorker", TimedModelWorker),
        (inference, "GenerateActor", TimedGenerateActor),
        (inference, "GenerateAndScoreActor", TimedGenerateAndScoreActor),
        (inference, "ScoreActor", TimedScoreActor),
        (inference, "EvalActor", TimedEvalActor),
        (embed, "EmbedActor", TimedEmbedActor),
        (train, "_train_loop", timed_train_loop),
        (train, "_serve_jobs", timed_serve_jobs),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    try:
        for module, name, timed in swaps:
            setattr(module, name, timed)
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
        _UNTIMED.clear()


_record_imports()


# --------------------------------------------------------------------------- CPU shares


class CpuSampler:
    """Every process's CPU time on this machine (Linux /proc), sampled every `interval`
    seconds on a thread while the block runs: over any window inside it, `cpu_shares` says
    what each training worker got of a core and what everything else took (Ray's own
    processes, the driver). Does nothing where /proc is missing. A sample reads one small
    file per process, about 2 ms for 100 processes, which the driver's share includes."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.samples: list[tuple[float, float, dict[int, float]]] = []  # (time, idle, cpu)
        self.names: dict[int, str] = {}
        self._stop = None
        self._thread = None

    def __enter__(self) -> CpuSampler:
        if not os.path.exists("/proc/stat"):
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genloop-cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def _run(self) -> None:
        while True:
            self.samples.append(self._sample())
            if self._stop.wait(self.interval):
                self.samples.append(self._sample())
                return

    def _sample(self) -> tuple[float, float, dict[int, float]]:
        tick = os.sysconf("SC_CLK_TCK")
        cpu = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if self.names.get(pid, STARTING_WORKER) == STARTING_WORKER:
                    self.names[pid] = process_name(pid)  # a starting worker titles itself later
            except (OSError, IndexError):
                continue
            cpu[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        return time.time(), _machine_idle_seconds(tick), cpu


def _machine_idle_seconds(tick: int) -> float:
    """Idle and iowait time of all cores together, since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[4]) + int(fields[5])) / tick


def process_name(pid: int) -> str:
    """A short name for a process: a Ray worker's title without its method
    (`ray::TrainController`), a Python script's file name, else the program's."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    if not argv:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    return name_from_argv(argv)


def name_from_argv(argv: list[str]) -> str:
    """`process_name` from a process's command line."""
    if argv[0].startswith("ray::"):
        return argv[0].split()[0].split(".")[0]
    program = os.path.basename(argv[0])
    if program.startswith("python"):
        script = next((a for a in argv[1:] if a.endswith(".py")), None)
        if script and script.endswith(_RAY_WORKER_SCRIPTS):
            return STARTING_WORKER
        if script:
            return os.path.basename(script)
    return program


# A Ray worker runs these scripts until it is up and titles itself ray::<actor or task>.
_RAY_WORKER_SCRIPTS = ("/setup_worker.py", "/default_worker.py")
STARTING_WORKER = "ray worker starting"


def cpu_shares(
    samples: list[tuple[float, float, dict[int, float]]],
    names: dict[int, str],
    start: float,
    end: float,
    workers: set[int],
) -> dict | None:
    """CPU between the first and the last sample inside [start, end], in cores (1.0: one
    core busy all the time): each of `workers` (pids), the other processes together and the
    ones that took most, and the machine's idle time. None with under two samples there."""
    inside = [s for s in samples if start <= s[0] <= end]
    if len(inside) < 2:
        return None
    (t0, idle0, before), (t1, idle1, after) = inside[0], inside[-1]
    span = t1 - t0
    # A process that started inside the window used all its CPU inside it.
    used = {pid: (cpu - before.get(pid, 0.0)) / span for pid, cpu in after.items()}
    others: dict[str, float] = {}
    for pid, share in used.items():
        if pid not in workers and share > 0:
            name = names.get(pid, str(pid))
            others[name] = others.get(name, 0.0) + share
    top = sorted(others.items(), key=lambda kv: -kv[1])[:5]
    return {
        "window_s": span,
        "workers": [used.get(pid, 0.0) for pid in sorted(workers)],
        "others": sum(others.values()),
        "top_others": [[name, share] for name, share in top],
        "idle": (idle1 - idle0) / span,
    }
