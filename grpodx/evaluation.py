"""Evaluation on held-out cases: the figures ``grpodx eval`` prints and a training run reports."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyarrow as pa

from grpodx.medical.bayes import ASSESSMENT_FIELDS

# What a summary reads of an episode record (grpodx.data.trajectory.TRAJECTORY_SCHEMA): training and
# evaluation episodes are the same record, summarised by the same definitions below.
SUMMARY_COLUMNS = [
    "case_id",
    "valid",
    "reward",
    "reward_judge",
    "judge_category",
    "turns",
    "diagnosis",
    "reasoning_leaks",
    *ASSESSMENT_FIELDS,
]
Episodes = pa.Table | pa.RecordBatch | Sequence[dict]
# The keys of interview_summary (empty when no episode was assessed).
INTERVIEW_KEYS = (
    "questions",
    "information_gain",
    "information_per_question",
    "evidence_right",
    "follows_evidence",
)


def is_correct(episode: dict) -> bool:
    """The judge found the hidden condition (or a synonym, or its ICD-10-CM code)."""
    return episode["judge_category"] == "exact"


def leaked(episode: dict) -> bool:
    """A turn's reasoning markup was malformed: unguarded, its reasoning would have reached the patient."""
    return bool(episode["reasoning_leaks"])


def episode_rows(episodes: Episodes) -> list[dict]:
    """Episode records as dicts of :data:`SUMMARY_COLUMNS` (a table's token columns are left out)."""
    if isinstance(episodes, pa.RecordBatch):
        episodes = pa.Table.from_batches([episodes])
    if isinstance(episodes, pa.Table):
        return episodes.select(SUMMARY_COLUMNS).to_pylist()
    return list(episodes)


def summarize(episodes: Episodes, num_conditions: int | None = None) -> dict[str, float]:
    """Shares and means over valid episodes; failed ones (patient/judge errors) are counted apart."""
    episodes = episode_rows(episodes)
    valid = [e for e in episodes if e["valid"]]
    n = len(valid)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    rewards = [e["reward"] for e in valid]
    summary = {
        "episodes": float(len(episodes)),
        "failed": float(len(episodes) - n),
        "accuracy": mean([float(is_correct(e)) for e in valid]),
        "mean_reward": mean(rewards),
        # Standard error of the mean reward, to judge whether two evaluations really differ.
        "reward_stderr": _stderr(rewards),
        "partial_credit": mean([e["reward_judge"] for e in valid]),
        "mean_turns": mean([float(e["turns"]) for e in valid]),
        "finished": mean([float(e["diagnosis"] is not None) for e in valid]),
        "leaked": mean([float(leaked(e)) for e in valid]),
        **interview_summary(valid),
    }
    if num_conditions:
        summary["random_guess_accuracy"] = 1.0 / num_conditions
    return summary


def interview_summary(episodes: Sequence[dict]) -> dict[str, float]:
    """How well the doctor asked and concluded, by the exact posterior (:mod:`grpodx.medical.bayes`).

    ``information_gain``: nats of expected information its questions gathered per episode;
    ``information_per_question``: the same per question (pooled); ``evidence_right``: share of
    episodes whose answers point to the hidden condition; ``follows_evidence``: share of diagnoses
    that name the condition the doctor's own answers point to.
    """
    assessed = [e for e in episodes if e.get("questions") is not None]
    if not assessed:
        return {}
    questions = sum(e["questions"] for e in assessed)
    gain = sum(e["information_gain"] for e in assessed)
    concluded = [e for e in assessed if e.get("diagnosis") is not None]
    return {
        "questions": questions / len(assessed),
        "information_gain": gain / len(assessed),
        "information_per_question": gain / questions if questions else float("nan"),
        "evidence_right": sum(bool(e["evidence_right"]) for e in assessed) / len(assessed),
        "follows_evidence": (
            sum(bool(e["follows_evidence"]) for e in concluded) / len(concluded)
            if concluded
            else float("nan")
        ),
    }


def paired_difference(after: Episodes, before: Episodes) -> dict[str, float]:
    """Per-case differences between two evaluations of the same cases with the same sampling seeds.

    Pairing removes the spread between cases from the comparison: on the tiny doctor one 300-case
    evaluation has a standard error of about 0.028, while the paired difference of two close doctors
    on 1,000 cases is known to about 0.013. Cases where either episode failed are left out.
    """
    first = {e["case_id"]: e for e in episode_rows(before) if e["valid"]}
    pairs = [(e, first[e["case_id"]]) for e in episode_rows(after) if e["valid"] and e["case_id"] in first]
    reward = [a["reward"] - b["reward"] for a, b in pairs]
    accuracy = [float(is_correct(a)) - float(is_correct(b)) for a, b in pairs]
    return {
        "cases": float(len(pairs)),
        "reward_diff": sum(reward) / len(reward) if reward else float("nan"),
        "reward_diff_stderr": _stderr(reward),
        "accuracy_diff": sum(accuracy) / len(accuracy) if accuracy else float("nan"),
        "better": float(sum(d > 0 for d in reward)),
        "worse": float(sum(d < 0 for d in reward)),
    }


def format_paired(paired: dict[str, float], title: str = "paired difference") -> str:
    return (
        f"{title} on {int(paired['cases'])} cases (same cases and seeds):\n"
        f"  mean reward       {paired['reward_diff']:+.3f} ± {paired['reward_diff_stderr']:.3f}\n"
        f"  accuracy          {paired['accuracy_diff']:+.3f}\n"
        f"  cases better / worse  {int(paired['better'])} / {int(paired['worse'])}"
    )


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
    if "questions" in summary:
        lines.append(
            f"  questions         {summary['questions']:.2f} "
            f"({summary['information_per_question']:.3f} nats each, {summary['information_gain']:.3f} in all)"
        )
        lines.append(f"  evidence right    {summary['evidence_right']:.3f}  (answers point to the condition)")
        lines.append(f"  follows evidence  {summary['follows_evidence']:.3f}  (names what answers point to)")
    return "\n".join(lines)
