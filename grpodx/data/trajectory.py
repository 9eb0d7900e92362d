"""The trajectory record: one Arrow row per episode, with a fixed schema.

The same record batch travels from a rollout worker to the learner (which reads the token columns) and
is appended to Parquet in the run directory (where people read the rest). Keeping one schema means
what was trained on is exactly what was logged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from grpodx.env.episode import EpisodeResult
from grpodx.medical.bayes import assessment_record

TRAJECTORY_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int32()),
        pa.field("group_id", pa.string()),
        pa.field("sample_index", pa.int32()),
        pa.field("worker_id", pa.string()),
        pa.field("policy_version", pa.int32()),  # the version the episode started on
        pa.field("turn_versions", pa.list_(pa.int32())),  # the version of each doctor turn
        pa.field("case_id", pa.string()),
        pa.field("case", pa.string()),  # the case card as JSON
        pa.field("condition", pa.string()),
        pa.field("icd10", pa.string()),
        pa.field("transcript", pa.string()),
        pa.field("transcript_visible", pa.string()),
        pa.field("diagnosis", pa.string()),
        pa.field("judge_category", pa.string()),
        pa.field("judge_rationale", pa.string()),
        pa.field("reward", pa.float32()),
        pa.field("reward_judge", pa.float32()),
        pa.field("reward_guideline", pa.float32()),
        pa.field("hedged", pa.bool_()),
        pa.field("format_errors", pa.int32()),
        pa.field("reasoning_leaks", pa.int32()),
        pa.field("turns", pa.int32()),
        # What the case generator's exact posterior makes of the interview (grpodx.medical.bayes).
        pa.field("questions", pa.int32()),
        pa.field("information_gain", pa.float32()),
        pa.field("evidence_right", pa.bool_()),
        pa.field("follows_evidence", pa.bool_()),
        pa.field("truncated", pa.bool_()),
        pa.field("valid", pa.bool_()),
        pa.field("error", pa.string()),
        pa.field("num_tokens", pa.int32()),
        pa.field("num_doctor_tokens", pa.int32()),
        pa.field("generation_s", pa.float32()),
        pa.field("patient_s", pa.float32()),
        pa.field("judge_s", pa.float32()),
        pa.field("token_ids", pa.list_(pa.int32())),
        pa.field("loss_mask", pa.list_(pa.int8())),
        pa.field("behaviour_logprobs", pa.list_(pa.float32())),
    ]
)


@dataclass(frozen=True)
class EpisodeTag:
    """Where an episode belongs: which step, which group, which worker."""

    step: int
    group_id: str
    sample_index: int
    worker_id: str


def to_record_batch(episodes: Sequence[tuple[EpisodeTag, EpisodeResult]]) -> pa.RecordBatch:
    rows = [_row(tag, result) for tag, result in episodes]
    columns = {field.name: [row[field.name] for row in rows] for field in TRAJECTORY_SCHEMA}
    return pa.RecordBatch.from_pydict(columns, schema=TRAJECTORY_SCHEMA)


def _row(tag: EpisodeTag, result: EpisodeResult) -> dict:
    verdict, reward = result.verdict, result.reward
    return {
        "step": tag.step,
        "group_id": tag.group_id,
        "sample_index": tag.sample_index,
        "worker_id": tag.worker_id,
        "policy_version": result.adapter_version,
        "turn_versions": result.turn_versions,
        "case_id": result.case.case_id,
        "case": json.dumps(result.case.to_dict()),
        "condition": result.case.condition,
        "icd10": result.case.icd10,
        "transcript": result.transcript(with_reasoning=True),
        "transcript_visible": result.transcript(with_reasoning=False),
        "diagnosis": result.diagnosis,
        "judge_category": verdict.category if verdict else None,
        "judge_rationale": verdict.rationale if verdict else None,
        # Null, not 0.0, for a failed episode: it was never scored, and a reader averaging the column
        # must not count it as a doctor that scored nothing.
        "reward": reward.total if reward else None,
        "reward_judge": reward.judge if reward else None,
        "reward_guideline": reward.guideline if reward else None,
        "hedged": reward.hedged if reward else False,
        "format_errors": reward.format_errors if reward else 0,
        "reasoning_leaks": result.malformed_turns,
        "turns": result.turns,
        **assessment_record(result.assessment),
        "truncated": result.truncated,
        "valid": result.valid,
        "error": result.error,
        "num_tokens": len(result.token_ids),
        "num_doctor_tokens": result.num_doctor_tokens,
        "generation_s": result.generation_s,
        "patient_s": result.patient_s,
        "judge_s": result.judge_s,
        "token_ids": result.token_ids,
        "loss_mask": result.loss_mask,
        "behaviour_logprobs": result.logprobs,
    }


def as_table(batches: Sequence[pa.RecordBatch] | pa.Table | pa.RecordBatch) -> pa.Table:
    """One table of trajectory records, whichever form they came in (a group's batch, several, a table)."""
    if isinstance(batches, pa.Table):
        return batches
    return pa.Table.from_batches([batches] if isinstance(batches, pa.RecordBatch) else list(batches))
