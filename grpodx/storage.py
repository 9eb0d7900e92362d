"""Where a run's outputs live: a local directory or any filesystem URI that pyarrow can open.

On one machine ``train.run_dir`` is a directory; on a Ray cluster the driver, the learner and the
rollout workers sit on different nodes and must share it, so it may also be ``s3://bucket/prefix``,
``gs://bucket/prefix``, ``file:///abs/path`` or anything else ``pyarrow.fs.FileSystem.from_uri``
accepts. :class:`RunStorage` is the one place that knows the difference: callers name files by paths
relative to the run root ('/'-separated) and never touch a filesystem object themselves.

The one rule, for every write: **a reader sees the old content or the new content, never part of
it.** How that is kept depends on the filesystem:

- a filesystem whose move is an atomic rename (local, HDFS) writes a staging file or directory next
  to the target and renames it into place;
- an object store (S3, GCS, Azure, and Arrow's in-memory ``mock://``, which tests use to stand for
  one) cannot rename, but one put of one object is already all-or-nothing, so files are written in
  place; a directory (a checkpoint) is complete only once its ``_COMPLETE`` marker exists, and the
  marker is the first object deleted and the last one written (see :meth:`RunStorage.upload_dir`).
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from grpodx.redaction import redact

COMPLETE_MARKER = "_COMPLETE"
# type_name of the filesystems whose move() is an atomic rename; every other one is treated as an
# object store.
_RENAMING_FILESYSTEMS = frozenset({"local", "hdfs"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Everything between "scheme://" and the last "@" before the query is user info (credentials).
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^?#]*)@")
_SECRET_PARAM = re.compile(r"key|secret|token|password|passwd|credential|sig|sas", re.IGNORECASE)


def _secrets_of(uri: str) -> list[str]:
    """The substrings of ``uri`` that must never be shown: user info and secret-looking query values."""
    secrets = []
    match = _USERINFO.match(uri)
    if match:
        secrets.append(match.group(2))
    _, _, query = uri.partition("?")
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if value and _SECRET_PARAM.search(name):
            secrets.append(value)
    # Arrow may print the percent-decoded form in its own messages.
    return sorted({s for secret in secrets for s in (secret, unquote(secret)) if s}, key=len, reverse=True)


def _join(base: str, rel: str) -> str:
    if not base:
        return rel
    if not rel:
        return base
    return base.rstrip("/") + "/" + rel


def _relative(parts: tuple[str, ...]) -> str:
    """'/'-joined, normalised relative path; '..' is refused so nothing escapes the run root."""
    names = [name for part in parts for name in str(part).split("/") if name not in ("", ".")]
    if ".." in names:
        raise ValueError(f"run storage paths stay inside the run root; got {'/'.join(map(str, parts))!r}")
    return "/".join(names)


def _open(root: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it that ``root`` (an absolute path or a URI) names."""
    if not _SCHEME.match(root):
        return pafs.LocalFileSystem(), root
    secrets = _secrets_of(root)
    shown = redact(root, secrets)
    try:
        filesystem, path = pafs.FileSystem.from_uri(root)
    except (ValueError, NotImplementedError, OSError) as error:
        message = str(error).strip()
        reason = redact(message.splitlines()[0], secrets) if message else type(error).__name__
        # "from None": the chained Arrow error would print the URI, credentials included.
        raise ValueError(
            f"train.run_dir={shown!r} cannot be opened ({reason}); set it to a local path or a URI that "
            "pyarrow.fs.FileSystem.from_uri accepts, such as s3://bucket/prefix, gs://bucket/prefix "
            "or file:///absolute/path"
        ) from None
    if not path.strip("/") and filesystem.type_name not in ("local", "mock"):
        raise ValueError(
            f"train.run_dir={shown!r} names no bucket or container; set it to "
            f"{root.split('://')[0]}://<bucket>/<prefix>"
        )
    return filesystem, path


