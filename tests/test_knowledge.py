"""The packaged knowledge base, its validating loader and the text-matching helpers."""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from grpodx.medical.icd import is_valid_code
from grpodx.medical.knowledge import (
    KnowledgeBase,
    KnowledgeBaseError,
    load_knowledge_base,
    normalise,
)


@pytest.fixture(scope="module")
def kb() -> KnowledgeBase:
    return load_knowledge_base()


# --- the packaged file ---------------------------------------------------------------


def test_packaged_file_loads_with_enough_content(kb: KnowledgeBase) -> None:
    assert len(kb.conditions) >= 64
    assert 70 <= len(kb.symptoms) <= 110
    assert all(is_valid_code(c.icd10) for c in kb.conditions)
    assert sum(1 for c in kb.conditions if c.next_steps) >= 30


def test_default_load_is_cached(kb: KnowledgeBase) -> None:
    assert load_knowledge_base() is kb


@pytest.mark.parametrize(
    "name",
    [
        "influenza",
        "community-acquired pneumonia",
        "acute myocardial infarction",
        "pulmonary embolism",
        "acute appendicitis",
        "migraine",
        "urinary tract infection",
        "type 2 diabetes",
        "asthma exacerbation",
        "gerd",
    ],
)
def test_required_conditions_present(kb: KnowledgeBase, name: str) -> None:
    assert kb.find_condition(name) is not None


def test_condition_shapes(kb: KnowledgeBase) -> None:
    for condition in kb.conditions:
        assert 5 <= len(condition.symptoms) <= 10, condition.name
        assert 2 <= len(condition.against) <= 5, condition.name
        for step in condition.next_steps:
            assert 1 <= len(step.name.split()) <= 4, step.name


def test_sex_specific_demographics(kb: KnowledgeBase) -> None:
    ectopic = kb.condition("Ectopic pregnancy").demographics
    assert ectopic.sex == "female" and ectopic.min_age >= 12 and ectopic.max_age <= 55
    assert kb.condition("Benign prostatic hyperplasia").demographics.sex == "male"


def test_every_chief_complaint_opens_at_least_three_conditions(kb: KnowledgeBase) -> None:
    """The opening complaint alone must never give the answer away."""
    opened = Counter(sid for c in kb.conditions for sid in c.chief_complaints)
    assert opened, "no chief complaints at all"
    too_few = {sid: n for sid, n in opened.items() if n < 3}
    assert not too_few, f"chief complaints opening fewer than 3 conditions: {too_few}"


def test_every_symptom_can_be_reported_by_some_condition(kb: KnowledgeBase) -> None:
    reported = {sid for c in kb.conditions for sid in c.symptoms}
    assert [s.id for s in kb.symptoms if s.id not in reported] == []


def test_each_phrase_is_heard_as_its_own_symptom(kb: KnowledgeBase) -> None:
    """The patient answers "Do you have <phrase>?" by keyword matching."""
    for symptom in kb.symptoms:
        assert kb.symptoms_mentioned(f"Do you have {symptom.phrase}?") == [symptom.id], symptom.id


def test_vocabulary_has_findings(kb: KnowledgeBase) -> None:
    assert sum(1 for s in kb.symptoms if s.kind == "finding") >= 4


def test_patient_phrases_never_name_a_condition(kb: KnowledgeBase) -> None:
    names = [normalise(n) for c in kb.conditions for n in c.all_names()]
    for condition in kb.conditions:
        speech = " | ".join(f"Yes, I have had {kb.symptom(s).phrase}." for s in condition.symptoms).lower()
        for name in names:
            assert not re.search(rf"(?<!\w){re.escape(name)}(?!\w)", speech), (condition.name, name)


# --- lookups and matching -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Influenza", "Influenza"),
        ("  INFLUENZA. ", "Influenza"),
        ("the flu", "Influenza"),
        ("Flu?", "Influenza"),
        ("a heart attack", "Acute myocardial infarction"),
        ("Heart-attack!", "Acute myocardial infarction"),
        ("covid 19", "COVID-19"),
        ("Covid-19", "COVID-19"),
        ("bells palsy", "Bell's palsy"),
        ("UTI", "Acute cystitis"),
    ],
)
def test_find_condition_normalises(kb: KnowledgeBase, text: str, expected: str) -> None:
    found = kb.find_condition(text)
    assert found is not None and found.name == expected


@pytest.mark.parametrize("text", ["", "acute influenza", "influenza pneumonia", "heart", "a"])
def test_find_condition_is_otherwise_exact(kb: KnowledgeBase, text: str) -> None:
    assert kb.find_condition(text) is None


