"""Parquet files of every episode in the run storage, one file per training step.

One file per step keeps a crash from corrupting earlier steps, and a resumed run simply rewrites the
steps it replays. ``pandas.read_parquet(run_dir / "trajectories")`` reads them all from a local run;
for a remote one, ``pq.read_table(storage.fs_path("trajectories"), filesystem=storage.filesystem)``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from grpodx.data.trajectory import TRAJECTORY_SCHEMA
from grpodx.storage import RunStorage, as_storage


class ParquetSink:
    def __init__(self, run_dir: RunStorage | str | Path, name: str = "trajectories"):
        self.storage = as_storage(run_dir).child(name)
        self.storage.makedirs()

    def write(self, step: int, table: pa.Table) -> str:
        """Write one step's table atomically; returns where it went (a path, or a redacted URI)."""
        if table.schema != TRAJECTORY_SCHEMA:
            raise ValueError("trajectory table does not have TRAJECTORY_SCHEMA")
        name = f"step-{step:06d}.parquet"
        self.storage.write_parquet(name, table)
        return self.storage.display(name)
