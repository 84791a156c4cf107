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


def test_missing_column_lists_the_files_own_names_after_a_mapping(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(DataError) as error:
        read_records(path, {"prompt": "question"})
    assert str(error.value) == (
        f"{path}: missing column 'response'; it has question, answer "
        "(map it with task.fields.response=<column>)"
    )


def test_a_mapping_to_a_column_the_file_lacks_is_refused(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(DataError) as error:
        read_records(path, {"prompt": "nosuch"}, fields_key="fields")
    assert (
        str(error.value)
        == f"{path}: no column 'nosuch' (fields.prompt=nosuch); it has prompt, response"
    )


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError) as error:
        read_records(path)
    assert str(error.value) == f"{path}: line 2: not UTF-8 text (byte 13 of the line)"


def test_a_byte_order_mark_is_not_data(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\n')
    assert read_records(path).to_dict("records") == [{"prompt": "a", "response": "b"}]


def test_non_text_value_is_named_by_row(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3, "response": "b"}\n')
    with pytest.raises(DataError, match="row 2: column 'prompt' is not text"):
        read_records(path)


def test_empty_data(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no rows$"):
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


def test_a_directory_of_parquet_files_reads_as_one_table(tmp_path):
    """A dataset as Ray Data's write_parquet leaves it: part files, in subdirectories too;
    marker and hidden files are not data; a column some parts lack is null in them."""
    data = tmp_path / "dataset"
    write_parquet(pd.DataFrame({"prompt": ["a", "b"], "response": ["1", "2"]}), data / "0.parquet")
    write_parquet(
        pd.DataFrame({"prompt": ["c"], "response": ["3"], "source": ["web"]}),
        data / "day=2" / "1.parquet",
    )
    (data / "_SUCCESS").write_text("")
    (data / ".1.parquet.crc").write_text("not parquet")
    (data / "_temporary").mkdir()
    (data / "_temporary" / "2.parquet").write_text("half written")
    frame = read_records(data)
    assert frame["prompt"].tolist() == ["a", "b", "c"]
    assert frame["source"].isna().tolist() == [True, True, False]
    text = tmp_path / "text"
    write_parquet(pd.DataFrame({"text": ["to be", "or not"]}), text / "part-0.parquet")
    assert read_text(text) == "to be\nor not"


def test_a_directory_without_parquet_or_with_a_broken_part_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: a directory with no \.parquet files"):
        read_records(tmp_path / "empty")
    broken = tmp_path / "broken"
    write_parquet(pd.DataFrame({"prompt": ["a"], "response": ["1"]}), broken / "0.parquet")
    (broken / "1.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"broken/1\.parquet: not a readable Parquet file"):
        read_records(broken)
    write_parquet(pd.DataFrame({"prompt": [1], "response": ["2"]}), tmp_path / "mixed/0.parquet")
    write_parquet(pd.DataFrame({"prompt": ["x"], "response": ["2"]}), tmp_path / "mixed/1.parquet")
    with pytest.raises(DataError, match="mixed: its Parquet files do not share one schema"):
        read_records(tmp_path / "mixed")
