"""The judge: an async interface and the offline ICD-10-CM partial-credit judge.

Offline scale (also in the README):

==========================================  =====
the diagnosis is                            score
==========================================  =====
the hidden condition or one of its synonyms  1.0
in the same ICD-10-CM category (3 chars)     0.6
in the same ICD-10-CM block                  0.3
in the same ICD-10-CM chapter                0.1
anything else, unrecognised, or missing      0.0
==========================================  =====

A hedged answer ("X or Y") is scored on the first condition it names; the reward adds the hedge
penalty on top, so naming several conditions never pays.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from grpodx.dialogue import diagnosis_alternatives
from grpodx.env.patient import Message
from grpodx.medical import icd
from grpodx.medical.cases import CaseCard
from grpodx.medical.knowledge import KnowledgeBase, _name_key

PARTIAL_CREDIT = {"exact": 1.0, "category": 0.6, "block": 0.3, "chapter": 0.1, "none": 0.0}


class JudgeError(RuntimeError):
    """The judge could not produce a valid verdict; the episode is excluded, never scored by default."""


@dataclass(frozen=True)
class Verdict:
    score: float
    category: str
    rationale: str
    predicted_code: str | None = None


class Judge(ABC):
    @abstractmethod
    async def score(self, case: CaseCard, diagnosis: str | None, transcript: Sequence[Message]) -> Verdict:
        """Score ``diagnosis`` against the hidden condition of ``case`` in [0, 1]."""


class IcdJudge(Judge):
    """Partial credit by closeness in the ICD-10-CM hierarchy."""

    def __init__(self, kb: KnowledgeBase):
        self.kb = kb

    async def score(self, case: CaseCard, diagnosis: str | None, transcript: Sequence[Message]) -> Verdict:
        return self.verdict(case, diagnosis)

    def resolve(self, diagnosis: str) -> str | None:
        """The ICD-10-CM code a free-text diagnosis names: knowledge base first, then ICD descriptions."""
        condition = self.kb.find_condition(diagnosis)
        if condition is not None:
            return condition.icd10
        return icd.code_for_description(diagnosis)

    def verdict(self, case: CaseCard, diagnosis: str | None) -> Verdict:
        if not diagnosis:
            return Verdict(0.0, "none", "no final diagnosis was given")
        alternatives = diagnosis_alternatives(diagnosis) or [diagnosis]
        named = alternatives[0]
        if case.vignette is not None:
            return self._vignette_verdict(case, named)
        hidden = self.kb.condition(case.condition)
        if self.kb.find_condition(named) is hidden:
            return Verdict(1.0, "exact", f"'{named}' names {hidden.name}", hidden.icd10)
        code = self.resolve(named)
        if code is None:
            return Verdict(0.0, "none", f"'{named}' is not a condition the judge recognises")
        level = icd.closeness(code, hidden.icd10)
        return Verdict(PARTIAL_CREDIT[level], level, f"'{named}' ({code}) vs {hidden.icd10}: {level}", code)

    def _vignette_verdict(self, case: CaseCard, named: str) -> Verdict:
        """A free-text case (grpodx.medical.case_file): scored against its diagnosis as written and the
        ICD-10-CM code it maps to; a code below the gold one (G70.00 for G70.0) names it exactly."""
        from grpodx.medical.case_file import gold_names

        hidden = self.kb.find_condition(case.condition)
        if hidden is not None and self.kb.find_condition(named) is hidden:
            return Verdict(1.0, "exact", f"'{named}' names {hidden.name}", hidden.icd10)
        if hidden is None and _name_key(named) in {_name_key(name) for name in gold_names(self.kb, case)}:
            return Verdict(1.0, "exact", f"'{named}' names {case.condition}", case.icd10 or None)
        if not case.icd10:
            raise JudgeError(
                f"the diagnosis {case.condition!r} of case {case.case_id} maps to no ICD-10-CM code; only "
                "the API judge (judge.kind=openai) can score it"
            )
        code = self.resolve(named)
        if code is None:
            return Verdict(0.0, "none", f"'{named}' is not a condition the judge recognises")
        gold = case.icd10
        level = "exact" if code.startswith(gold) else icd.closeness(code, gold)
        return Verdict(PARTIAL_CREDIT[level], level, f"'{named}' ({code}) vs {gold}: {level}", code)