def test_condition_by_exact_name(kb: KnowledgeBase) -> None:
    assert kb.condition("Migraine").icd10.startswith("G43")
    with pytest.raises(KeyError, match=r"flu.*Influenza"):
        kb.condition("flu")


def test_symptom_lookup(kb: KnowledgeBase) -> None:
    assert kb.symptom("fever").phrase == "a fever"
    with pytest.raises(KeyError, match="no_such_symptom"):
        kb.symptom("no_such_symptom")


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("Do you have chest pain or shortness of breath?", ["chest_pain", "shortness_of_breath"]),
        ("Any shortness of breath? And chest pain?", ["shortness_of_breath", "chest_pain"]),
        ("DO YOU HAVE A FEVER?", ["fever"]),
        ("Any headaches?", ["headache"]),
        ("Is this the worst headache of your life?", ["thunderclap"]),
        ("Do you have a stiff neck?", ["neck_stiffness"]),
        ("Have you been coughing up blood?", ["hemoptysis"]),
        ("Does the pain radiate to your back?", ["back_pain"]),
        ("Any fever? Any fever at all?", ["fever"]),
        ("How are you feeling today?", []),
        ("Are you feverishly busy?", []),  # "feverishly" is not the whole word "feverish"
    ],
)
def test_symptoms_mentioned(kb: KnowledgeBase, question: str, expected: list[str]) -> None:
    assert kb.symptoms_mentioned(question) == expected


def test_longer_keyword_beats_overlapping_shorter_one(tmp_path: Path) -> None:
    data = _base()
    data["symptoms"].append({"id": "pain", "phrase": "pain", "keywords": ["pain"], "kind": "symptom"})
    data["symptoms"].append(
        {"id": "chest_pain", "phrase": "chest pain", "keywords": ["chest pain"], "kind": "symptom"}
    )
    data["conditions"][0]["symptoms"].update({"pain": 0.5, "chest_pain": 0.5})
    kb = load_knowledge_base(_write(tmp_path, data))
    assert kb.symptoms_mentioned("Any chest pain?") == ["chest_pain"]
    assert kb.symptoms_mentioned("Any pain? Chest pain?") == ["pain", "chest_pain"]


def test_steps_named(kb: KnowledgeBase) -> None:
    steps = kb.condition("Acute myocardial infarction").next_steps
    assert kb.steps_named(steps, "Get a TROPONIN and a 12-lead EKG now.") == ["troponin", "ECG"]
    assert kb.steps_named(steps, "Order two ECGs.") == ["ECG"]
    assert kb.steps_named(steps, "Reassure and discharge.") == []
    assert kb.steps_named(steps, "Check the ecgx machine") == []  # whole words only
    pe_steps = kb.condition("Pulmonary embolism").next_steps
    assert kb.steps_named(pe_steps, "Check a D dimer, then CTPA.") == ["CT pulmonary angiography", "D-dimer"]


def test_normalise() -> None:
    assert normalise("  Hello,   World!! ") == "hello, world"
    assert normalise("\u201cPneumonia.\u201d") == "pneumonia"


# --- the validating loader -------------------------------------------------------------


def _base() -> dict[str, Any]:
    """A minimal valid knowledge base that each bad-file case breaks in one way."""
    return {
        "version": 1,
        "symptoms": [
            {"id": "fever", "phrase": "a fever", "keywords": ["fever", "feverish"], "kind": "symptom"},
            {"id": "cough", "phrase": "a cough", "keywords": ["cough"], "kind": "symptom"},
            {"id": "rash", "phrase": "a rash", "keywords": ["rash"], "kind": "symptom"},
        ],
        "conditions": [
            {
                "name": "Influenza",
                "synonyms": ["flu"],
                "icd10": "J11.1",
                "demographics": {"min_age": 5, "max_age": 85, "sex": "any"},
                "chief_complaints": ["fever"],
                "symptoms": {"fever": 0.9, "cough": 0.8},
                "against": ["rash"],
                "next_steps": [{"name": "flu test", "keywords": ["flu test", "influenza pcr"]}],
            },
            {
                "name": "Contact dermatitis",
                "synonyms": ["skin allergy"],
                "icd10": "L25.9",
                "demographics": {"min_age": 2, "max_age": 90, "sex": "any"},
                "chief_complaints": ["rash"],
                "symptoms": {"rash": 0.95},
                "against": ["fever"],
                "next_steps": [],
            },
        ],
    }


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "kb.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_minimal_base_is_valid(tmp_path: Path) -> None:
    kb = load_knowledge_base(_write(tmp_path, _base()))
    assert [c.name for c in kb.conditions] == ["Influenza", "Contact dermatitis"]


