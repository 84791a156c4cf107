"""Reading the user's data and writing artefacts atomically.

Readers turn every problem a person can fix (missing file, malformed JSONL line, missing
column, empty data) into a DataError naming the file and row. Writers put each artefact in
place with a rename, so a crash never leaves a partial file that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


class DataError(ValueError):
    """Bad input data; the message names the file and, where it helps, the row."""


# --------------------------------------------------------------------------- reading


def read_records(
    path: str | Path,
    fields: dict[str, str] | None = None,
    required: Sequence[str] = ("prompt", "response"),
    fields_key: str | None = "task.fields",
) -> pd.DataFrame:
    """Rows of a JSONL or Parquet file, or of a directory of Parquet files (a dataset as Ray
    Data writes it), columns renamed by `fields` (genloop name -> file name). `fields_key`
    is where the user sets `fields` (`task.fields`, `fields`), for the errors' hints.

    Returns a frame with the `required` columns as strings (other columns kept).

    Raises:
        DataError: missing file, unknown format, malformed line, no rows, a mapped or
            required column missing.
    """
    path = Path(path)
    if path.is_dir():
        frame = _read_parquet(path, _parquet_files(path))
    elif not path.is_file():
        raise DataError(f"{path}: file not found")
    elif (suffix := path.suffix.lower()) in (".jsonl", ".json"):
        frame = _read_jsonl(path)
    elif suffix == ".parquet":
        frame = _read_parquet(path, [path])
    else:
        raise DataError(f"{path}: unknown format {suffix!r}; use .jsonl or .parquet")
    if len(frame) == 0:
        raise DataError(f"{path}: no rows")
    columns = ", ".join(map(str, frame.columns))  # the file's own names, for the errors
    for ours, source in (fields or {}).items():
        if source not in frame.columns:
            where = f"{fields_key}.{ours}={source}" if fields_key else f"for {ours}"
            raise DataError(f"{path}: no column {source!r} ({where}); it has {columns}")
    frame = frame.rename(columns={source: ours for ours, source in (fields or {}).items()})
    for column in required:
        if column not in frame.columns:
            hint = f" (map it with {fields_key}.{column}=<column>)" if fields_key else ""
            raise DataError(f"{path}: missing column {column!r}; it has {columns}{hint}")
        bad = frame[column].map(lambda v: not isinstance(v, str))
        if bad.any():
            row = int(bad.to_numpy().argmax())
            raise DataError(
                f"{path}: row {row + 1}: column {column!r} is not text "
                f"({frame[column].iloc[row]!r})"
            )
    return frame.reset_index(drop=True)


def _parquet_files(directory: Path) -> list[Path]:
    """The Parquet files of a dataset directory, as Ray Data's `write_parquet` or Spark write
    them, subdirectories included, in path order; hidden and underscore files (_SUCCESS,
    .crc) are not data."""
    files = sorted(
        f
        for f in directory.rglob("*.parquet")
        if f.is_file()
        and not any(part.startswith((".", "_")) for part in f.relative_to(directory).parts)
    )
    if not files:
        raise DataError(f"{directory}: a directory with no .parquet files in it")
    return files


def _read_parquet(path: Path, files: list[Path]) -> pd.DataFrame:
    """One table of one or more Parquet files; `path` names them in errors."""
    tables = []
    for file in files:
        try:
            tables.append(pq.read_table(file))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{file}: not a readable Parquet file ({e})") from None
    try:
        return pa.concat_tables(tables, promote_options="default").to_pandas()
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"{path}: its Parquet files do not share one schema ({e})") from None


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:  # a byte-order mark may open the file
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: line {number}: not UTF-8 text (byte {e.start + 1} of the line)"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}: line {number}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
    return pd.DataFrame(rows)


def read_text(
    path: str | Path, fields: dict[str, str] | None = None, fields_key: str | None = "task.fields"
) -> str:
    """A plain-text corpus: a .txt file, or the `text` column of JSONL / Parquet, joined."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in (".jsonl", ".json", ".parquet"):
        frame = read_records(path, fields, required=("text",), fields_key=fields_key)
        text = "\n".join(frame["text"])
    else:
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: no text")
    return text


# --------------------------------------------------------------------------- writing


def write_parquet(frame: pd.DataFrame | pa.Table, path: str | Path) -> None:
    """Write one Parquet file atomically (temp file, then rename)."""
    table = (
        frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(obj, path: str | Path) -> None:
    write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n", path)


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yield a temporary path beside `path`; rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file private (0600); the artefact gets the usual mode instead.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> the usual mode
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
