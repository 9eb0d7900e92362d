"""Evaluation on held-out cases: the figures ``grpodx eval`` prints and a training run reports."""

from __future__ import annotations

import math
from collections.abc import Sequence


def summarize(episodes: Sequence[dict], num_conditions: int | None = None) -> dict[str, float]:
    """Shares and means over valid episodes; failed ones (patient/judge errors) are counted apart."""
    valid = [e for e in episodes if e["valid"]]
    n = len(valid)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    rewards = [e["reward"] for e in valid]
    summary = {
        "episodes": float(len(episodes)),
        "failed": float(len(episodes) - n),
        "accuracy": mean([float(e["correct"]) for e in valid]),
        "mean_reward": mean(rewards),
        # Standard error of the mean reward, to judge whether two evaluations really differ.
        "reward_stderr": _stderr(rewards),
        "partial_credit": mean([e["judge_score"] for e in valid]),
        "mean_turns": mean([float(e["turns"]) for e in valid]),
        "finished": mean([float(e["finished"]) for e in valid]),
        "leaked": mean([float(e["leaked"]) for e in valid]),
    }
    if num_conditions:
        summary["random_guess_accuracy"] = 1.0 / num_conditions
    return summary


def _stderr(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(variance / len(values))


def format_summary(summary: dict[str, float], title: str = "evaluation") -> str:
    lines = [f"{title}: {int(summary['episodes'])} held-out cases ({int(summary['failed'])} failed)"]
    lines.append(f"  accuracy          {summary['accuracy']:.3f}")
    if "random_guess_accuracy" in summary:
        lines.append(f"  random guess      {summary['random_guess_accuracy']:.3f}")
    lines.append(f"  mean reward       {summary['mean_reward']:.3f} ± {summary['reward_stderr']:.3f}")
    lines.append(f"  partial credit    {summary['partial_credit']:.3f}")
    lines.append(f"  mean turns        {summary['mean_turns']:.2f}")
    lines.append(f"  final diagnosis   {summary['finished']:.3f}")
    lines.append(f"  reasoning leaked  {summary['leaked']:.3f}")
    return "\n".join(lines)
