"""Per-step metrics: computed from the trajectory table, written to JSONL and TensorBoard."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from grpodx.evaluation import INTERVIEW_KEYS, summarize
from grpodx.staleness import StalenessGate
from grpodx.storage import RunStorage, as_storage

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def rollout_metrics(table: pa.Table) -> dict[str, float]:
    """What the doctor did this step, from the same table the learner trained on."""
    n = table.num_rows
    if n == 0:
        return {"episodes/total": 0.0}
    valid = table.filter(pc.field("valid"))
    # Rates are over the scored episodes, by the same definitions as a held-out evaluation; with none
    # scored they are NaN, where 0.0 would read as a doctor that scored nothing.
    summary = summarize(table)

    def mean(column: str, source: pa.Table = valid) -> float:
        values = source.column(column)
        return (
            float(pc.mean(pc.cast(values, pa.float64())).as_py() or 0.0) if source.num_rows else float("nan")
        )

    errors = [e for e in table.column("error").to_pylist() if e]
    metrics = {
        "episodes/total": float(n),
        "episodes/failed": float(n - valid.num_rows),
        "episodes/failed_share": (n - valid.num_rows) / n,
        "episodes/judge_failures": float(sum(e.startswith("judge:") for e in errors)),
        "episodes/conversation_failures": float(sum(e.startswith("conversation:") for e in errors)),
        "reward/mean": summary["mean_reward"],
        "reward/accuracy": summary["accuracy"],
        "reward/partial_credit": summary["partial_credit"],
        "reward/guideline": mean("reward_guideline"),
        "reward/hedged": mean("hedged"),
        "episodes/turns": summary["mean_turns"],
        "episodes/finished": summary["finished"],
        "episodes/format_errors": mean("format_errors"),
        "episodes/reasoning_leaks": summary["leaked"],
        "episodes/truncated": mean("truncated"),
        "tokens/total": float(pc.sum(table.column("num_tokens")).as_py() or 0),
        "tokens/doctor": float(pc.sum(table.column("num_doctor_tokens")).as_py() or 0),
        "time/generation_per_episode": mean("generation_s", table),
        "time/patient_per_episode": mean("patient_s", table),
        "time/judge_per_episode": mean("judge_s", table),
    }
    metrics.update({f"interview/{key}": summary[key] for key in INTERVIEW_KEYS if key in summary})
    if valid.num_rows:
        rows = valid.select(["group_id", "information_gain", "reward"]).to_pylist()
        metrics["interview/information_reward_correlation"] = within_group_correlation(
            rows, "information_gain", "reward"
        )
    return metrics


def staleness_metrics(table: pa.Table, gate: StalenessGate, batch: int) -> dict[str, float]:
    """How many versions behind the training adapter each episode of ``batch`` started, and its turns
    sampled (a turn may run on a newer adapter than its episode's first)."""
    starts = [gate.staleness(batch, v) for v in table.column("policy_version").to_pylist()]
    turns = [
        gate.staleness(batch, v) for versions in table.column("turn_versions").to_pylist() for v in versions
    ]
    if not starts:
        return {}
    metrics = {
        "staleness/mean": sum(starts) / len(starts),
        "staleness/max": float(max(starts)),
        "staleness/turn_mean": sum(turns) / len(turns) if turns else 0.0,
    }
    for lag in range(gate.max_staleness + 1):
        metrics[f"staleness/share_{lag}"] = sum(s == lag for s in starts) / len(starts)
    return metrics


class StepTimer:
    """Wall time of each step and the idle shares of the learner and of the generators."""

    def __init__(self, started: float, busy: dict[str, float]):
        self._mark = (started, busy)  # (time, each worker's busy seconds) at the end of the last step

    def lap(self, now: float, busy: dict[str, float], learner_seconds: float, push_seconds: float) -> dict:
        """``busy``: each worker's seconds with an episode in flight so far; workers that joined during
        the step are left out of the generators' idle share."""
        then, busy_before = self._mark
        self._mark = (now, busy)
        wall = max(1e-9, now - then)
        deltas = [busy[w] - busy_before[w] for w in busy if w in busy_before]
        generator_idle = 1.0 - sum(deltas) / (wall * len(deltas)) if deltas else float("nan")
        return {
            "time/step": wall,
            "time/learner": learner_seconds,
            "time/weight_push": push_seconds,
            "time/learner_idle_share": max(0.0, 1.0 - learner_seconds / wall),
            "time/generator_idle_share": max(0.0, generator_idle),
        }


def failure_report(table: pa.Table) -> str | None:
    """One line on the step's failed episodes by kind, with one message of each; None when none failed.

    An episode's error reads "<where>: <exception type>: <message>" (see grpodx.env.episode).
    """
    errors = [e for e in table.column("error").to_pylist() if e]
    if not errors:
        return None
    kinds: dict[str, list[str]] = {}
    for error in errors:
        where, _, rest = error.partition(": ")
        exception, _, _ = rest.partition(": ")
        kinds.setdefault(f"{where} {exception}".strip(), []).append(rest)
    parts = [f"{kind} ×{len(messages)} (e.g. {messages[0]})" for kind, messages in kinds.items()]
    trained = table.num_rows - len(errors)
    return f"{len(errors)} of {table.num_rows} episodes failed, {trained} scored: " + "; ".join(parts)


def within_group_correlation(rows: list[dict], x: str, y: str) -> float:
    """Mean over groups of the Pearson correlation of ``x`` and ``y`` between a group's episodes.

    Within a group the case is fixed, so this asks whether, for the same patient, the episodes that
    gathered more information scored more: the condition for GRPO to reward better questions. Groups
    where either quantity does not vary are left out; NaN when none is left.
    """
    groups: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row[x] is not None and row[y] is not None:
            groups.setdefault(row["group_id"], []).append((float(row[x]), float(row[y])))
    correlations = []
    for pairs in groups.values():
        n = len(pairs)
        if n < 2:
            continue
        mean_x, mean_y = sum(p[0] for p in pairs) / n, sum(p[1] for p in pairs) / n
        cov = sum((a - mean_x) * (b - mean_y) for a, b in pairs)
        var_x, var_y = sum((a - mean_x) ** 2 for a, _ in pairs), sum((b - mean_y) ** 2 for _, b in pairs)
        if var_x > 1e-12 and var_y > 1e-12:
            correlations.append(cov / math.sqrt(var_x * var_y))
    return sum(correlations) / len(correlations) if correlations else float("nan")


def _step_of(line: str) -> float:
    """The step of a metrics line; infinity for a line that does not parse (torn by a crash)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class MetricsLogger:
    """One JSON line per step in ``metrics.jsonl`` and the same scalars as TensorBoard events.

    Both formats append to a local file. On local storage they are written in place and ``sync()``
    only flushes. On any other storage they are written to a local mirror (a temporary directory)
    and ``sync()`` and ``close()`` copy what changed since the last sync to the storage:
    ``metrics.jsonl`` as one object, ``tensorboard/`` file by file. A ``metrics.jsonl`` already in
    the storage is downloaded first, so a resumed run appends to it as it does locally.
    """

    def __init__(self, run_dir: RunStorage | str | Path, resumed_at: int | None = None):
        """``resumed_at``: the step of the checkpoint a resumed run starts from. Lines of later steps
        (logged by the first run after that checkpoint, before it died) are dropped, as is a line cut
        short by the crash: the resumed run logs those steps again, once."""
        from torch.utils.tensorboard import SummaryWriter

        self.storage = as_storage(run_dir)
        remote = not self.storage.is_local
        self._mirror = tempfile.TemporaryDirectory(prefix="grpodx-metrics-") if remote else None
        local_dir = self.storage.local_path if self._mirror is None else Path(self._mirror.name)
        self.path = local_dir / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._mirror is not None and self.storage.exists(METRICS_FILE):
            self.path.write_bytes(self.storage.read_bytes(METRICS_FILE))
        if resumed_at is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resumed_at]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
        self._tb = SummaryWriter(log_dir=str(local_dir / TENSORBOARD_DIR))
        self._synced: dict[str, tuple[int, int]] = {}  # mirror file -> (size, mtime_ns) last uploaded
        self._closed = False

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        for key, value in metrics.items():
            if isinstance(value, int | float) and not math.isnan(value):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def sync(self) -> None:
        """Flush, and on remote storage upload every mirror file that changed since the last sync."""
        if not self._closed:
            self._file.flush()
            self._tb.flush()
        if self._mirror is None:
            return
        mirror = Path(self._mirror.name)
        for path in sorted(p for p in mirror.rglob("*") if p.is_file()):
            rel = path.relative_to(mirror).as_posix()
            stat = path.stat()
            signature = (stat.st_size, stat.st_mtime_ns)
            if self._synced.get(rel) != signature:
                self.storage.write_bytes(rel, path.read_bytes())
                self._synced[rel] = signature

    def close(self) -> None:
        if self._closed:
            return
        self._file.close()
        self._tb.close()
        self._closed = True
        self.sync()
        if self._mirror is not None:
            self._mirror.cleanup()
