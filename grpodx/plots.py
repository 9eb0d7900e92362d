"""The learning curve of a run, as one PNG a person can look at (matplotlib, no display needed).

Three panels over the training steps: the training reward and accuracy (each step faint, a moving
average bold) with the held-out evaluations as points with error bars; the KL to the base model; the
doctor's turns and the information its questions gathered. Everything comes from ``metrics.jsonl``,
so the plot of a finished run can be drawn again from its directory.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Sequence

from grpodx.metrics import METRICS_FILE
from grpodx.storage import RunStorage, as_storage

LEARNING_CURVE_FILE = "learning_curve.png"
# One colour per quantity, the same in every panel.
REWARD, ACCURACY, GREEDY, KL, TURNS, INFORMATION = (
    "#1f77b4",
    "#2ca02c",
    "#9467bd",
    "#d62728",
    "#ff7f0e",
    "#7f7f7f",
)


def read_metrics(run_dir: RunStorage | str) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    text = as_storage(run_dir).read_text(METRICS_FILE)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (NaN values skipped); as long as ``values``."""
    averaged = []
    for end in range(1, len(values) + 1):
        recent = [v for v in values[max(0, end - window) : end] if not math.isnan(v)]
        averaged.append(sum(recent) / len(recent) if recent else float("nan"))
    return averaged


def _series(rows: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the training rows that carry ``key``."""
    points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    return [s for s, _ in points], [float(v) for _, v in points]


def _evaluations(rows: Sequence[dict], prefix: str) -> list[tuple[int, float, float, float]]:
    """(step, mean reward, its standard error, accuracy) of every held-out evaluation under ``prefix``."""
    found = []
    for row in rows:
        if row.get(f"{prefix}/mean_reward") is None:
            continue
        stderr = row.get(f"{prefix}/reward_stderr")
        found.append(
            (
                row["step"],
                row[f"{prefix}/mean_reward"],
                stderr if stderr is not None else 0.0,
                row.get(f"{prefix}/accuracy") or float("nan"),
            )
        )
    return found


def learning_curve_png(rows: Sequence[dict], title: str | None = None) -> bytes:
    """The learning curve of ``rows`` (``metrics.jsonl``) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # never a window: this runs at the end of training, often headless
    import matplotlib.pyplot as plt

    training = [row for row in rows if "reward/mean" in row]
    steps, reward = _series(training, "reward/mean")
    window = max(3, len(steps) // 10)
    figure, (top, middle, bottom) = plt.subplots(
        3, 1, figsize=(9, 9), sharex=True, gridspec_kw={"height_ratios": [2.2, 1, 1]}
    )
    for key, colour, label in (("reward/mean", REWARD, "reward"), ("reward/accuracy", ACCURACY, "accuracy")):
        x, y = _series(training, key)
        top.plot(x, y, color=colour, alpha=0.25, linewidth=1)
        top.plot(
            x,
            moving_average(y, window),
            color=colour,
            linewidth=2,
            label=f"training {label} ({window}-step mean)",
        )
    for prefix, colour, label in (
        ("eval", REWARD, "held-out reward"),
        ("eval_greedy", GREEDY, "held-out reward, greedy"),
    ):
        evaluations = _evaluations(rows, prefix)
        if evaluations:
            x = [e[0] for e in evaluations]
            top.errorbar(
                x,
                [e[1] for e in evaluations],
                yerr=[e[2] for e in evaluations],
                fmt="o",
                color=colour,
                markersize=7,
                capsize=4,
                markeredgecolor="black",
                label=f"{label} (± 1 s.e.)",
            )
            top.plot(
                x,
                [e[3] for e in evaluations],
                "s",
                color=colour,
                markerfacecolor="white",
                markersize=6,
                label=f"{label.replace('reward', 'accuracy')}",
            )
    top.set_ylabel("reward / accuracy")
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    top.legend(loc="lower right", fontsize=8)
    top.set_title(title or _default_title(rows), fontsize=11)

    x, kl = _series(training, "learner/kl")
    middle.plot(x, kl, color=KL, alpha=0.25, linewidth=1)
    middle.plot(x, moving_average(kl, window), color=KL, linewidth=2)
    middle.set_ylabel("KL to the base")
    middle.grid(alpha=0.3)

    x, turns = _series(training, "episodes/turns")
    bottom.plot(x, turns, color=TURNS, alpha=0.25, linewidth=1)
    bottom.plot(x, moving_average(turns, window), color=TURNS, linewidth=2, label="doctor turns")
    bottom.set_ylabel("turns per episode", color=TURNS)
    bottom.set_xlabel("training step")
    bottom.grid(alpha=0.3)
    x, information = _series(training, "interview/information_gain")
    if information:
        twin = bottom.twinx()
        twin.plot(x, moving_average(information, window), color=INFORMATION, linewidth=2, linestyle="--")
        twin.set_ylabel("information gathered (nats)", color=INFORMATION)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _default_title(rows: Sequence[dict]) -> str:
    evaluations = _evaluations(rows, "eval")
    paired = next((row for row in reversed(rows) if row.get("eval_paired/reward_diff") is not None), None)
    if len(evaluations) < 2:
        return "GRPO training"
    text = f"held-out reward {evaluations[0][1]:.3f} → {evaluations[-1][1]:.3f}"
    if paired is not None:
        diff, stderr = paired["eval_paired/reward_diff"], paired["eval_paired/reward_diff_stderr"]
        text += f" (paired {diff:+.3f} ± {stderr:.3f})"
    return "GRPO training: " + text


def write_learning_curve(run_dir: RunStorage | str) -> str:
    """Draw the run's learning curve into ``<run>/learning_curve.png``; returns where it is."""
    storage = as_storage(run_dir)
    storage.write_bytes(LEARNING_CURVE_FILE, learning_curve_png(read_metrics(storage)))
    if storage.is_local:
        return str(storage.local_path / LEARNING_CURVE_FILE)
    return storage.display(LEARNING_CURVE_FILE)
