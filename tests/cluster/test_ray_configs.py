"""Every file under ray_configs/ is checked: run presets load, DeepSpeed presets use only keys
DeepSpeed knows and agree with the run-config knobs, the cluster-launcher YAML passes Ray's
own schema, and the KubeRay manifests have their required fields and run an existing preset."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.config import DeepSpeedConfig, TrainConfig, load_config
from pipeline.train import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "ray_configs"
IMAGE_ROOT = "/home/ray/genloop"  # where ray_configs/docker/Dockerfile puts the project
DEEPSPEED = sorted((CONFIGS / "deepspeed").glob("*.json"))
KUBERAY = sorted((CONFIGS / "kuberay").glob("*.yaml"))
LAUNCHER = sorted((CONFIGS / "cluster").glob("*.yaml"))
# The run-config knobs each DeepSpeed preset goes with (ray_configs/deepspeed/README.md).
DEEPSPEED_KNOBS = {
    "zero2.json": DeepSpeedConfig(zero_stage=2),
    "zero2_offload.json": DeepSpeedConfig(zero_stage=2, offload=True),
    "zero3.json": DeepSpeedConfig(zero_stage=3),
    "zero3_offload.json": DeepSpeedConfig(zero_stage=3, offload=True),
}


def test_every_file_is_covered():
    """A new file in ray_configs/ needs a check here (or in tests/pipeline/test_config.py)."""
    covered = {
        *CONFIGS.glob("*.yaml"),  # run presets: tests/pipeline/test_config.py and below
        *(CONFIGS / "tune").glob("*.yaml"),  # tests/pipeline/test_tune.py
        *DEEPSPEED,
        *KUBERAY,
        *LAUNCHER,
        CONFIGS / "runtime_env" / "pip.yaml",
        CONFIGS / "deepspeed" / "README.md",
        CONFIGS / "docker" / "Dockerfile",
        CONFIGS / "docker" / "Dockerfile.dockerignore",
    }
    assert {p for p in CONFIGS.rglob("*") if p.is_file()} <= covered
    assert set(DEEPSPEED_KNOBS) == {p.name for p in DEEPSPEED}
    assert LAUNCHER and KUBERAY


def test_gpu_preset_is_a_multi_gpu_bf16_run():
    cfg = load_config(CONFIGS / "gpu.yaml")
    t = cfg.train
    assert t.use_gpu and t.workers >= 2 and t.deepspeed.precision == "bf16"
    assert t.deepspeed.zero_stage >= 2 and t.checkpoint_every > 0
    assert cfg.generate.workers >= 2 and t.batch_size % t.workers == 0
    assert deepspeed_config(t, t.steps)["bf16"] == {"enabled": True}


# --------------------------------------------------------------------------- DeepSpeed


def _known_top_level_keys() -> set[str]:
    import deepspeed.runtime.constants as constants

    names = {
        value
        for name, value in vars(constants).items()
        if name.isupper() and isinstance(value, str) and re.fullmatch(r"[a-z0-9_]+", value)
    }
    return names | {"zero_optimization"}


def _merge(base: dict, override: dict) -> dict:
    """A preset over genloop's DeepSpeed config: objects merged key by key, "auto" keeps
    genloop's value (the merge `train.deepspeed.config_file` performs)."""
    merged = dict(base)
    for key, value in override.items():
        if value == "auto":
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def test_genloop_deepspeed_config_uses_known_keys():
    known = _known_top_level_keys()
    for stage in (0, 1, 2, 3):
        generated = deepspeed_config(TrainConfig(deepspeed=DeepSpeedConfig(zero_stage=stage)), 10)
        assert set(generated) <= known, set(generated) - known


@pytest.mark.parametrize("preset", DEEPSPEED, ids=lambda p: p.name)
def test_deepspeed_preset_is_valid_and_matches_its_knobs(preset):
    from deepspeed.runtime.config import DeepSpeedConfig as DeepSpeedRuntimeConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    data = json.loads(preset.read_text())
    assert set(data) <= _known_top_level_keys(), set(data) - _known_top_level_keys()
    DeepSpeedZeroConfig(**data["zero_optimization"])  # pydantic, extra keys forbidden

    knobs = DEEPSPEED_KNOBS[preset.name]
    generated = deepspeed_config(TrainConfig(workers=1, deepspeed=knobs), 100)
    # What genloop itself writes for these knobs, the preset repeats (it only adds tuning):
    # genloop's block merged over the preset changes nothing.
    zero = data["zero_optimization"]
    assert _merge(zero, generated["zero_optimization"]) == zero
    assert ("offload_optimizer" in data["zero_optimization"]) == knobs.offload
    # Merged, DeepSpeed accepts it (one process: world size 1, so one worker's batch).
    runtime = DeepSpeedRuntimeConfig(_merge(generated, data))
    assert runtime.zero_optimization_stage == knobs.zero_stage


