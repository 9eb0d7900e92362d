"""The exact posterior of the case generator, and what it says about an interview.

Cases are drawn by :mod:`grpodx.medical.cases` from a known generative model (a uniform choice of
condition within its demographics and chief complaints, then independent symptoms), so the best
possible inference from any set of answers is computable. The scripted resident reasons with it, and
every episode is scored against it: how much each question was expected to tell (information gain),
whether the evidence gathered points to the hidden condition at all, and whether the doctor's
conclusion is the one that evidence supports. Those three separate *asking well* from *concluding
well*, which the reward alone mixes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from grpodx.medical.cases import CaseCard, symptom_probability
from grpodx.medical.knowledge import KnowledgeBase


class BayesModel:
    """Posterior over the knowledge base's conditions given what the patient said."""

    def __init__(self, kb: KnowledgeBase):
        self.kb = kb
        self.symptom_ids = [s.id for s in kb.symptoms]
        self.askable = [s.id for s in kb.symptoms if s.kind == "symptom"]
        self._column = {sid: i for i, sid in enumerate(self.symptom_ids)}
        self._index = {c.name: i for i, c in enumerate(kb.conditions)}
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

    def probability(self, condition: str, symptom_id: str) -> float:
        """P(symptom | condition) as the posterior uses it (clipped)."""
        return float(self.likelihood[self._index[condition], self._column[symptom_id]])

    def leading(self, log_post: np.ndarray) -> str:
        """The most probable condition (the first of ties, in knowledge-base order)."""
        return self.kb.conditions[int(np.argmax(log_post))].name

    @staticmethod
    def normalise(log_post: np.ndarray) -> np.ndarray:
        shifted = np.exp(log_post - log_post.max())
        return shifted / shifted.sum()

    def information_gain(self, log_post: np.ndarray, symptom_id: str) -> float:
        """Expected fall in the posterior's entropy (nats) from the answer to ``symptom_id``."""
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


_MODELS: dict[int, tuple[KnowledgeBase, BayesModel]] = {}


def bayes_model(kb: KnowledgeBase) -> BayesModel:
    """One model per knowledge base (its likelihood table is built once)."""
    cached = _MODELS.get(id(kb))
    if cached is None or cached[0] is not kb:
        cached = _MODELS[id(kb)] = (kb, BayesModel(kb))
    return cached[1]


@dataclass(frozen=True)
class InterviewAssessment:
    """What the exact posterior makes of one interview (the case card gives the true answers)."""

    questions: int
    """Doctor turns before the diagnosis (a question the patient cannot answer counts, with no gain)."""
    information_gain: float
    """Summed expected information (nats) of the new symptoms asked, in the order asked."""
    evidence_condition: str
    """The condition the chief complaint, demographics and answers point to."""
    evidence_right: bool
    """That condition is the hidden one: the questions gathered enough to get it right."""
    follows_evidence: bool
    """The diagnosis names that condition: the doctor concluded what its own evidence supports."""


# What each episode record (Parquet row, evaluation episode) keeps of its assessment.
ASSESSMENT_FIELDS = ("questions", "information_gain", "evidence_right", "follows_evidence")


def assessment_record(assessment: InterviewAssessment | None) -> dict:
    """The :data:`ASSESSMENT_FIELDS` of ``assessment``, or None each for an episode never assessed."""
    return {name: getattr(assessment, name) if assessment else None for name in ASSESSMENT_FIELDS}


def assess_interview(
    kb: KnowledgeBase, case: CaseCard, doctor_questions: Sequence[str], diagnosis: str | None
) -> InterviewAssessment:
    """Score the questions (visible doctor turns before the diagnosis) and the conclusion of one
    interview of ``case``.

    A repeated symptom, the chief complaint and findings the patient cannot know ("not sure") add no
    information; a turn that names two symptoms counts each, in order.
    """
    model = bayes_model(kb)
    log_post = model.log_prior(case)
    known = {case.chief_complaint}
    gain = 0.0
    askable = set(model.askable)
    for text in doctor_questions:
        for symptom_id in (sid for sid in kb.symptoms_mentioned(text) if sid in askable):
            if symptom_id in known:
                continue
            known.add(symptom_id)
            gain += model.information_gain(log_post, symptom_id)
            log_post = model.update(log_post, symptom_id, symptom_id in case.present)
    leading = model.leading(log_post)
    named = kb.find_condition(diagnosis) if diagnosis else None
    follows = named is not None and named.name == leading
    return InterviewAssessment(len(doctor_questions), gain, leading, leading == case.condition, follows)
