"""The simulated patient: an async interface and the offline, scripted implementation.

A patient sees the case card chosen by code and the doctor's turns *after* ``<reason>`` stripping,
never the doctor's reasoning. The scripted patient speaks only in symptom phrases from the knowledge
base, which the loader guarantees never contain a condition's name, so it cannot reveal its diagnosis.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from grpodx.medical.cases import CaseCard
from grpodx.medical.knowledge import KnowledgeBase


@dataclass(frozen=True)
class Message:
    """One visible turn of the conversation (reasoning already removed from doctor turns)."""

    role: Literal["doctor", "patient"]
    text: str


class Patient(ABC):
    """Answers the doctor as the patient of one case card."""

    @abstractmethod
    async def opening(self, case: CaseCard) -> str:
        """What the patient says first: who they are and why they came."""

    @abstractmethod
    async def reply(self, case: CaseCard, history: Sequence[Message]) -> str:
        """Answer the last doctor message of ``history`` (visible text only)."""


class ScriptedPatient(Patient):
    """Answers yes / no / not sure from the case card, by recognising the symptoms a question names."""

    def __init__(self, kb: KnowledgeBase):
        self.kb = kb

    async def opening(self, case: CaseCard) -> str:
        return self.opening_text(case)

    async def reply(self, case: CaseCard, history: Sequence[Message]) -> str:
        return self.reply_text(case, history[-1].text if history else "")

    # The synchronous core, shared by the async interface and the warm-start data generator.
    def opening_text(self, case: CaseCard) -> str:
        person = "woman" if case.sex == "female" else "man"
        chief = self.kb.symptom(case.chief_complaint).phrase
        reason = _pick(case, "opening", ["I came in because of {c}.", "I have {c} and it worries me."])
        return f"I am a {case.age}-year-old {person}. " + reason.format(c=chief)

    def reply_text(self, case: CaseCard, question: str) -> str:
        asked = self.kb.symptoms_mentioned(question)
        if not asked:
            return _pick(
                case,
                "unclear:" + question,
                ["I'm not sure what you mean.", "I don't know. Could you ask about a specific symptom?"],
            )
        return " ".join(self._answer(case, symptom_id) for symptom_id in asked)

    def _answer(self, case: CaseCard, symptom_id: str) -> str:
        symptom = self.kb.symptom(symptom_id)
        phrase = symptom.phrase
        if symptom.kind == "finding":
            return f"I'm not sure about {phrase}; nobody has checked that."
        if symptom_id in case.present:
            options = ["Yes, I have had {p}.", "Yes, I have {p}."]
        else:
            options = ["No, I have not had {p}.", "No, I don't have {p}."]
        return _pick(case, symptom_id, options).format(p=phrase)


def _pick(case: CaseCard, key: str, options: list[str]) -> str:
    """A phrasing chosen by the case seed: varied across cases, identical within a group."""
    digest = hashlib.sha256(f"{case.seed}:{key}".encode()).digest()
    return options[digest[0] % len(options)]