def test_runtime_env_pip_list_follows_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [d for d in pyproject["project"]["dependencies"] if not d.startswith("ray")]
    env = yaml.safe_load((CONFIGS / "runtime_env" / "pip.yaml").read_text())
    assert env["pip"]["packages"] == wanted
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own validation of the fields


# --------------------------------------------------------------------------- cluster launcher


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_cluster_launcher_yaml_passes_rays_schema(path):
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load(path.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["max_workers"] >= t.get("min_workers", 0) for t in workers)
    assert any("g5" in t["node_config"]["InstanceType"] for t in workers)  # GPU instances
    assert "-gpu" in config["docker"]["image"]
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2  # head and workers
    assert config["file_mounts"]["/home/ray/genloop"] == "."


# --------------------------------------------------------------------------- KubeRay


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _check_pod_template(template: dict, where: str) -> None:
    containers = template["spec"]["containers"]
    assert containers, where
    for container in containers:
        assert container["name"] and container["image"], where


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"].startswith("2.")
    assert spec.get("authOptions", {}).get("mode") == "token"
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head
    _check_pod_template(head["template"], "head")
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert 8265 in ports  # the job server
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        _check_pod_template(group["template"], group["groupName"])
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    # Every pod mounts the shared volume where runs live.
    for template in [head["template"]] + [g["template"] for g in groups]:
        mounts = template["spec"]["containers"][0]["volumeMounts"]
        assert any(m["mountPath"] == "/mnt/genloop" for m in mounts)


def _check_entrypoint(entrypoint: str) -> None:
    """The entrypoint is a genloop run of a preset that exists and loads with its overrides."""
    argv = shlex.split(entrypoint)
    assert argv[:4] == ["python", "-m", "pipeline.cli", "run"], argv
    from pipeline.cli import _parser

    args, extra = _parser().parse_known_args(argv[3:])
    assert args.config and args.config.startswith(IMAGE_ROOT + "/"), args.config
    preset = ROOT / args.config.removeprefix(IMAGE_ROOT + "/")
    assert preset.is_file(), preset
    assert args.run_dir and args.run_dir.startswith("/mnt/genloop/")
    load_config(preset, [*args.overrides, *extra])


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_has_the_required_fields(path):
    for doc in _documents(path):
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), path.name
        assert doc["metadata"]["name"]
        if doc["kind"] == "RayCluster":
            assert doc["apiVersion"] == "ray.io/v1"
            _check_ray_cluster_spec(doc["spec"])
        elif doc["kind"] == "RayJob":
            assert doc["apiVersion"] == "ray.io/v1"
            spec = doc["spec"]
            _check_ray_cluster_spec(spec["rayClusterSpec"])
            _check_entrypoint(spec["entrypoint"])
            yaml.safe_load(spec["runtimeEnvYAML"])
            assert spec["shutdownAfterJobFinishes"] is True
        else:
            assert doc["kind"] == "PersistentVolumeClaim"
            assert "ReadWriteMany" in doc["spec"]["accessModes"]


def test_kuberay_manifests_use_the_shared_volume_claim():
    claims = {
        d["metadata"]["name"]
        for p in KUBERAY
        for d in _documents(p)
        if d["kind"] == "PersistentVolumeClaim"
    }
    text = " ".join(p.read_text() for p in KUBERAY)
    assert claims and all(f"claimName: {c}" in text for c in claims)
    assert set(re.findall(r"claimName: (\S+)\}", text)) <= claims


def test_kuberay_and_docker_agree_on_the_project_path():
    dockerfile = (CONFIGS / "docker" / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_ROOT}" in dockerfile
    assert "FROM rayproject/ray:2.60.0-" in dockerfile
    ignored = (CONFIGS / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)
