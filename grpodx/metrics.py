"""Per-step metrics: computed from the trajectory table, written to JSONL and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc


def rollout_metrics(table: pa.Table) -> dict[str, float]:
    """What the doctor did this step, from the same table the learner trained on."""
    n = table.num_rows
    if n == 0:
        return {"episodes/total": 0.0}
    valid = table.filter(pc.field("valid"))
    v = max(1, valid.num_rows)

    def mean(column: str, source: pa.Table = valid) -> float:
        values = source.column(column)
        return float(pc.mean(pc.cast(values, pa.float64())).as_py() or 0.0) if source.num_rows else 0.0

    exact = pc.sum(pc.cast(pc.equal(valid.column("judge_category"), "exact"), pa.int64())).as_py() or 0
    finished = pc.sum(pc.cast(pc.is_valid(valid.column("diagnosis")), pa.int64())).as_py() or 0
    leaked = pc.sum(pc.cast(pc.greater(valid.column("reasoning_leaks"), 0), pa.int64())).as_py() or 0
    errors = [e for e in table.column("error").to_pylist() if e]
    return {
        "episodes/total": float(n),
        "episodes/failed": float(n - valid.num_rows),
        "episodes/judge_failures": float(sum(e.startswith("judge:") for e in errors)),
        "episodes/conversation_failures": float(sum(e.startswith("conversation:") for e in errors)),
        "reward/mean": mean("reward"),
        "reward/accuracy": exact / v,
        "reward/partial_credit": mean("reward_judge"),
        "reward/guideline": mean("reward_guideline"),
        "reward/hedged": mean("hedged"),
        "episodes/turns": mean("turns"),
        "episodes/finished": finished / v,
        "episodes/format_errors": mean("format_errors"),
        "episodes/reasoning_leaks": leaked / v,
        "episodes/truncated": mean("truncated"),
        "tokens/total": float(pc.sum(table.column("num_tokens")).as_py() or 0),
        "tokens/doctor": float(pc.sum(table.column("num_doctor_tokens")).as_py() or 0),
        "time/generation_per_episode": mean("generation_s", table),
        "time/patient_per_episode": mean("patient_s", table),
        "time/judge_per_episode": mean("judge_s", table),
    }


class MetricsLogger:
    """One JSON line per step in ``metrics.jsonl`` and the same scalars as TensorBoard events."""

    def __init__(self, run_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        for key, value in metrics.items():
            if isinstance(value, int | float) and not math.isnan(value):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        self._file.close()
        self._tb.close()
