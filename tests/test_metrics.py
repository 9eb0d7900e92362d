"""Step metrics are rates over the episodes they are about; failures are reported by kind."""

from __future__ import annotations

import math

import pyarrow as pa

from grpodx.data.trajectory import TRAJECTORY_SCHEMA
from grpodx.metrics import failure_report, rollout_metrics

PATIENT_DOWN = "conversation: ApiError: patient API call to http://127.0.0.1:9/v1 failed after 6 attempt(s)"
BAD_JUDGE = "judge: JudgeError: the judge gave no valid verdict in 3 tries: malformed JSON"


def _episode(valid: bool, error: str | None = None, **fields) -> dict:
    base = {"group_id": "g", "valid": valid, "error": error, "diagnosis": "Influenza", "turns": 2}
    base.update({"reward": 1.0, "reward_judge": 1.0, "judge_category": "exact"} if valid else {})
    return {**base, **fields}


def _table(*episodes: dict) -> pa.Table:
    return pa.Table.from_pylist(list(episodes), schema=TRAJECTORY_SCHEMA)


def test_a_step_whose_episodes_all_failed_reports_no_reward_rather_than_zero():
    table = _table(_episode(False, PATIENT_DOWN), _episode(False, PATIENT_DOWN))
    metrics = rollout_metrics(table)
    assert metrics["episodes/failed"] == 2 and metrics["episodes/failed_share"] == 1.0
    for key in ("reward/mean", "reward/accuracy", "episodes/finished", "episodes/turns"):
        assert math.isnan(metrics[key]), key
    assert failure_report(table) == (
        f"2 of 2 episodes failed, 0 scored: conversation ApiError ×2 (e.g. {PATIENT_DOWN.split(': ', 1)[1]})"
    )


def test_rates_count_only_the_scored_episodes():
    """A failed episode that had a diagnosis does not make the scored ones look more finished."""
    table = _table(
        _episode(True),
        _episode(True, diagnosis=None, reward=0.0, reward_judge=0.0, judge_category="none"),
        _episode(False, BAD_JUDGE),
    )
    metrics = rollout_metrics(table)
    assert metrics["episodes/finished"] == 0.5 and metrics["reward/accuracy"] == 0.5
    assert metrics["reward/mean"] == 0.5 and metrics["episodes/judge_failures"] == 1
    assert metrics["episodes/failed_share"] == 1 / 3
    report = failure_report(table)
    assert report.startswith("1 of 3 episodes failed, 2 scored: judge JudgeError ×1 (e.g. JudgeError:")
    assert failure_report(_table(_episode(True))) is None
