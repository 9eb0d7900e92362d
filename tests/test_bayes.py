"""The exact posterior and the interview assessment, on a two-condition base worked out by hand."""

from __future__ import annotations

import math

import pytest
import yaml

from grpodx.medical.bayes import BayesModel, assess_interview
from grpodx.medical.cases import BACKGROUND_RATE, CaseCard
from grpodx.medical.knowledge import load_knowledge_base

# Influenza and otitis share the chief complaint (fever) and the age range, so the prior is 1/2 each.
_BASE = {
    "version": 1,
    "symptoms": [
        {"id": "fever", "phrase": "a fever", "keywords": ["fever"], "kind": "symptom"},
        {"id": "cough", "phrase": "a cough", "keywords": ["cough"], "kind": "symptom"},
        {"id": "ear_pain", "phrase": "ear pain", "keywords": ["ear pain"], "kind": "symptom"},
        {"id": "crackles", "phrase": "crackles in the lungs", "keywords": ["crackles"], "kind": "finding"},
    ],
    "conditions": [
        {
            "name": "Influenza",
            "synonyms": ["flu"],
            "icd10": "J11.1",
            "demographics": {"min_age": 5, "max_age": 85, "sex": "any"},
            "chief_complaints": ["fever"],
            "symptoms": {"fever": 0.9, "cough": 0.8, "crackles": 0.1},
            "against": [],
            "next_steps": [],
        },
        {
            "name": "Acute otitis media",
            "synonyms": ["ear infection"],
            "icd10": "H66.90",
            "demographics": {"min_age": 5, "max_age": 85, "sex": "any"},
            "chief_complaints": ["fever"],
            "symptoms": {"fever": 0.5, "ear_pain": 0.9},
            "against": [],
            "next_steps": [],
        },
    ],
}


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    path = tmp_path_factory.mktemp("kb") / "kb.yaml"
    path.write_text(yaml.safe_dump(_BASE, sort_keys=False))
    return load_knowledge_base(path)


def _case(condition: str, present: tuple[str, ...]) -> CaseCard:
    everything = ("fever", "cough", "ear_pain", "crackles")
    return CaseCard(
        case_id="eval-000001",
        split="eval",
        seed=1,
        condition=condition,
        icd10="J11.1" if condition == "Influenza" else "H66.90",
        age=30,
        sex="female",
        chief_complaint="fever",
        present=present,
        absent=tuple(s for s in everything if s not in present),
    )


def _entropy(*p: float) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def test_information_gain_of_a_question_by_hand(kb):
    model = BayesModel(kb)
    prior = model.log_prior(_case("Influenza", ("fever",)))
    assert model.normalise(prior).tolist() == pytest.approx([0.5, 0.5])
    # P(cough) = 0.8 with influenza, the background rate with otitis.
    p_yes = 0.5 * 0.8 + 0.5 * BACKGROUND_RATE
    after_yes = _entropy(0.4 / p_yes, 0.5 * BACKGROUND_RATE / p_yes)
    after_no = _entropy(0.1 / (1 - p_yes), 0.5 * (1 - BACKGROUND_RATE) / (1 - p_yes))
    expected = _entropy(0.5, 0.5) - p_yes * after_yes - (1 - p_yes) * after_no
    assert model.information_gain(prior, "cough") == pytest.approx(expected, rel=1e-9)


def test_assessment_counts_only_new_answerable_symptoms(kb):
    model = BayesModel(kb)
    case = _case("Influenza", ("fever", "cough"))
    questions = [
        "Do you have a cough?",
        "Any cough at all?",  # repeated: nothing new
        "Do you have a fever?",  # the chief complaint: already known
        "Are there crackles?",  # a finding the patient cannot know
        "Tell me more.",  # no symptom named
    ]
    assessment = assess_interview(kb, case, questions, "flu")
    prior = model.log_prior(case)
    assert assessment.information_gain == pytest.approx(model.information_gain(prior, "cough"))
    assert assessment.questions == 5
    assert assessment.evidence_condition == "Influenza" and assessment.evidence_right
    assert assessment.follows_evidence  # "flu" is a synonym of what the evidence points to


def test_evidence_can_point_away_from_the_hidden_condition(kb):
    # Otitis whose patient has a cough and no ear pain: the answers point to influenza.
    case = _case("Acute otitis media", ("fever", "cough"))
    assessment = assess_interview(kb, case, ["Do you have a cough?", "Do you have ear pain?"], "Influenza")
    assert assessment.evidence_condition == "Influenza"
    assert not assessment.evidence_right and assessment.follows_evidence
    # The right answer against the evidence is not "following the evidence"; nor is no answer.
    assert not assess_interview(kb, case, ["Do you have a cough?"], "ear infection").follows_evidence
    assert not assess_interview(kb, case, [], None).follows_evidence


def test_two_symptoms_in_one_turn_count_in_order(kb):
    model = BayesModel(kb)
    case = _case("Acute otitis media", ("fever", "ear_pain"))
    both = assess_interview(kb, case, ["Do you have a cough or ear pain?"], None)
    prior = model.log_prior(case)
    after_cough = model.update(prior, "cough", False)
    expected = model.information_gain(prior, "cough") + model.information_gain(after_cough, "ear_pain")
    assert both.information_gain == pytest.approx(expected)
    assert both.questions == 1 and both.evidence_right
