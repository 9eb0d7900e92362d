"""RunStorage on the local filesystem and on Arrow's in-memory ``mock://`` filesystem (standing for an
object store), and the ParquetSink and MetricsLogger written through it."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from grpodx.data.sink import ParquetSink
from grpodx.data.trajectory import TRAJECTORY_SCHEMA
from grpodx.metrics import MetricsLogger
from grpodx.storage import COMPLETE_MARKER, RunStorage, as_storage

CREDENTIAL_URI = "s3://AKIAEXAMPLE:s3cr3t%2Fvalue@bucket/runs?region=us-east-1"


@pytest.fixture(params=["local", "mock"])
def storage(request, tmp_path) -> RunStorage:
    if request.param == "local":
        return RunStorage(tmp_path / "run")
    return RunStorage("mock:///bucket/run")


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _trajectories(rewards: list[float]) -> pa.Table:
    rows = [
        {"step": 1, "group_id": "g0", "sample_index": i, "reward": r, "token_ids": [1, 2, i], "valid": True}
        for i, r in enumerate(rewards)
    ]
    return pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA)


# ---- where the root is ---------------------------------------------------------------------------
def test_relative_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = RunStorage("runs/a")
    assert storage.is_local and storage.local_path == tmp_path / "runs" / "a"
    storage.write_text("x/y.txt", "hello")
    assert (tmp_path / "runs" / "a" / "x" / "y.txt").read_text() == "hello"
    assert storage.uri("x", "y.txt") == str(tmp_path / "runs" / "a" / "x" / "y.txt")


def test_file_uri_is_local(tmp_path):
    storage = RunStorage(f"file://{tmp_path}/run")
    assert storage.is_local and storage.local_path == tmp_path / "run"
    storage.write_text("checkpoints/a.json", "{}")
    assert (tmp_path / "run" / "checkpoints" / "a.json").read_text() == "{}"
    assert storage.uri("checkpoints") == f"file://{tmp_path}/run/checkpoints"
    assert RunStorage(storage.uri("checkpoints")).list() == ["a.json"]
    assert storage.child("checkpoints").read_text("a.json") == "{}"


def test_mock_is_not_local():
    storage = RunStorage("mock:///bucket/run")
    assert not storage.is_local and storage.filesystem.type_name == "mock"
    with pytest.raises(ValueError, match="not on the local filesystem"):
        _ = storage.local_path
    assert storage.uri("a", "b") == "mock:///bucket/run/a/b"
    assert storage.fs_path("a", "b") == "bucket/run/a/b"


def test_paths_cannot_escape_the_root(storage):
    with pytest.raises(ValueError, match="inside the run root"):
        storage.write_text("../outside.txt", "x")
    with pytest.raises(ValueError, match="run root"):
        storage.delete("")


# ---- files ---------------------------------------------------------------------------------------
def test_files_round_trip(storage):
    assert storage.list() == [] and not storage.exists("a")
    storage.write_bytes("a/b/c.bin", b"\x00\x01")
    storage.write_text("a/note.txt", "héllo")
    storage.write_text("top.txt", "1")
    assert storage.read_bytes("a/b/c.bin") == b"\x00\x01"
    assert storage.read_text("a/note.txt") == "héllo"
    assert storage.list() == ["a", "top.txt"]
    assert storage.list("a") == ["b", "note.txt"]
    assert storage.list("missing") == []
    storage.write_text("top.txt", "2")  # overwrite
    assert storage.read_text("top.txt") == "2"
    assert storage.list() == ["a", "top.txt"]  # no staging file left behind
    storage.delete("a")
    storage.delete("missing/file")  # no error
    assert storage.list() == ["top.txt"] and not storage.exists("a/b/c.bin")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("a/b/c.bin")


def test_child_shares_the_filesystem(storage):
    child = storage.child("trajectories")
    child.write_text("x.txt", "x")  # mock:// is one in-memory filesystem per object: must be shared
    assert storage.read_text("trajectories/x.txt") == "x"
    assert child.display() == storage.display("trajectories")


def test_failed_local_write_keeps_the_old_file(tmp_path):
    storage = RunStorage(tmp_path)
    storage.write_text("state.json", "old")
    with pytest.raises(TypeError):
        storage.write_bytes("state.json", object())  # fails after the staging file was opened
    assert storage.read_text("state.json") == "old"
    assert storage.list() == ["state.json"]


def test_parquet_is_zstd_and_readable(storage):
    table = _trajectories([0.0, 1.0])
    storage.write_parquet("t/step.parquet", table)
    with storage.filesystem.open_input_file(storage.fs_path("t/step.parquet")) as handle:
        parquet = pq.ParquetFile(handle)
        assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
        assert parquet.read().equals(table)


# ---- directories (checkpoints) -------------------------------------------------------------------
def test_upload_download_round_trip(storage, tmp_path):
    files = {"adapter/weights.bin": b"w" * 1000, "adapter/nested/config.json": b"{}", "state.pt": b"s"}
    source = _tree(tmp_path / "source", files)
    storage.upload_dir(source, "checkpoints/step-000001")
    assert storage.is_complete_dir("checkpoints/step-000001")
    assert storage.list("checkpoints") == ["step-000001"]
    assert storage.list("checkpoints/step-000001") == [COMPLETE_MARKER, "adapter", "state.pt"]
    target = storage.download_dir("checkpoints/step-000001", tmp_path / "downloaded")
    assert _files(target) == {**files, COMPLETE_MARKER: b""}
    with pytest.raises(FileNotFoundError):
        storage.download_dir("checkpoints/missing", tmp_path / "nothing")


def test_upload_replaces_the_old_directory(storage, tmp_path):
    storage.upload_dir(_tree(tmp_path / "a", {"old.bin": b"1", "kept/x": b"old"}), "ck")
    storage.upload_dir(_tree(tmp_path / "b", {"new.bin": b"2", "kept/x": b"new"}), "ck")
    assert storage.list() == ["ck"]  # no ck.tmp left behind
    assert storage.list("ck") == [COMPLETE_MARKER, "kept", "new.bin"]
    assert storage.read_bytes("ck/kept/x") == b"new" and storage.is_complete_dir("ck")


def test_interrupted_upload_is_never_complete(storage, tmp_path, monkeypatch):
    storage.upload_dir(_tree(tmp_path / "a", {"old.bin": b"1"}), "ck")
    seen_while_copying = []

    def crash(*args, **kwargs):
        seen_while_copying.append(storage.is_complete_dir("ck"))
        raise OSError("connection lost")

    monkeypatch.setattr(pafs, "copy_files", crash)
    with pytest.raises(OSError, match="connection lost"):
        storage.upload_dir(_tree(tmp_path / "b", {"new.bin": b"2"}), "ck")
    if storage.is_local:
        # The staging directory was being written; the old checkpoint stayed whole and complete.
        assert seen_while_copying == [True] and storage.is_complete_dir("ck")
        assert storage.list("ck") == [COMPLETE_MARKER, "old.bin"]
    else:
        # The marker went first, so neither the old nor the half-written copy counts as complete.
        assert seen_while_copying == [False] and not storage.is_complete_dir("ck")


def test_interrupted_delete_of_the_old_copy_is_never_complete(storage, tmp_path, monkeypatch):
    storage.upload_dir(_tree(tmp_path / "a", {"old.bin": b"1"}), "ck")
    remove = storage._remove

    def crash_on_directory(path):
        if path == storage.fs_path("ck"):
            raise OSError("connection lost")
        remove(path)

    monkeypatch.setattr(storage, "_remove", crash_on_directory)
    with pytest.raises(OSError, match="connection lost"):
        storage.upload_dir(_tree(tmp_path / "b", {"new.bin": b"2"}), "ck")
    assert not storage.is_complete_dir("ck")  # the marker is deleted before the files it vouches for


# ---- pickling, credentials and errors ------------------------------------------------------------
def test_pickle_keeps_only_the_root(tmp_path):
    storage = RunStorage(tmp_path).child("run")
    storage.write_text("a.txt", "a")
    state = storage.__getstate__()
    assert state == {"root": str(tmp_path / "run")}
    copy = pickle.loads(pickle.dumps(storage))
    assert copy._filesystem is None  # rebuilt lazily, on first use
    assert copy.read_text("a.txt") == "a" and copy.is_local

    remote = pickle.loads(pickle.dumps(RunStorage("mock:///bucket/run").child("x")))
    assert remote.uri() == "mock:///bucket/run/x" and not remote.is_local
    assert remote.fs_path() == "bucket/run/x"


def test_credentials_are_redacted():
    storage = RunStorage(CREDENTIAL_URI)
    assert storage.filesystem.type_name == "s3"
    shown = [repr(storage), str(storage), storage.display("x"), repr(storage.child("ck"))]
    for text in shown:
        assert "AKIAEXAMPLE" not in text and "s3cr3t" not in text, text
        assert "***@bucket/runs" in text
    assert storage.display("x") == "s3://***@bucket/runs/x?region=us-east-1"
    # The real location keeps them: a Ray actor rebuilds the filesystem from it.
    assert storage.uri("x") == "s3://AKIAEXAMPLE:s3cr3t%2Fvalue@bucket/runs/x?region=us-east-1"
    assert pickle.loads(pickle.dumps(storage)).fs_path("x") == "bucket/runs/x"


@pytest.mark.parametrize(
    "uri, secret",
    [
        ("foo://KEY:SECRET@bucket/x", "SECRET"),
        ("s3://bucket/x?region=us-east-1&session_token=tok123", "tok123"),
    ],
)
def test_bad_uri_error_names_the_setting_without_secrets(uri, secret):
    with pytest.raises(ValueError) as raised:
        RunStorage(uri)
    message = str(raised.value)
    assert "train.run_dir" in message and secret not in message and "***" in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


@pytest.mark.parametrize(
    "uri, hint", [("s3://", "names no bucket"), ("file://relative/x", "cannot be opened")]
)
def test_incomplete_uris_are_refused(uri, hint):
    with pytest.raises(ValueError, match=hint):
        RunStorage(uri)


def test_as_storage_passes_storage_through(tmp_path):
    storage = RunStorage(tmp_path)
    assert as_storage(storage) is storage
    assert as_storage(str(tmp_path)).local_path == tmp_path


# ---- ParquetSink ----------------------------------------------------------------------------------
def test_parquet_sink_local_path_still_works(tmp_path):
    sink = ParquetSink(tmp_path)  # the existing callers pass a run directory
    assert (tmp_path / "trajectories").is_dir()
    location = sink.write(1, _trajectories([0.0, 1.0]))
    sink.write(2, _trajectories([0.5]))
    assert location == str(tmp_path / "trajectories" / "step-000001.parquet")
    frame = pd.read_parquet(tmp_path / "trajectories")
    assert sorted(frame["reward"].tolist()) == [0.0, 0.5, 1.0]
    assert pq.read_table(tmp_path / "trajectories" / "step-000002.parquet").schema == TRAJECTORY_SCHEMA
    assert sorted(p.name for p in (tmp_path / "trajectories").iterdir()) == [
        "step-000001.parquet",
        "step-000002.parquet",
    ]
    with pytest.raises(ValueError, match="TRAJECTORY_SCHEMA"):
        sink.write(3, pa.table({"reward": [1.0]}))


def test_parquet_sink_remote():
    storage = RunStorage("mock:///bucket/run")
    sink = ParquetSink(storage)
    assert sink.write(7, _trajectories([0.25, 0.75])) == "mock:///bucket/run/trajectories/step-000007.parquet"
    assert storage.list("trajectories") == ["step-000007.parquet"]
    table = pq.read_table(storage.fs_path("trajectories"), filesystem=storage.filesystem)
    assert table.column("reward").to_pylist() == [0.25, 0.75]
    frame = pd.read_parquet(storage.fs_path("trajectories"), filesystem=storage.filesystem)
    assert frame["sample_index"].tolist() == [0, 1]


# ---- MetricsLogger --------------------------------------------------------------------------------
def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_metrics_logger_local_writes_in_place(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"reward/mean": 0.5, "x": math.nan})
    logger.sync()
    assert _lines((tmp_path / "metrics.jsonl").read_text()) == [{"step": 1, "reward/mean": 0.5, "x": None}]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    logger.close()
    logger.close()  # idempotent
    again = MetricsLogger(str(tmp_path))
    again.log(2, {"reward/mean": 0.75})
    again.close()
    assert [line["step"] for line in _lines((tmp_path / "metrics.jsonl").read_text())] == [1, 2]


def test_metrics_logger_remote_uploads_on_sync_and_close(monkeypatch):
    storage = RunStorage("mock:///bucket/run")
    logger = MetricsLogger(storage)
    mirror = Path(logger._mirror.name)
    assert logger.path == mirror / "metrics.jsonl"
    logger.log(1, {"reward/mean": 0.5})
    assert storage.list() == []  # nothing leaves the node before sync()
    logger.sync()
    assert _lines(storage.read_text("metrics.jsonl")) == [{"step": 1, "reward/mean": 0.5}]
    events = storage.list("tensorboard")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents.")
    assert storage.read_bytes(f"tensorboard/{events[0]}") == (mirror / "tensorboard" / events[0]).read_bytes()

    uploads = []
    original = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda rel, data: (uploads.append(rel), original(rel, data)))
    logger.sync()
    assert uploads == []  # nothing changed since the last sync
    logger.log(2, {"reward/mean": 0.75})
    logger.close()
    assert sorted(uploads) == ["metrics.jsonl", f"tensorboard/{events[0]}"]
    assert [line["step"] for line in _lines(storage.read_text("metrics.jsonl"))] == [1, 2]
    assert not mirror.exists()  # the mirror is removed on close

    resumed = MetricsLogger(storage)  # a resumed run appends to the uploaded file
    resumed.log(3, {"reward/mean": 1.0})
    resumed.close()
    assert [line["step"] for line in _lines(storage.read_text("metrics.jsonl"))] == [1, 2, 3]
    assert len(storage.list("tensorboard")) == 2