def _set(path: tuple[Any, ...], value: Any):
    def mutate(data: dict[str, Any]) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _add_symptom(symptom: dict[str, Any], used_by: int | None = 0):
    def mutate(data: dict[str, Any]) -> None:
        data["symptoms"].append(symptom)
        if used_by is not None:
            data["conditions"][used_by]["symptoms"][symptom["id"]] = 0.3

    return mutate


BAD_CASES = {
    "invalid code": (_set(("conditions", 0, "icd10"), "J99.999"), ["Influenza", "J99.999"]),
    "code without dot": (_set(("conditions", 0, "icd10"), "J111"), ["Influenza", "J11.1"]),
    "duplicate synonym": (
        _set(("conditions", 1, "synonyms"), ["The Flu"]),
        ["Contact dermatitis", "Influenza"],
    ),
    "frequency 1.5": (_set(("conditions", 0, "symptoms", "cough"), 1.5), ["Influenza", "cough", "1.5"]),
    "frequency 0": (_set(("conditions", 0, "symptoms", "cough"), 0), ["Influenza", "cough"]),
    "unknown symptom id": (_set(("conditions", 0, "symptoms", "couhg"), 0.5), ["Influenza", "couhg"]),
    "unknown against id": (_set(("conditions", 1, "against"), ["itch"]), ["Contact dermatitis", "itch"]),
    "unknown chief complaint": (
        _set(("conditions", 1, "chief_complaints"), ["itch"]),
        ["Contact dermatitis", "itch"],
    ),
    "chief complaint not a symptom": (
        _set(("conditions", 0, "chief_complaints"), ["rash"]),
        ["Influenza", "rash"],
    ),
    "weak chief complaint": (_set(("conditions", 0, "symptoms", "fever"), 0.4), ["Influenza", "fever"]),
    "symptom and against": (_set(("conditions", 1, "against"), ["rash"]), ["Contact dermatitis", "rash"]),
    "ages reversed": (_set(("conditions", 0, "demographics", "min_age"), 90), ["Influenza", "90"]),
    "age too high": (_set(("conditions", 0, "demographics", "max_age"), 150), ["Influenza", "150"]),
    "name inside phrase": (
        _set(("symptoms", 0, "phrase"), "a flu-like fever"),
        ["fever", "flu", "Influenza"],
    ),
    "name inside keyword": (
        _set(("symptoms", 2, "keywords"), ["rash", "skin allergy"]),
        ["rash", "skin allergy"],
    ),
    "unknown key": (_set(("conditions", 0, "sympotms"), {"fever": 0.9}), ["Influenza", "sympotms"]),
    "unknown top-level key": (_set(("extra",), 1), ["extra"]),
    "missing key": (lambda d: d["conditions"][1].pop("icd10"), ["Contact dermatitis", "icd10"]),
    "bad sex": (_set(("conditions", 0, "demographics", "sex"), "both"), ["Influenza", "sex"]),
    "duplicate symptom id": (
        _add_symptom({"id": "cough", "phrase": "a hack", "keywords": ["hack"], "kind": "symptom"}, None),
        ["cough"],
    ),
    "keyword claimed twice": (
        _add_symptom(
            {"id": "chills", "phrase": "chills", "keywords": ["chills", "Feverish"], "kind": "symptom"}
        ),
        ["feverish", "fever", "chills"],
    ),
    "unused symptom": (
        _add_symptom({"id": "chills", "phrase": "chills", "keywords": ["chills"], "kind": "symptom"}, None),
        ["chills"],
    ),
    "bad symptom id": (_set(("symptoms", 1, "id"), "Cough"), ["Cough"]),
    "phrase not matched by its keywords": (
        _set(("symptoms", 1, "phrase"), "a hacking"),
        ["cough", "a hacking"],
    ),
    "phrase matched as another symptom": (
        _set(("symptoms", 2, "phrase"), "a rash with fever"),
        ["rash", "fever"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_file_names_the_culprit(tmp_path: Path, case: str) -> None:
    mutate, culprits = BAD_CASES[case]
    data = copy.deepcopy(_base())
    mutate(data)
    with pytest.raises(KnowledgeBaseError) as info:
        load_knowledge_base(_write(tmp_path, data))
    message = str(info.value)
    for culprit in culprits:
        assert culprit.lower() in message.lower(), (case, message)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeBaseError, match="does not exist"):
        load_knowledge_base(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: [1\n", encoding="utf-8")
    with pytest.raises(KnowledgeBaseError, match="YAML"):
        load_knowledge_base(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(KnowledgeBaseError, match="mapping"):
        load_knowledge_base(listing)
