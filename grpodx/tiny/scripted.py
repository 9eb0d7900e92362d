"""The scripted doctor whose dialogues warm-start the tiny model.

It reasons with the exact Bayes posterior of the case generator (``cases.symptom_probability``):
uniform prior over conditions, demographics, the chief complaint, then one likelihood per answer.
Its questions are deliberately imperfect (often the most informative symptom, sometimes a plausible
but weaker one, and a random number of them), so the warm-started doctor is competent but leaves
room for reinforcement learning to ask better and conclude better.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from grpodx.dialogue import REASON_CLOSE, REASON_OPEN
from grpodx.env.patient import ScriptedPatient
from grpodx.medical.cases import CaseCard, symptom_probability
from grpodx.medical.knowledge import KnowledgeBase


@dataclass(frozen=True)
class ScriptedDialogue:
    case: CaseCard
    messages: list[tuple[str, str]]  # (role, content) in chat-template roles: user / assistant / system
    diagnosis: str


class BayesModel:
    """Posterior over the knowledge base's conditions given what the patient said."""

    def __init__(self, kb: KnowledgeBase):
        self.kb = kb
        self.symptom_ids = [s.id for s in kb.symptoms]
        self.askable = [s.id for s in kb.symptoms if s.kind == "symptom"]
        self._column = {sid: i for i, sid in enumerate(self.symptom_ids)}
        # Clipped away from 0 and 1 so one surprising answer lowers a condition instead of ruling it out.
        self.likelihood = np.clip(
            np.array([[symptom_probability(c, sid) for sid in self.symptom_ids] for c in kb.conditions]),
            1e-4,
            1 - 1e-4,
        )

    def log_prior(self, case: CaseCard) -> np.ndarray:
        """Evidence the doctor has before asking: age, sex and the chief complaint."""
        scores = []
        for condition in self.kb.conditions:
            demo = condition.demographics
            if not demo.min_age <= case.age <= demo.max_age or demo.sex not in ("any", case.sex):
                scores.append(-np.inf)
                continue
            if case.chief_complaint not in condition.chief_complaints:
                scores.append(-np.inf)
                continue
            score = -np.log(demo.max_age - demo.min_age + 1) - np.log(len(condition.chief_complaints))
            scores.append(score + (0.0 if demo.sex == "any" else np.log(2.0)))
        return np.array(scores)

    def update(self, log_post: np.ndarray, symptom_id: str, present: bool) -> np.ndarray:
        column = self.likelihood[:, self._column[symptom_id]]
        return log_post + np.log(column if present else 1.0 - column)

    @staticmethod
    def normalise(log_post: np.ndarray) -> np.ndarray:
        shifted = np.exp(log_post - log_post.max())
        return shifted / shifted.sum()

    def information_gain(self, log_post: np.ndarray, symptom_id: str) -> float:
        post = self.normalise(log_post)
        column = self.likelihood[:, self._column[symptom_id]]
        p_yes = float(post @ column)

        def entropy(p: np.ndarray) -> float:
            p = p[p > 0]
            return float(-(p * np.log(p)).sum())

        after = 0.0
        for answer_prob, weights in ((p_yes, post * column), (1 - p_yes, post * (1 - column))):
            if answer_prob > 1e-12:
                after += answer_prob * entropy(weights / weights.sum())
        return entropy(post) - after


class ScriptedDoctor:
    def __init__(
        self, kb: KnowledgeBase, best_question_share: float = 0.6, last_turn_notice: str | None = None
    ):
        self.kb = kb
        self.last_turn_notice = last_turn_notice
        self.model = BayesModel(kb)
        self.patient = ScriptedPatient(kb)
        self.best_question_share = best_question_share

    def top_conditions(self, log_post: np.ndarray, k: int) -> list[str]:
        order = np.argsort(-log_post, kind="stable")[:k]
        return [self.kb.conditions[i].name for i in order if np.isfinite(log_post[i])]

    def choose_question(self, log_post: np.ndarray, asked: set[str], rng: random.Random) -> str | None:
        options = [sid for sid in self.model.askable if sid not in asked]
        if not options:
            return None
        if rng.random() < self.best_question_share:
            return max(options, key=lambda sid: self.model.information_gain(log_post, sid))
        plausible = {
            sid
            for name in self.top_conditions(log_post, 3)
            for sid in self.kb.condition(name).symptoms
            if sid in options
        }
        return rng.choice(sorted(plausible or options))

    def dialogue(self, case: CaseCard, rng: random.Random, max_turns: int = 5) -> ScriptedDialogue:
        log_post = self.model.log_prior(case)
        messages = [("user", self.patient.opening_text(case))]
        evidence = Evidence(self.kb, present=[case.chief_complaint])
        for _ in range(rng.randint(1, max_turns - 1)):
            symptom_id = self.choose_question(log_post, evidence.asked(), rng)
            if symptom_id is None:
                break
            phrase = self.kb.symptom(symptom_id).phrase
            candidates = " or ".join(self.top_conditions(log_post, 2))
            thought = f"{REASON_OPEN}{evidence.summary()} Consider {candidates}.{REASON_CLOSE}"
            messages.append(("assistant", f"{thought} Do you have {phrase}?"))
            answer = self.patient.reply_text(case, f"Do you have {phrase}?")
            messages.append(("user", answer))
            present = symptom_id in case.present
            log_post = self.model.update(log_post, symptom_id, present)
            evidence.add(symptom_id, present)
        diagnosis = self.top_conditions(log_post, 1)[0]
        if self.last_turn_notice and len(messages) == 2 * max_turns - 1:
            messages.append(("system", self.last_turn_notice))
        messages.append(("assistant", final_turn(self.kb, diagnosis, evidence.summary())))
        return ScriptedDialogue(case=case, messages=messages, diagnosis=diagnosis)


class Evidence:
    """What the patient has said so far, restated in every reasoning block.

    A 1.4 M-parameter doctor cannot gather answers scattered over the whole dialogue reliably; with
    the evidence rewritten next to each conclusion, each answer is one copy away from where the
    conclusion is drawn, so the warm-started doctor's diagnosis actually depends on its questions
    (which is what gives reinforcement learning something to improve: which questions, how many).
    """

    def __init__(self, kb: KnowledgeBase, present: list[str]):
        self.kb = kb
        self.present = list(present)
        self.absent: list[str] = []

    def add(self, symptom_id: str, present: bool) -> None:
        (self.present if present else self.absent).append(symptom_id)

    def asked(self) -> set[str]:
        return {*self.present, *self.absent}

    def summary(self) -> str:
        def names(ids: list[str]) -> str:
            return ", ".join(self.kb.symptom(sid).keywords[0] for sid in ids) if ids else "none"

        return f"Yes: {names(self.present)}. No: {names(self.absent)}."


def final_turn(kb: KnowledgeBase, diagnosis: str, evidence: str) -> str:
    steps = [step.name for step in kb.condition(diagnosis).next_steps]
    text = f"{REASON_OPEN}{evidence} Most likely {diagnosis}.{REASON_CLOSE} Final diagnosis: {diagnosis}."
    if steps:
        text += " Next steps: " + ", ".join(steps) + "."
    return text
