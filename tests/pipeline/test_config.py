import importlib.util
from pathlib import Path

import pytest

from pipeline.config import ConfigError, RunConfig, load_config, read_yaml_mapping, validate

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "ray_configs").glob("*.yaml"))


def test_defaults_are_the_embedded_default_and_valid():
    cfg = load_config()
    assert cfg == RunConfig()
    assert validate(cfg) == []
    assert cfg.task.name == "arithmetic" and cfg.loop.generations >= 4


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_validates(preset):
    overrides = ["task.path=input.txt"] if preset.name == "text.yaml" else []
    cfg = load_config(preset, overrides)
    assert validate(cfg) == []


def test_arithmetic_preset_matches_the_defaults():
    assert load_config(ROOT / "ray_configs" / "arithmetic.yaml") == RunConfig()


def test_dotted_overrides_change_fields_with_types():
    cfg = load_config(
        None,
        [
            "loop.generations=6",
            "mix.real_fraction=0.2",
            "train.deepspeed.zero_stage=2",
            "mix.mode=accumulate",
            "task.fields={prompt: question}",
            "mix.size=100",
        ],
    )
    assert cfg.loop.generations == 6
    assert cfg.mix.real_fraction == 0.2
    assert cfg.train.deepspeed.zero_stage == 2
    assert cfg.mix.mode == "accumulate"
    assert cfg.task.fields == {"prompt": "question"}
    assert cfg.mix.size == 100


def test_int_is_accepted_for_a_float_field():
    assert load_config(None, ["mix.real_fraction=1"]).mix.real_fraction == 1.0


def test_curate_shorthand_sets_the_strategy():
    assert load_config(None, ["curate=none"]).curate.strategy == "none"


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            [
                "mix.real_fraction=1.5",
                "loop.generatons=3",
                "train.steps=abc",
                "curate.label_budget=-1",
                "mix.mode=sometimes",
                "nokey",
            ],
        )
    errors = "\n".join(info.value.errors)
    assert "mix.real_fraction: must be in [0, 1], got 1.5" in errors
    assert "unknown key 'loop.generatons'" in errors and "generations" in errors
    assert "train.steps: expected an integer, got 'abc'" in errors
    assert "mix.mode: 'sometimes' is not one of" in errors
    assert "'nokey': expected key=value" in errors
    assert len(info.value.errors) >= 5


def test_range_checks_run_after_types():
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            [
                "curate.label_budget=-1",
                "curate.gamma=0.7",
                "train.batch_size=63",
                "curate.strategy=best",
            ],
        )
    errors = "\n".join(info.value.errors)
    assert "curate.label_budget: must be >= 0" in errors
    assert "curate.gamma: must be in [0, 0.5]" in errors
    assert "multiple of train.workers" in errors
    assert "curate.strategy: 'best' is not one of" in errors


def test_generation_backend_vllm_needs_gpus_and_vllm():
    assert load_config(None, []).generate.backend == "hf"
    assert load_config(None, ["generate.backend=auto"]).generate.backend == "auto"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["generate.backend=vllm"])
    errors = "\n".join(info.value.errors)
    assert "generate.backend: vllm runs on GPUs; set train.use_gpu=true" in errors
    if importlib.util.find_spec("vllm") is None:
        assert "generate.backend: vllm is not installed here" in errors
    with pytest.raises(ConfigError, match="generate.backend: 'tgi' is not one of"):
        load_config(None, ["generate.backend=tgi"])


def test_an_accuracy_guard_needs_a_task_that_checks_answers():
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            ["task.name=text", "task.path=x.txt", "model.max_length=129", "guard.metric=accuracy"],
        )
    assert info.value.errors == [
        "guard.metric: accuracy needs a task that checks answers (arithmetic, or pairs with a "
        "task.verifier), not task.name=text; use perplexity or auto"
    ]
    load_config(None, ["guard.metric=accuracy"])  # arithmetic checks its answers


def test_text_task_needs_a_path():
    with pytest.raises(ConfigError, match="task.path"):
        load_config(None, ["task.name=text"])


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loop:\n  generations: 3\n  mix: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line 4 \(ParserError\)"):
        load_config(bad)
    flat = tmp_path / "flat.yaml"
    flat.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(flat)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"loop:\n  generations: \x80\n")
    with pytest.raises(ConfigError, match=r"binary.yaml: line 2: not UTF-8 text$"):
        load_config(binary)
    with pytest.raises(ConfigError, match=r"config file .*: is a directory, not a YAML file"):
        load_config(tmp_path)


