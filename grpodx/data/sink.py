"""Parquet files of every episode in the run directory, one file per training step.

One file per step keeps a crash from corrupting earlier steps, and a resumed run simply rewrites the
steps it replays. ``pandas.read_parquet(run_dir / "trajectories")`` reads them all.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from grpodx.data.trajectory import TRAJECTORY_SCHEMA


class ParquetSink:
    def __init__(self, run_dir: str | Path, name: str = "trajectories"):
        self.directory = Path(run_dir) / name
        self.directory.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, table: pa.Table) -> Path:
        if table.schema != TRAJECTORY_SCHEMA:
            raise ValueError("trajectory table does not have TRAJECTORY_SCHEMA")
        path = self.directory / f"step-{step:06d}.parquet"
        staging = path.with_suffix(".parquet.tmp")
        pq.write_table(table, staging, compression="zstd")
        staging.replace(path)
        return path
