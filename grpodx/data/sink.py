"""Parquet files of every episode in the run storage, one file per training step.

One file per step keeps a crash from corrupting earlier steps, and a resumed run simply rewrites the
steps it replays. ``pandas.read_parquet(run_dir / "trajectories")`` reads them all from a local run;
for a remote one, ``pq.read_table(storage.fs_path("trajectories"), filesystem=storage.filesystem)``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from grpodx.data.trajectory import TRAJECTORY_SCHEMA
from grpodx.metrics import failure_report, rollout_metrics, staleness_metrics
from grpodx.staleness import StalenessGate
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


class StepEpisodes:
    """The episodes of the steps being trained, kept where they are trained (the learner): the driver
    only passes references to them. At the end of a step they are written to Parquet, sorted by group
    (ticket order), and summarised into the step's rollout, staleness and failure figures."""

    def __init__(self, gate: StalenessGate):
        self._gate = gate
        self._accumulating: list[pa.RecordBatch] = []
        self._trained: list[pa.RecordBatch] = []

    def add(self, batch: pa.RecordBatch) -> None:
        self._accumulating.append(batch)

    def on_step(self) -> None:
        """The learner stepped: what was accumulated is now the trained batch; the next one starts."""
        self._trained, self._accumulating = self._accumulating, []

    def close(self, run_dir: RunStorage | None, step: int) -> tuple[dict[str, float], str | None]:
        """Write step ``step``'s episodes (to ``run_dir``, unless None) and return its metrics and its
        failure report (:func:`grpodx.metrics.failure_report`)."""
        table = pa.Table.from_batches(self._trained, schema=TRAJECTORY_SCHEMA)
        table = table.take(pc.sort_indices(table, [("group_id", "ascending")]))  # a stable sort
        self._trained = []
        if run_dir is not None:
            ParquetSink(run_dir).write(step, table)
        metrics = {**rollout_metrics(table), **staleness_metrics(table, self._gate, batch=step - 1)}
        return metrics, failure_report(table)
