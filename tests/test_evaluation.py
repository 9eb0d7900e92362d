"""Held-out evaluation figures: the summary and the paired difference of two doctors."""

from __future__ import annotations

import math

import pytest

from grpodx.evaluation import format_paired, paired_difference, summarize


def _episode(case_id: str, reward: float, correct: bool = False, valid: bool = True) -> dict:
    """An episode record (the columns of TRAJECTORY_SCHEMA that a summary reads)."""
    return {
        "case_id": case_id,
        "reward": reward,
        "judge_category": "exact" if correct else "wrong",
        "reward_judge": reward,
        "turns": 3,
        "diagnosis": "Influenza",
        "reasoning_leaks": 0,
        "valid": valid,
    }


def test_paired_difference_by_hand_matches_cases_not_positions():
    before = [_episode("a", 0.0), _episode("b", 1.0, True), _episode("c", 0.5), _episode("d", 0.2)]
    # Another order, one failed episode on each side, one case only the later run has.
    after = [
        _episode("c", 1.0, True),
        _episode("a", 1.0, True),
        _episode("b", 0.0),
        _episode("d", 1.0, valid=False),
        _episode("e", 1.0, True),
    ]
    paired = paired_difference(after, before)
    # Pairs: a (+1), b (-1), c (+0.5); d failed after, e has no partner.
    assert paired["cases"] == 3
    assert paired["reward_diff"] == pytest.approx(0.5 / 3)
    deviations = [1 - 0.5 / 3, -1 - 0.5 / 3, 0.5 - 0.5 / 3]
    stderr = math.sqrt(sum(d * d for d in deviations) / 2 / 3)
    assert paired["reward_diff_stderr"] == pytest.approx(stderr)
    assert paired["accuracy_diff"] == pytest.approx((1 - 1 + 1) / 3)
    assert (paired["better"], paired["worse"]) == (2, 1)
    text = format_paired(paired, "after minus before")
    assert "+0.167 ± " in text and "3 cases" in text and "2 / 1" in text


def test_paired_difference_is_tighter_than_the_difference_of_summaries():
    """Pairing cancels what the cases share: here every case moves by +0.1 exactly."""
    before = [_episode(str(i), (i % 10) / 10) for i in range(50)]
    after = [_episode(str(i), (i % 10) / 10 + 0.1) for i in range(50)]
    paired = paired_difference(after, before)
    assert paired["reward_diff"] == pytest.approx(0.1)
    assert paired["reward_diff_stderr"] == pytest.approx(0.0, abs=1e-12)
    assert summarize(before)["reward_stderr"] > 0.03


def test_paired_difference_without_common_cases():
    paired = paired_difference([_episode("a", 1.0)], [_episode("b", 0.0)])
    assert paired["cases"] == 0 and math.isnan(paired["reward_diff"])


def test_interview_summary_pools_information_per_question():
    from grpodx.evaluation import interview_summary

    keys = ("questions", "information_gain", "evidence_right", "follows_evidence", "diagnosis")
    episodes = [
        dict(zip(keys, (2, 1.0, True, True, "A"), strict=True)),
        dict(zip(keys, (0, 0.0, False, False, None), strict=True)),
        dict(zip(keys, (1, 0.5, True, False, "B"), strict=True)),
        dict.fromkeys(keys),  # a failed episode: not assessed
    ]
    summary = interview_summary(episodes)
    assert summary["questions"] == 1.0 and summary["information_gain"] == 0.5
    assert summary["information_per_question"] == 0.5  # 1.5 nats over 3 questions, not a mean of means
    assert summary["evidence_right"] == 2 / 3
    assert summary["follows_evidence"] == 0.5  # of the two episodes that concluded


def test_within_group_correlation_by_hand():
    from grpodx.metrics import within_group_correlation

    rows = [
        *({"group_id": "a", "x": x, "y": 2 * x + 1} for x in (0.0, 1.0, 2.0)),  # +1
        *({"group_id": "b", "x": x, "y": -x} for x in (0.0, 3.0)),  # -1
        *({"group_id": "c", "x": 1.0, "y": y} for y in (0.0, 1.0)),  # x constant: left out
        {"group_id": "d", "x": 5.0, "y": 1.0},  # a single episode: left out
    ]
    assert within_group_correlation(rows, "x", "y") == pytest.approx(0.0)
    rows[3]["y"], rows[4]["y"] = 0.0, 1.0  # group b now rises too
    assert within_group_correlation(rows, "x", "y") == pytest.approx(1.0)
    assert math.isnan(within_group_correlation(rows[5:], "x", "y"))
