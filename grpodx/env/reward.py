"""The episode reward: recorded parts, each weighted in config, total clipped to [0, 1].

    total = clip(judge_weight * judge
                 - hedge_penalty * hedged
                 - guideline_weight * (1 - guideline)
                 - format_penalty * format_errors, 0, 1)

``guideline`` is the share of the hidden condition's required next steps (troponin and an ECG for a
myocardial infarction, ...) that the final answer names: a safe answer for *this* patient names them,
whatever it concluded. ``format_errors`` counts a missing final diagnosis and every turn whose
reasoning markup was malformed (it would have leaked without the guard in ``strip_reasoning``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from grpodx.config import RewardConfig
from grpodx.dialogue import diagnosis_alternatives
from grpodx.medical.cases import CaseCard
from grpodx.medical.knowledge import KnowledgeBase


@dataclass(frozen=True)
class RewardParts:
    judge: float
    hedged: bool
    guideline: float
    format_errors: int
    total: float

    def to_dict(self) -> dict:
        return asdict(self)


def is_hedged(diagnosis: str | None) -> bool:
    return diagnosis is not None and len(diagnosis_alternatives(diagnosis)) > 1


def guideline_adherence(kb: KnowledgeBase, case: CaseCard, final_text: str | None) -> float:
    if case.vignette is not None:
        # A free-text case: the next steps of its diagnosis when the knowledge base knows it, else none
        # to name (there is nothing to check them against).
        known = kb.find_condition(case.condition)
        steps = known.next_steps if known is not None else []
    else:
        steps = kb.condition(case.condition).next_steps
    if not steps:
        return 1.0
    if not final_text:
        return 0.0
    return len(kb.steps_named(steps, final_text)) / len(steps)


def compute_reward(
    config: RewardConfig,
    kb: KnowledgeBase,
    case: CaseCard,
    *,
    judge_score: float,
    diagnosis: str | None,
    final_text: str | None,
    malformed_turns: int,
) -> RewardParts:
    hedged = is_hedged(diagnosis)
    guideline = guideline_adherence(kb, case, final_text)
    format_errors = malformed_turns + (0 if diagnosis else 1)
    raw = (
        config.judge_weight * judge_score
        - config.hedge_penalty * float(hedged)
        - config.guideline_weight * (1.0 - guideline)
        - config.format_penalty * format_errors
    )
    return RewardParts(
        judge=judge_score,
        hedged=hedged,
        guideline=guideline,
        format_errors=format_errors,
        total=min(1.0, max(0.0, raw)),
    )