class RunStorage:
    """A run's root directory, local or remote, addressed by '/'-separated paths relative to it.

    ``root`` is a plain path (relative paths are made absolute now, so the object means the same
    directory in a Ray actor with another working directory) or a URI with a scheme. The object
    pickles as its root string alone and rebuilds the filesystem on first use, so Ray can ship it to
    actors on other nodes; credentials then come from that node's environment (or from the URI).
    ``mock://`` is in memory and per process: a copy rebuilt after pickling starts empty.
    """

    def __init__(self, root: str | Path):
        if isinstance(root, str) and _SCHEME.match(root):
            self._root = root
        else:
            self._root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self._filesystem: pafs.FileSystem | None = None
        self._path = ""
        self._connect()  # a bad URI stops here, not at the first write

    # ---- identity -------------------------------------------------------------------------------
    def _connect(self) -> pafs.FileSystem:
        if self._filesystem is None:
            self._filesystem, self._path = _open(self._root)
        return self._filesystem

    def __getstate__(self) -> dict:
        return {"root": self._root}

    def __setstate__(self, state: dict) -> None:
        self._root = state["root"]
        self._filesystem = None
        self._path = ""

    def __repr__(self) -> str:
        return f"RunStorage({self.display()!r})"

    def __str__(self) -> str:
        return self.display()

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem, for readers such as ``pq.read_table(..., filesystem=...)``."""
        return self._connect()

    def fs_path(self, *parts: str) -> str:
        """The path of a sub-path inside :attr:`filesystem` (no scheme, no credentials)."""
        self._connect()
        return _join(self._path, _relative(parts))

    @property
    def is_local(self) -> bool:
        return self._connect().type_name == "local"

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(
                f"{self} is not on the local filesystem; read and write it through RunStorage "
                "(read_bytes, write_bytes, download_dir, upload_dir) instead of a local path"
            )
        return Path(self._path)

    def uri(self, *parts: str) -> str:
        """Where a sub-path lives, in a form ``RunStorage`` accepts again (credentials included)."""
        rel = _relative(parts)
        if not rel:
            return self._root
        match = _SCHEME.match(self._root)
        if not match:
            return os.path.join(self._root, *rel.split("/"))
        rest, question, query = self._root[match.end() :].partition("?")
        return f"{match.group(0)}{rest.rstrip('/')}/{rel}{question}{query}"

    def display(self, *parts: str) -> str:
        """:meth:`uri` with credentials replaced by ``***``: for logs and messages."""
        return redact(self.uri(*parts), _secrets_of(self._root))

    def child(self, *parts: str) -> RunStorage:
        """The storage rooted at a sub-path; it shares this one's filesystem object."""
        child = object.__new__(RunStorage)
        child._root = self.uri(*parts)
        child._filesystem = self._connect()
        child._path = self.fs_path(*parts)
        return child

    # ---- reading --------------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        return self.filesystem.get_file_info(self.fs_path(rel)).type != pafs.FileType.NotFound

    def is_complete_dir(self, rel: str) -> bool:
        """True once :meth:`upload_dir` has finished writing ``rel`` (its marker file exists)."""
        info = self.filesystem.get_file_info(self.fs_path(rel, COMPLETE_MARKER))
        return info.type == pafs.FileType.File

    def list(self, rel: str = "") -> list[str]:
        """Sorted base names directly under ``rel``; [] when it does not exist."""
        selector = pafs.FileSelector(self.fs_path(rel), allow_not_found=True, recursive=False)
        return sorted(info.base_name for info in self.filesystem.get_file_info(selector))

    def read_bytes(self, rel: str) -> bytes:
        with self.filesystem.open_input_stream(self.fs_path(rel), compression=None) as stream:
            return stream.readall()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def download_dir(self, rel: str, local_dir: str | Path) -> Path:
        """Copy the directory ``rel`` (recursively) into ``local_dir``, which is created if needed."""
        source = self.fs_path(rel)
        if self.filesystem.get_file_info(source).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"{self.display(rel)} is not a directory")
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            source,
            str(local_dir.absolute()),
            source_filesystem=self.filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        return local_dir

    # ---- writing --------------------------------------------------------------------------------
    @property
    def _renames(self) -> bool:
        return self._connect().type_name in _RENAMING_FILESYSTEMS

    def makedirs(self, rel: str = "") -> None:
        path = self.fs_path(rel)
        if path:
            self.filesystem.create_dir(path, recursive=True)

    def _put(self, path: str, data: bytes | pa.Buffer) -> None:
        filesystem = self.filesystem
        try:
            stream = filesystem.open_output_stream(path, compression=None)
        except FileNotFoundError:  # local and hierarchical filesystems need the parent directory first
            filesystem.create_dir(path.rpartition("/")[0], recursive=True)
            stream = filesystem.open_output_stream(path, compression=None)
        with stream:
            stream.write(data)

    def _remove(self, path: str) -> None:
        info = self.filesystem.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            self.filesystem.delete_dir(path)
        elif info.type != pafs.FileType.NotFound:
            self.filesystem.delete_file(path)

    def write_bytes(self, rel: str, data: bytes | pa.Buffer) -> None:
        path = self.fs_path(rel)
        if not self._renames:
            # One put is all-or-nothing on an object store: a reader gets the previous object or this
            # one (an S3 PUT or completed multipart upload, a finalised GCS upload), never a prefix.
            self._put(path, data)
            return
        staging = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self._put(staging, data)
            self.filesystem.move(staging, path)  # rename(2): atomic, replaces the old file
        except BaseException:
            self._remove(staging)
            raise

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_parquet(self, rel: str, table: pa.Table) -> None:
        """The table as one zstd-compressed Parquet file, written atomically (serialised in memory)."""
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, compression="zstd")
        self.write_bytes(rel, buffer.getvalue())

    def delete(self, rel: str) -> None:
        """Remove a file or a directory tree; nothing happens when it does not exist."""
        if not _relative((rel,)):
            raise ValueError(f"refusing to delete the run root {self}")
        self._remove(self.fs_path(rel))

    def upload_dir(self, local_dir: str | Path, rel: str) -> None:
        """Copy ``local_dir`` recursively to ``rel``, replacing whatever was there.

        :meth:`is_complete_dir` is True for ``rel`` only while a whole copy is in place. Retiring the
        old copy always deletes its marker before any of its files, so a half-deleted directory never
        looks complete either.
        With renames: upload to ``<rel>.tmp`` and write its marker, retire ``rel``, rename the staging
        directory to ``rel``. Readers see the old copy, briefly nothing, then the new one.
        On an object store a directory rename is a copy of every object, so the upload goes straight
        to ``rel``: 1. delete the old marker, 2. delete the old objects, 3. upload the new files,
        4. write the marker. A crash at any point leaves ``rel`` without a marker.
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"cannot upload {local_dir}: not a directory")
        if not _relative((rel,)):
            raise ValueError(f"refusing to replace the run root {self}")
        target = self.fs_path(rel)
        if self._renames:
            staging = f"{target}.tmp"
            self._remove(staging)  # left over from a crashed upload
            self._copy_in(local_dir, staging)
            self._retire(target)
            self.filesystem.move(staging, target)
        else:
            self._retire(target)
            self._copy_in(local_dir, target)

    def _copy_in(self, local_dir: Path, path: str) -> None:
        """Upload every file of ``local_dir`` under ``path``, then the marker that makes it complete."""
        self.filesystem.create_dir(path, recursive=True)
        pafs.copy_files(
            str(local_dir.absolute()),
            path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.filesystem,
        )
        self._put(_join(path, COMPLETE_MARKER), b"")

    def _retire(self, path: str) -> None:
        """Delete a directory, its marker first: from then on it no longer counts as complete."""
        self._remove(_join(path, COMPLETE_MARKER))
        self._remove(path)


def as_storage(location: RunStorage | str | Path) -> RunStorage:
    """``location`` as a :class:`RunStorage` (returned unchanged when it already is one)."""
    return location if isinstance(location, RunStorage) else RunStorage(location)


LOCK_FILE = "run.lock"


class RunDirectoryInUse(RuntimeError):
    """Another process holds the run directory's lock."""


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``run.lock`` inside it.

    The kernel drops the lock when its holder dies, even by SIGKILL, so a crashed run never blocks
    its own resume. Object stores have no such lock; there the caller must not start two writers.
    """

    def __init__(self, storage: RunStorage):
        self._file = None
        if not storage.is_local:
            return
        import fcntl
        import socket

        path = storage.local_path / LOCK_FILE
        handle = open(path, "a+")  # noqa: SIM115 - held open for the run's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirectoryInUse(
                f"{storage.display()} is in use by {holder}; wait for that run to end, or pass another "
                "--load-checkpoint or train.run_name"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"grpodx train (pid {os.getpid()} on {socket.gethostname()})\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
