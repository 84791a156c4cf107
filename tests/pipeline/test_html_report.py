"""`genloop report`: a self-contained HTML page from a small synthetic run directory."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.cli import main
from pipeline.html_report import build_report, curation_funnel, mix_composition

PNG = b"\x89PNG\r\n\x1a\n"


def _metrics(generation: int, accuracy: float, perplexity: float, mix: dict, **extra) -> dict:
    return {
        "generation": generation,
        "heldout_loss": 0.1,
        "perplexity": perplexity,
        "accuracy": accuracy,
        "distinct_1": 0.8,
        "distinct_2": 0.5,
        "char_entropy": 3.1,
        "word_entropy": 8.0,
        "vocabulary": 400,
        "mean_length": 4.0,
        "train": {"step": 300, "log": []},
        "mix": mix,
        **extra,
    }


def _done(directory: Path, *stages: str) -> None:
    (directory / ".done").mkdir(parents=True, exist_ok=True)
    for stage in stages:
        (directory / ".done" / stage).write_text("1\n")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """Three generations: 0 (real data), 1 (curated, labels, diagnostics, selection) and
    2 unfinished (generated only, its mix.parquet half-written)."""
    run = tmp_path / "run"
    run.mkdir()
    config = {"seed": 0, "task": {"name": "arithmetic"}, "loop": {"generations": 3}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))

    gen0 = run / "gen_00"
    gen0.mkdir()
    pd.DataFrame({"source": ["real"] * 10}).to_parquet(gen0 / "mix.parquet")
    mix0 = {"real": 10, "synthetic": 0, "labeled": 0}
    (gen0 / "metrics.json").write_text(json.dumps(_metrics(0, 0.5, 1.5, mix0)))
    _done(gen0, "mix", "train", "evaluate")

    gen1 = run / "gen_01"
    gen1.mkdir()
    sources = ["real"] * 2 + ["synthetic"] * 6 + ["labeled"] * 4
    pd.DataFrame({"source": sources}).to_parquet(gen1 / "mix.parquet")
    pd.DataFrame(
        {
            "kept": [True] * 6 + [False] * 4,
            "drop_reason": [""] * 6 + ["verifier rejected"] * 3 + ["too long"],
        }
    ).to_parquet(gen1 / "curated_samples.parquet")
    pd.DataFrame(
        {
            "prompt_id": [1, 2],
            "prompt": ["1+1=", "2+2="],
            "response": ["2", "5"],
            "correct": [True, False],
        }
    ).to_parquet(gen1 / "labels.parquet")
    curate = {"samples": 10, "kept": 6, "dropped": 4, "labels_spent": 2}
    (gen1 / "curate.json").write_text(json.dumps(curate))
    mix1 = {"real": 2, "synthetic": 6, "labeled": 4}
    (gen1 / "metrics.json").write_text(json.dumps(_metrics(1, 0.7, 1.2, mix1, curate=curate)))
    pd.DataFrame(
        {
            "category": ["whitespace/newline", "digits", "special"],
            "tokens": [10, 80, 10],
            "share": [0.1, 0.8, 0.1],
            "mean_delta": [0.3, -0.1, 0.0],
            "share_of_increase": [0.9, 0.1, 0.0],
        }
    ).to_parquet(gen1 / "diagnostics.parquet")
    selection = {
        "method": "clusterclip",
        "cluster_sizes": {"0": 5, "1": 3, "2": 9},
        "cluster_budget": {"0": 2, "1": 2, "2": 2},
    }
    (gen1 / "selection.json").write_text(json.dumps(selection))
    _done(gen1, "generate", "score", "curate", "mix", "train", "evaluate")

    gen2 = run / "gen_02"
    gen2.mkdir()
    pd.DataFrame({"response": ["1"]}).to_parquet(gen2 / "samples.parquet")
    (gen2 / "mix.parquet").write_bytes(b"PAR1 cut short")  # a crash mid-write
    _done(gen2, "generate")
    return run


def _images(page: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)


def _check_self_contained(page: str) -> int:
    images = _images(page)
    assert page.count("<img") == len(images)
    for src in images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :], validate=True).startswith(PNG)
    assert not re.search(r"https?://", page)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    return len(images)


def test_report_of_a_run_is_self_contained(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "gen_02: unfinished" in printed
    page = (run_dir / "report.html").read_text()
    # metrics, mix, curation funnel, token categories, selection clusters
    assert _check_self_contained(page) == 5
    for anchor in ("metrics", "table", "mix", "curation", "tokens", "selection", "config"):
        assert f'<section id="{anchor}">' in page
    assert "gen_02: unfinished (stages done: generate)" in page
    assert "gen_02/mix.parquet: unreadable, skipped" in page
    assert "1 of 4 generations not started yet (gen_03)" in page
    assert "dropped: verifier rejected" in page and "dropped: too long" in page
    assert "task.name" not in page and "<td>name</td><td>arithmetic</td>" in page


def test_report_skips_sections_without_their_files(run_dir, tmp_path):
    (run_dir / "gen_01" / "diagnostics.parquet").unlink()
    (run_dir / "gen_01" / "selection.json").unlink()
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    page = out.read_text()
    assert _check_self_contained(page) == 3
    assert 'id="tokens"' not in page and 'id="selection"' not in page
    assert not (run_dir / "report.html").exists()


def test_report_of_a_run_that_has_not_evaluated_anything(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"loop": {"generations": 1}}))
    _done(run / "gen_00", "mix")
    pd.DataFrame({"source": ["real"] * 3}).to_parquet(run / "gen_00" / "mix.parquet")
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert _check_self_contained(page) == 1  # the mix of generation 0
    assert "No generation has been evaluated yet." in page
    assert "gen_00: unfinished (stages done: mix)" in page


def test_report_numbers(run_dir):
    report = build_report(run_dir)
    funnel = curation_funnel(report, {1: run_dir / "gen_01"}).iloc[0].to_dict()
    assert funnel == {
        "generation": 1,
        "samples": 10,
        "kept": 6,
        "dropped: too long": 1,
        "dropped: verifier rejected": 3,
        "labels": 2,
        "labels_correct": 1,
    }
    mix = mix_composition(report, {0: run_dir / "gen_00", 1: run_dir / "gen_01"})
    assert mix.to_dict("records") == [
        {"generation": 0, "real": 10, "synthetic": 0, "labeled": 0},
        {"generation": 1, "real": 2, "synthetic": 6, "labeled": 4},
    ]


def test_report_bad_run_dir_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "not a genloop run directory" in err and "Traceback" not in err


def test_report_of_a_file_says_it_is_a_file(tmp_path, capsys):
    file = tmp_path / "run.txt"
    file.write_text("not a run\n")
    assert main(["report", str(file)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"genloop: error: {file}: is a file, not a run directory\n"
    assert captured.out == ""


@pytest.mark.parametrize(
    "content, note",
    [
        (b"{bad", "not valid YAML at line 1"),
        (b"seed: 0\nloop: [1\n", "not valid YAML at line 3"),
        (bytes(range(256)), "not UTF-8 text at byte 128"),
        (b"- a\n", "a YAML list, not a mapping of sections"),
        (b"", "empty"),
    ],
    ids=["not-yaml", "cut-short", "not-utf8", "a-list", "empty"],
)
def test_a_damaged_config_yaml_is_a_one_line_note(tmp_path, capsys, content, note):
    """The report shows what it can of a run, as it does for every other damaged file."""
    run = tmp_path / "run"
    _done(run / "gen_00", "generate")
    (run / "config.yaml").write_bytes(content)
    assert main(["report", str(run)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1:] == [
        f"  skipped: config.yaml: unreadable, skipped ({note})",
        "  skipped: gen_00: unfinished (stages done: generate); its metrics are not shown",
    ]
    page = (run / "report.html").read_text()
    assert "config.yaml could not be read; see the note at the top." in page


def test_report_shows_what_the_guard_set_aside(run_dir):
    from pipeline.html_report import guard_events

    gen1 = run_dir / "gen_01"
    kept = json.loads((gen1 / "metrics.json").read_text())
    kept |= {"attempt": 1, "guard": {"metric": "perplexity", "before": 1.5, "after": 1.2}}
    (gen1 / "metrics.json").write_text(json.dumps(kept))
    (gen1 / "attempt_0").mkdir()
    rejected = _metrics(1, 0.4, 1.9, {"real": 0, "synthetic": 8, "labeled": 0}, attempt=0)
    rejected["guard"] = {"metric": "perplexity", "before": 1.5, "after": 1.9, "worse": True}
    (gen1 / "attempt_0" / "metrics.json").write_text(json.dumps(rejected))

    report = build_report(run_dir)
    events = guard_events(report, {1: gen1})
    assert events[["attempt", "after", "outcome"]].values.tolist() == [
        [0, 1.9, "set aside, redone"],
        [1, 1.2, "kept"],
    ]
    assert any(section.anchor == "guard" for section in report.sections)
