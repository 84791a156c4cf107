import pandas as pd
import pytest

from pipeline.data import DataError, atomic_dir, read_records, read_text, write_parquet


def test_jsonl_with_field_mapping(gsm8k):
    frame = read_records(gsm8k, {"prompt": "question", "response": "answer"})
    assert len(frame) == 7473
    assert {"prompt", "response"} <= set(frame.columns)
    assert frame["response"].iloc[0].rsplit("####", 1)[1].strip().isdigit()


def test_parquet_roundtrip(tmp_path):
    path = tmp_path / "d.parquet"
    write_parquet(pd.DataFrame({"prompt": ["a"], "response": ["b"], "extra": [1]}), path)
    frame = read_records(path)
    assert frame.to_dict("records") == [{"prompt": "a", "response": "b", "extra": 1}]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "none.jsonl")


def test_malformed_line_is_named_by_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", \n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 3: not valid JSON"):
        read_records(path)


def test_non_object_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        read_records(path)


def test_missing_column_names_the_columns_and_the_mapping(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(DataError, match=r"missing column 'prompt'; it has question, answer"):
        read_records(path, {})


def test_non_text_value_is_named_by_row(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3, "response": "b"}\n')
    with pytest.raises(DataError, match="row 2: column 'prompt' is not text"):
        read_records(path)


def test_empty_data(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError):
        read_records(path)
    text = tmp_path / "empty.txt"
    text.write_text("  \n")
    with pytest.raises(DataError, match="no text"):
        read_text(text)


def test_unknown_format(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,response\n")
    with pytest.raises(DataError, match="unknown format"):
        read_records(path)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("crash")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """Temporary files are private (0600); the artefacts must not stay that way, or other
    users and web servers of a shared run directory cannot read them."""
    import os
    import stat

    from pipeline.data import atomic_dir, write_text

    mask = os.umask(0o022)
    try:
        write_text("x", tmp_path / "a.txt")
        with atomic_dir(tmp_path / "model") as directory:
            (directory / "w").write_text("w")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
