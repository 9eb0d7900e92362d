"""The simulated patient: an async interface and the offline, scripted implementation.

A patient sees the case card chosen by code and the doctor's turns *after* ``<reason>`` stripping,
never the doctor's reasoning. The scripted patient speaks only in symptom phrases from the knowledge
base, which the loader guarantees never contain a condition's name, so it cannot reveal its diagnosis.

It hears a question by the symptom keywords it names, and also by two things keywords alone miss: a
question about a whole family of symptoms ("Any pain?", "Where does it hurt?") is answered for the
members of that family on the card, and a bare trigger of a triggered symptom ("Do you have any
pets?") is not taken for the symptom ("symptoms that flare with pollen, dust or pets"). What it
cannot place gets "I don't know", never another symptom's answer.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from grpodx.medical.cases import CaseCard
from grpodx.medical.knowledge import KeywordMatch, KnowledgeBase

# Words that ask about a whole family of symptoms rather than one of them. A family's members are the
# symptoms whose phrase uses one of its words, so the family follows the knowledge base.
_FAMILY_WORDS = {
    "pain": re.compile(
        r"(?<!\w)(?:pains?|painful|hurt(?:s|ing)?|\w*aches?|aching|sore(?:ness)?|discomfort)(?!\w)", re.I
    ),
    "swelling": re.compile(r"(?<!\w)(?:swell(?:s|ing)?|swollen)(?!\w)", re.I),
}
# Where a complaint is (body parts) or what brings it on (swallowing, breathing, ...): a family question
# naming one ("Any pain in your leg?", "Does it hurt to swallow?") is about the members whose phrase or
# keywords name it, not about every member.
_SITES = frozenset(
    word
    for words in (
        "head face facial cheek eye ear nose mouth jaw tooth teeth lip tongue throat neck shoulder arm",
        "elbow wrist hand finger knuckle chest breastbone rib back side flank loin abdomen abdominal",
        "belly stomach tummy groin pelvis pelvic hip buttock leg thigh knee calf ankle foot feet toe",
        "joint muscle skin gland",
        "swallow swallowing breathe breathing eat eating walk walking",
    )
    for word in words.split()
)
# A triggered symptom is a complaint brought on by something ("symptoms that flare with pollen, dust
# or pets"); its one-word keywords name the trigger alone, which a question may ask about for itself.
_TRIGGERED_PHRASE = re.compile(r"\bthat (?:flares?|comes? on|worsens?) (?:with|after)\b")
# Words by which a question is about the patient's complaints, so that a trigger in it is one of them.
_COMPLAINT_TALK = re.compile(
    r"(?<!\w)(?:symptoms?|it|this|they|them|worse|better|flares?|flared|flare-ups?|triggers?|triggered|"
    r"brings?|brought|comes?|came|starts?|started|onset|happens?|happened|gets?|got|feel|feels|feeling|"
    r"bothers?|makes?|made)(?!\w)",
    re.I,
)
_WORD = re.compile(r"[a-z]+")


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


@dataclass(frozen=True)
class SymptomFamily:
    """Symptoms a question can ask about together ("Any pain?"), with the sites each one names."""

    name: str
    words: re.Pattern[str]
    sites: dict[str, frozenset[str]]  # member symptom id -> the sites its phrase and keywords name

    @classmethod
    def of(cls, kb: KnowledgeBase, name: str, words: re.Pattern[str]) -> SymptomFamily:
        members = [s for s in kb.symptoms if s.kind == "symptom" and words.search(s.phrase)]
        sites = {s.id: _sites(" ".join([s.phrase, *s.keywords])) for s in members}
        return cls(name, words, sites)

    def asked_in(self, rest: str, matches: list[KeywordMatch]) -> bool:
        """Whether the words a question says besides its symptom keywords ask about this family.

        Not when it also names a member: in "pain that is worse when breathing in" the word belongs
        to that member (and the resident's questions, which are symptom phrases, stay answered as the
        tiny doctor learned them).
        """
        return bool(self.words.search(rest)) and not any(m.symptom_id in self.sites for m in matches)

    def members_at(self, sites: frozenset[str]) -> list[str]:
        """The members at one of ``sites``, or every member when no site is named."""
        return [sid for sid, where in self.sites.items() if not sites or where & sites]


class ScriptedPatient(Patient):
    """Answers yes / no / not sure from the case card, by recognising the symptoms a question names."""

    def __init__(self, kb: KnowledgeBase):
        self.kb = kb
        self.families = [SymptomFamily.of(kb, name, words) for name, words in _FAMILY_WORDS.items()]
        self.triggered = {s.id for s in kb.symptoms if _TRIGGERED_PHRASE.search(s.phrase)}

    async def opening(self, case: CaseCard) -> str:
        if case.vignette is not None:  # loading such a file with this patient is refused before this
            raise ValueError(
                f"case {case.case_id} is a free-text vignette, which only a language-model patient can "
                "play (patient.kind=openai)"
            )
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
        matches = self.kb.keyword_matches(question)
        rest = _without(question, matches)
        symptoms = _unique(m.symptom_id for m in matches if self._means_symptom(question, m, matches, rest))
        families = [family for family in self.families if family.asked_in(rest, matches)]
        answers = [self._answer(case, symptom_id) for symptom_id in symptoms]
        answers += [self._family_answer(case, family, _sites(rest)) for family in families]
        if not answers:
            return _pick(
                case,
                "unclear:" + question,
                ["I'm not sure what you mean.", "I don't know. Could you ask about a specific symptom?"],
            )
        return " ".join(answers)

    def _means_symptom(
        self, question: str, match: KeywordMatch, matches: list[KeywordMatch], rest: str
    ) -> bool:
        """False for a lone trigger word in a question that is not about complaints ("Do you have pets?")."""
        keyword = question[match.start : match.end]
        if match.symptom_id not in self.triggered or re.search(r"[\s\-]", keyword):
            return True
        return (
            bool(_COMPLAINT_TALK.search(rest))
            or any(family.words.search(rest) for family in self.families)
            or any(other.symptom_id not in self.triggered for other in matches)
        )

    def _family_answer(self, case: CaseCard, family: SymptomFamily, sites: frozenset[str]) -> str:
        members = family.members_at(sites)
        if not members:
            # No symptom of the knowledge base is there: the card cannot say.
            return f"I don't know about {family.name} like that."
        present = [self.kb.symptom(sid).phrase for sid in members if sid in case.present]
        if present:
            options = ["Yes, I have had {p}.", "Yes, I have {p}."]
            return _pick(case, family.name, options).format(p=_listing(present))
        return f"No, I don't have any {family.name}{' like that' if sites else ''}."

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


def _without(text: str, matches: list[KeywordMatch]) -> str:
    """``text`` with the matched symptom keywords blanked out: what else the question says."""
    for match in matches:
        text = text[: match.start] + " " * (match.end - match.start) + text[match.end :]
    return text


def _sites(text: str) -> frozenset[str]:
    """The sites ``text`` names, plurals folded ("knees" -> "knee")."""
    words = _WORD.findall(text.lower())
    return frozenset(w if w in _SITES else w[:-1] for w in words if w in _SITES or w[:-1] in _SITES)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _listing(phrases: list[str]) -> str:
    """The phrases as one list in prose: "a, b and c"."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _pick(case: CaseCard, key: str, options: list[str]) -> str:
    """A phrasing chosen by the case seed: varied across cases, identical within a group."""
    digest = hashlib.sha256(f"{case.seed}:{key}".encode()).digest()
    return options[digest[0] % len(options)]
