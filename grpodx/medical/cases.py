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
from typing import TYPE_CHECKING, Literal

from grpodx.medical.knowledge import Condition, KnowledgeBase

if TYPE_CHECKING:
    from grpodx.config import Config
    from grpodx.medical.case_file import CaseFile

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
    sex: Literal["female", "male"]  # or "unknown" for a vignette that does not say
    chief_complaint: str
    present: tuple[str, ...]
    absent: tuple[str, ...]
    # A free-text case (an AgentClinic OSCE vignette, see grpodx.medical.case_file): what the API patient
    # plays instead of the symptom lists, which are then empty; ``condition`` is the diagnosis as written
    # (or the knowledge base's name for it) and ``icd10`` its code, "" when it maps to none.
    vignette: str | None = None

    def fingerprint(self) -> str:
        if self.vignette is not None:
            chief = f"{self.chief_complaint}|{self.vignette}"
            return _fingerprint(self.condition, self.sex, self.age, chief, self.present)
        return _fingerprint(self.condition, self.sex, self.age, self.chief_complaint, self.present)

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.vignette is None:  # a card of the knowledge base reads as it always has
            del data["vignette"]
        return data


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
    """Deterministic stream of case cards of one split; its position is part of a checkpoint.

    With ``cases`` (a user's file, :mod:`grpodx.medical.case_file`) the stream draws that file's cards of
    this split instead of generating them: each pass over them in an order shuffled by seed and pass.
    """

    def __init__(
        self, kb: KnowledgeBase, split: Split = "train", seed: int = 0, cases: CaseFile | None = None
    ):
        self.kb = kb
        self.split: Split = split
        self.seed = seed
        self.position = 0
        self.cases = cases
        self._pool = cases.split(split) if cases is not None else []
        self._orders: dict[int, list[int]] = {}
        if cases is not None and not self._pool:
            raise cases.empty_share(split)

    @classmethod
    def for_config(cls, kb: KnowledgeBase, config: Config, split: Split = "train") -> CaseSampler:
        """The sampler of a run: generated cards, or those of ``train.cases_file`` when it is set."""
        from grpodx.medical.case_file import load_cases_for

        return cls(kb, split, config.train.seed, load_cases_for(config, kb))

    def held_out(self, count: int) -> list[CaseCard]:
        """The run's fixed held-out set (see :func:`eval_cases`), from the same source as this sampler."""
        return eval_cases(self.kb, count, cases=self.cases)

    def case_at(self, index: int) -> CaseCard:
        """The ``index``-th card of this split: the first card of its own RNG stream that belongs here."""
        if self.cases is not None:
            return self._file_case_at(index)
        rng = random.Random(f"grpodx-case:{self.split}:{self.seed}:{index}")
        while True:
            card_seed = rng.getrandbits(63)
            card = draw_card(self.kb, random.Random(card_seed), self.split, index, card_seed)
            if split_of(card.fingerprint()) == self.split:
                return card

    def _file_case_at(self, index: int) -> CaseCard:
        epoch, offset = divmod(index, len(self._pool))
        order = self._orders.get(epoch)
        if order is None:
            order = list(range(len(self._pool)))
            random.Random(f"grpodx-case-file:{self.split}:{self.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}  # the stream moves forward: one pass is enough to keep
        return self._pool[order[offset]]

    def sample(self) -> CaseCard:
        card = self.case_at(self.position)
        self.position += 1
        return card

    def state_dict(self) -> dict:
        state = {"split": self.split, "seed": self.seed, "position": self.position}
        if self.cases is not None:
            state["cases_sha256"] = self.cases.sha256
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["split"] != self.split or state["seed"] != self.seed:
            raise ValueError(
                f"sampler state is for split={state['split']} seed={state['seed']}, "
                f"not split={self.split} seed={self.seed}; resume with the config of the original run"
            )
        mine = self.cases.sha256 if self.cases is not None else None
        if state.get("cases_sha256") != mine:
            raise ValueError(
                "sampler state is for "
                + ("generated cases" if state.get("cases_sha256") is None else "another train.cases_file")
                + f", not {'generated cases' if mine is None else 'train.cases_file=' + self.cases.path}; "
                "resume with the config (and cases file) of the original run"
            )
        self.position = int(state["position"])


def eval_cases(kb: KnowledgeBase, count: int, seed: int = 0, cases: CaseFile | None = None) -> list[CaseCard]:
    """The fixed held-out set: the first ``count`` cards of the eval split (of ``cases``, in file
    order, when given: at most as many as it holds)."""
    if cases is not None:
        return cases.split("eval")[:count] if count > 0 else []
    sampler = CaseSampler(kb, "eval", seed)
    return [sampler.case_at(i) for i in range(count)]
