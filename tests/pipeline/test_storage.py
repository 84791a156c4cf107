"""Run directories at a storage URI: the local mirror, pushes (markers last), pulls, caches."""

import pyarrow.fs as pafs
import pytest

from pipeline.data import DataError
from pipeline.storage import RemoteRun, is_uri, localize
from pipeline.train import TRAIN_STATE, latest_checkpoint


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENLOOP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_uris_and_paths_are_told_apart():
    assert is_uri("s3://bucket/run") and is_uri("file:///tmp/run")
    assert not is_uri("/tmp/run") and not is_uri("runs/x")


def test_push_sends_new_and_changed_files_with_markers_last(tmp_path, cache, monkeypatch):
    remote = RemoteRun((tmp_path / "bucket" / "run").as_uri())
    remote.pull()  # nothing there yet: an empty mirror
    assert remote.local.is_dir() and not any(remote.local.iterdir())
    (remote.local / "gen_01" / ".done").mkdir(parents=True)
    (remote.local / "gen_01" / "mix.parquet").write_text("rows")
    (remote.local / "gen_01" / ".done" / "mix").write_text("1")
    (remote.local / "gen_01" / ".mix.parquet.x1.tmp").write_text("half")  # never sent
    sent = []
    original = pafs.copy_files
    monkeypatch.setattr(
        pafs, "copy_files", lambda src, dst, **kw: (sent.append(dst), original(src, dst, **kw))
    )
    assert remote.push() == 2
    assert sent[-1].endswith("gen_01/.done/mix")  # the marker after the data
    assert (tmp_path / "bucket" / "run" / "gen_01" / "mix.parquet").read_text() == "rows"
    assert not (tmp_path / "bucket" / "run" / "gen_01" / ".mix.parquet.x1.tmp").exists()
    assert remote.push() == 0  # nothing changed, nothing sent
    (remote.local / "gen_01" / "mix.parquet").write_text("more rows")
    assert remote.push() == 1
    assert remote.uri_of(remote.local / "gen_01" / "model") == f"{remote.uri}/gen_01/model"

    # Another machine resumes from the URI: a fresh mirror with everything pushed.
    other = RemoteRun(remote.uri, local=tmp_path / "other_mirror")
    other.pull()
    assert (other.local / "gen_01" / "mix.parquet").read_text() == "more rows"
    assert other.push() == 0
    other.delete(other.local / "gen_01" / ".done" / "mix")
    assert not (tmp_path / "bucket" / "run" / "gen_01" / ".done" / "mix").exists()
    assert other.holds_a_run()


def test_localize_fetches_a_uri_once(tmp_path, cache):
    source = tmp_path / "models" / "m1"
    source.mkdir(parents=True)
    (source / "config.json").write_text("{}")
    assert localize(str(source)) == str(source)  # a local path is used where it is
    local = localize(source.as_uri())
    assert (cache / "objects") in __import__("pathlib").Path(local).parents
    assert open(f"{local}/config.json").read() == "{}"
    (source / "config.json").write_text("changed")
    assert localize(source.as_uri()) == local  # cached: models at a URI do not change
    assert not list((cache / "objects").glob("*.tmp"))


def test_latest_checkpoint_on_a_path_and_a_uri(tmp_path):
    train = tmp_path / "gen_01" / "train"
    for name in ("checkpoint_000", "checkpoint_001", "checkpoint_002"):
        (train / name).mkdir(parents=True)
    (train / "checkpoint_000" / TRAIN_STATE).write_text("{}")
    (train / "checkpoint_001" / TRAIN_STATE).write_text("{}")  # 002: never completed
    assert latest_checkpoint(str(train)) == str(train / "checkpoint_001")
    assert latest_checkpoint(train.as_uri()) == f"{train.as_uri()}/checkpoint_001"
    assert latest_checkpoint(str(tmp_path / "nothing")) is None


def test_an_unknown_scheme_is_a_clear_error():
    with pytest.raises(DataError, match="not a storage URI"):
        RemoteRun("nosuchscheme://bucket/run")
