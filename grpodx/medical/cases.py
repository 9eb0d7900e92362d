"""Case cards: the hidden condition and what the patient knows, drawn by code from a seed.

The case is chosen by code, never by the patient model, so that every episode of a GRPO group can
share it. A card is a pure function of ``(split, index, base_seed)``.

Train/eval split: a card's identity is its *fingerprint* (condition, sex, age, chief complaint and the
set of present symptoms). A fingerprint belongs to the eval split when its hash falls in the eval
share, and each sampler rejects cards of the other split, so that no evaluation case, not even an
identical copy drawn by another seed, is ever trained on.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass
from typing import Literal

from grpodx.medical.knowledge import Condition, KnowledgeBase

Split = Literal["train", "eval"]

EVAL_SHARE = 0.15
# Chance that a symptom a condition does not list shows up anyway: real patients have background
# complaints, and a doctor must not over-read one answer.
BACKGROUND_RATE = 0.02
# Chance for a symptom listed as arguing against the condition.
AGAINST_RATE = 0.005


@dataclass(frozen=True)
class CaseCard:
    """Everything that is fixed about one simulated patient."""

    case_id: str
    split: Split
    seed: int
    condition: str
    icd10: str
    age: int
    sex: Literal["female", "male"]
    chief_complaint: str
    present: tuple[str, ...]
    absent: tuple[str, ...]

    def fingerprint(self) -> str:
        return _fingerprint(self.condition, self.sex, self.age, self.chief_complaint, self.present)

    def to_dict(self) -> dict:
        return asdict(self)


def _fingerprint(condition: str, sex: str, age: int, chief: str, present: tuple[str, ...]) -> str:
    key = "|".join([condition, sex, str(age), chief, ",".join(sorted(present))])
    return hashlib.sha256(key.encode()).hexdigest()


def split_of(fingerprint: str) -> Split:
    bucket = int(fingerprint[:8], 16) / 0xFFFFFFFF
    return "eval" if bucket < EVAL_SHARE else "train"


def symptom_probability(condition: Condition, symptom_id: str) -> float:
    """P(symptom present | condition): the one generative model the sampler and the scripted doctor share."""
    if symptom_id in condition.symptoms:
        return condition.symptoms[symptom_id]
    if symptom_id in condition.against:
        return AGAINST_RATE
    return BACKGROUND_RATE


def draw_card(kb: KnowledgeBase, rng: random.Random, split: Split, index: int, seed: int) -> CaseCard:
    condition = rng.choice(kb.conditions)
    demographics = condition.demographics
    sex = rng.choice(["female", "male"]) if demographics.sex == "any" else demographics.sex
    age = rng.randint(demographics.min_age, demographics.max_age)
    chief = rng.choice(condition.chief_complaints)
    present, absent = [], []
    for symptom in kb.symptoms:
        is_present = symptom.id == chief or rng.random() < symptom_probability(condition, symptom.id)
        (present if is_present else absent).append(symptom.id)
    return CaseCard(
        case_id=f"{split}-{index:06d}",
        split=split,
        seed=seed,
        condition=condition.name,
        icd10=condition.icd10,
        age=age,
        sex=sex,
        chief_complaint=chief,
        present=tuple(present),
        absent=tuple(absent),
    )


class CaseSampler:
    """Deterministic stream of case cards of one split; its position is part of a checkpoint."""

    def __init__(self, kb: KnowledgeBase, split: Split = "train", seed: int = 0):
        self.kb = kb
        self.split: Split = split
        self.seed = seed
        self.position = 0

    def case_at(self, index: int) -> CaseCard:
        """The ``index``-th card of this split: the first card of its own RNG stream that belongs here."""
        rng = random.Random(f"grpodx-case:{self.split}:{self.seed}:{index}")
        while True:
            card_seed = rng.getrandbits(63)
            card = draw_card(self.kb, random.Random(card_seed), self.split, index, card_seed)
            if split_of(card.fingerprint()) == self.split:
                return card

    def sample(self) -> CaseCard:
        card = self.case_at(self.position)
        self.position += 1
        return card

    def state_dict(self) -> dict:
        return {"split": self.split, "seed": self.seed, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state["split"] != self.split or state["seed"] != self.seed:
            raise ValueError(
                f"sampler state is for split={state['split']} seed={state['seed']}, "
                f"not split={self.split} seed={self.seed}; resume with the config of the original run"
            )
        self.position = int(state["position"])


def eval_cases(kb: KnowledgeBase, count: int, seed: int = 0) -> list[CaseCard]:
    """The fixed held-out set: the first ``count`` cards of the eval split."""
    sampler = CaseSampler(kb, "eval", seed)
    return [sampler.case_at(i) for i in range(count)]
