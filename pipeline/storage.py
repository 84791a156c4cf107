"""Where a run lives: a local directory, a shared filesystem (NFS), or an object store.

A run directory given as a URI that pyarrow understands (`s3://bucket/runs/x`, `gs://...`,
`hdfs://...`, `file:///mnt/shared/x`) is a *remote run*: the driver works in a local mirror
(`$GENLOOP_CACHE/mirrors/<hash>`, default `~/.cache/genloop`), fetches the URI's content into
it when a run resumes, and after every stage pushes the files that are new or changed back to
the URI, completion markers last: whoever resumes the run from the URI (on another machine)
sees a stage as done only once all of its files are there. Ray Train writes its checkpoints
straight to the URI, and models reach Ray workers by URI: a worker copies each model into its
own cache once (`localize`), so workers on other nodes never need the driver's disk.

A local path or an NFS mount needs none of this: every node sees the same files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

MARKER_DIR = ".done"


def is_uri(path: str | Path) -> bool:
    """`s3://...`, `gs://...`, `file:///...`: anything with a scheme; a plain path is not."""
    return "://" in str(path)


def cache_root() -> Path:
    return Path(os.environ.get("GENLOOP_CACHE", "~/.cache/genloop")).expanduser()


def _key(uri: str) -> str:
    return hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:20]


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI.

    Raises:
        DataError: the URI's scheme is not one pyarrow supports here, or it is malformed.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    from pipeline.data import DataError

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        raise DataError(f"{uri}: not a storage URI pyarrow can open ({e})") from None


def localize(path: str) -> str:
    """A local directory holding `path`: `path` itself when it is local, else a copy of the
    URI's content in this machine's cache, fetched once (written to a temporary name, then
    renamed, so a crash never leaves a partial copy that looks complete)."""
    if not is_uri(path):
        return path
    import pyarrow.fs as pafs

    target = cache_root() / "objects" / _key(path)
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    fs, inside = filesystem(path)
    pafs.copy_files(inside, str(temporary), source_filesystem=fs)
    try:
        temporary.rename(target)
    except OSError:  # another process on this machine fetched it first
        shutil.rmtree(temporary, ignore_errors=True)
    return str(target)


class RemoteRun:
    """A run directory at a URI, mirrored in a local directory the loop works in."""

    def __init__(self, uri: str, local: Path | None = None):
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri)
        self.local = local or cache_root() / "mirrors" / _key(self.uri)
        self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)
        self.pulled = False

    def uri_of(self, local_path: str | Path) -> str:
        """The URI of a path inside the local mirror."""
        relative = Path(local_path).resolve().relative_to(self.local.resolve())
        return f"{self.uri}/{relative.as_posix()}" if str(relative) != "." else self.uri

    def holds_a_run(self) -> bool:
        """Is there anything at the URI already?"""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            return False
        selector = pafs.FileSelector(self.root, recursive=False, allow_not_found=True)
        return bool(self.fs.get_file_info(selector))

    def pull(self) -> None:
        """Copy the URI's content into a fresh local mirror (the start of a resume)."""
        import pyarrow.fs as pafs

        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        if self.holds_a_run():
            pafs.copy_files(self.root, str(self.local), source_filesystem=self.fs)
        self._pushed = self._local_files()
        self.pulled = True

    def push(self) -> int:
        """Upload every file of the mirror that is new or changed since the last push,
        completion markers after everything else. Returns the number of files sent."""
        import pyarrow.fs as pafs

        changed = [
            relative
            for relative, signature in self._local_files().items()
            if self._pushed.get(relative) != signature
        ]
        changed.sort(key=lambda relative: (f"/{MARKER_DIR}/" in f"/{relative}", relative))
        local_fs = pafs.LocalFileSystem()
        for relative in changed:
            source = self.local / relative
            signature = _signature(source)
            destination = f"{self.root}/{relative}"
            self.fs.create_dir(destination.rpartition("/")[0], recursive=True)
            pafs.copy_files(
                str(source),
                destination,
                source_filesystem=local_fs,
                destination_filesystem=self.fs,
            )
            self._pushed[relative] = signature
        return len(changed)

    def delete(self, local_path: str | Path) -> None:
        """Remove the URI's copy of a file or directory of the mirror (if it has one)."""
        import pyarrow.fs as pafs

        relative = Path(local_path).resolve().relative_to(self.local.resolve()).as_posix()
        remote = f"{self.root}/{relative}"
        kind = self.fs.get_file_info(remote).type
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(remote)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(remote)
        for pushed in [p for p in self._pushed if p == relative or p.startswith(relative + "/")]:
            del self._pushed[pushed]

    def _local_files(self) -> dict[str, tuple[int, int]]:
        files = {}
        for path in self.local.rglob("*"):
            relative = path.relative_to(self.local)
            if path.is_file() and not any(part.endswith(".tmp") for part in relative.parts):
                files[relative.as_posix()] = _signature(path)
        return files


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