def test_scientific_notation_is_a_number():
    assert load_config(None, ["train.lr=3e-3"]).train.lr == 0.003


def test_a_deepspeed_file_that_sets_the_batch_is_refused_up_front(tmp_path):
    """DeepSpeed asserted at the first training step that the file's batch disagreed with
    genloop's, after retries, as a traceback."""
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": 100, "gradient_accumulation_steps": "auto"}')
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"train.deepspeed.config_file={path}"])
    assert info.value.errors == [
        f"train.deepspeed.config_file: {path} sets train_batch_size=100; genloop sets the batch "
        'from train.batch_size and train.workers: remove it or write "auto"'
    ]


def test_the_arithmetic_task_refuses_held_out_files_and_a_context_too_short_for_a_sum():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["task.heldout_path=h.jsonl", "model.max_length=4"])
    assert info.value.errors == [
        "task.heldout_path: the arithmetic task makes its own data; remove task.heldout_path",
        "model.max_length: an arithmetic example with task.digits=3 is 14 tokens; got 4",
    ]
    assert load_config(None, ["model.max_length=14"]).model.max_length == 14


def test_a_model_of_one_position_is_refused():
    """model.max_length=1 trained on nothing (loss nan) and then failed in generation."""
    with pytest.raises(ConfigError) as error:
        load_config(None, ["model.max_length=1", "task.name=text", "task.path=x.txt"])
    assert error.value.errors == [
        "model.max_length: at least 2 (the start token and one more), got 1"
    ]


def test_numbers_must_be_finite_and_seeds_and_clipping_not_negative():
    """train.lr=.inf trained to nan and then failed in generation; seed=-1 was a numpy
    traceback; a negative train.grad_clip quietly meant no clipping."""
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lr=.inf", "generate.temperature=.nan", "seed=-1"])
    assert info.value.errors == [
        "generate.temperature: expected a finite number, got nan",
        "train.lr: expected a finite number, got inf",
        "seed: must be >= 0, got -1",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.grad_clip=-1"])
    assert info.value.errors == ["train.grad_clip: must be >= 0 (0: no clipping), got -1.0"]
    assert load_config(None, ["train.grad_clip=0"]).train.grad_clip == 0.0


def test_an_early_stop_needs_validation_prompts():
    """task.validation_prompts=0 passed, and generation 0's first early-stop check failed
    in the training workers (an empty batch of prompts)."""
    with pytest.raises(ConfigError) as info:
        load_config(None, ["task.validation_prompts=0"])
    assert info.value.errors == [
        "task.validation_prompts: 0 leaves generation 0's early stop "
        "(loop.gen0_target_accuracy=0.25) nothing to check; set loop.gen0_target_accuracy= "
        "(none) to train all loop.gen0_steps"
    ]
    cfg = load_config(None, ["task.validation_prompts=0", "loop.gen0_target_accuracy="])
    assert cfg.loop.gen0_target_accuracy is None


def test_the_text_task_needs_a_context_for_its_longest_sequence():
    """model.max_length=16 cut 96-character continuations to a few characters, silently."""
    text = ["task.name=text", "task.path=x.txt"]
    with pytest.raises(ConfigError) as info:
        load_config(None, [*text, "model.max_length=16"])
    assert info.value.errors == [
        "model.max_length: the text task's longest sequence is 129 tokens (the start token, "
        "then task.block_chars=128, or task.prompt_chars + task.continuation_chars=128); got 16"
    ]
    assert load_config(None, [*text, "model.max_length=129"]).model.max_length == 129
    # A model of the user's has its own tokenizer: characters are not its tokens.
    load_config(None, [*text, "model.max_length=16", "model.path=gpt2"])


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path):
    """PyYAML keeps the last value: the first lr of the file was dropped unseen."""
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  lr: 1.0e-4\n  steps: 10\n  lr: 3.0e-4\n")
    with pytest.raises(ConfigError) as info:
        load_config(preset)
    assert info.value.errors == [f"{preset}: line 4: 'lr' is given twice in one mapping"]
    merged = tmp_path / "merged.yaml"  # values a merge key brings may be overridden
    merged.write_text("base: &b\n  lr: 1.0e-4\ntrain:\n  <<: *b\n  lr: 3.0e-4\n")
    assert read_yaml_mapping(merged)["train"] == {"lr": 3.0e-4}
