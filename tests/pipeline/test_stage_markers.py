"""Completion markers record the files a stage wrote; a resume refuses a finished stage whose
files went missing or changed, naming the file, instead of failing later with a traceback."""

import json
from pathlib import Path

import pytest

from pipeline.data import DataError
from pipeline.loop import Generation, check_finished_stages


def _finished_generate(root: Path) -> Generation:
    gen = Generation(root, 2)
    gen.dir.mkdir(parents=True)
    gen.path("samples.parquet").write_bytes(b"12345")
    (gen.path("model")).mkdir()
    (gen.path("model") / "config.json").write_text("{}")
    gen.mark("generate", ("samples.parquet", "model", "not_written.json"))
    return gen


def test_a_marker_records_the_size_of_each_file_the_stage_wrote(tmp_path):
    gen = _finished_generate(tmp_path)
    marker = json.loads((gen.dir / ".done" / "generate").read_text())
    assert marker["outputs"] == {"samples.parquet": 5, "model/config.json": 2}
    assert gen.done("generate")
    gen.check_finished("generate")
    check_finished_stages(tmp_path)


def test_a_deleted_file_of_a_finished_stage_is_named(tmp_path):
    gen = _finished_generate(tmp_path)
    gen.path("samples.parquet").unlink()
    with pytest.raises(DataError) as error:
        check_finished_stages(tmp_path)
    assert str(error.value) == (
        f"{gen.dir}/samples.parquet: missing, yet gen_02/.done/generate says the generate stage "
        f"finished; restore the file, or delete {gen.dir} and the generations after it to redo "
        "them"
    )


def test_a_changed_file_of_a_finished_stage_is_named(tmp_path):
    gen = _finished_generate(tmp_path)
    (gen.path("model") / "config.json").write_text("{ }")
    with pytest.raises(DataError, match=r"model/config.json: 3 bytes, not the 2 it was written"):
        gen.check_finished("generate")


def test_markers_that_record_no_files_are_trusted(tmp_path):
    """Markers of runs made before markers recorded files, and the tracker's marker."""
    gen = Generation(tmp_path, 0)
    (gen.dir / ".done").mkdir(parents=True)
    (gen.dir / ".done" / "train").write_text("1733580000.5\n")
    (gen.dir / ".done" / "tracked").write_text("tracked\n")
    (tmp_path / "gen_notes").mkdir()
    check_finished_stages(tmp_path)
