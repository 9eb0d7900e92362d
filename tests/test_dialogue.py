"""Dialogue rules: reasoning never reaches the patient; final diagnoses and hedges parse."""

import pytest

from grpodx.dialogue import (
    diagnosis_alternatives,
    parse_final_diagnosis,
    render_message,
    strip_reasoning,
)
from grpodx.env.reward import is_hedged


@pytest.mark.parametrize(
    ("raw", "visible", "malformed"),
    [
        ("<reason>chest pain, think MI</reason> Do you sweat?", "Do you sweat?", False),
        ("Hello. <reason>a</reason> Any fever? <reason>b</reason>", "Hello. Any fever?", False),
        ("Any cough? <REASON>maybe flu</Reason>", "Any cough?", False),
        # Unclosed: everything after the opening tag is hidden.
        ("Any cough? <reason>probably influenza, ask about aches", "Any cough?", True),
        # Orphan closing tag: what came before it was reasoning the doctor forgot to open.
        ("probably influenza</reason> Any aches?", "Any aches?", True),
        # Nested blocks still hide all the reasoning.
        ("<reason>a <reason>b</reason> c</reason> Any rash?", "Any rash?", True),
        # A tag cut off at the end of a turn.
        ("Any rash? <reas", "Any rash?", True),
        ("Any rash?", "Any rash?", False),
    ],
)
def test_strip_reasoning_hides_every_reasoning_fragment(raw, visible, malformed):
    stripped = strip_reasoning(raw)
    assert stripped.visible == visible
    assert stripped.malformed is malformed
    for secret in ("MI", "influenza", "flu", "reason"):
        if secret not in visible:
            assert secret not in stripped.visible


@pytest.mark.parametrize(
    ("text", "diagnosis"),
    [
        ("Final diagnosis: Influenza.", "Influenza"),
        ("Thanks.\nFINAL DIAGNOSIS - acute appendicitis. Next steps: CT abdomen.", "acute appendicitis"),
        ("Final diagnosis: Pulmonary embolism. Next step: D-dimer", "Pulmonary embolism"),
        ("Do you have a fever?", None),
        ("Final diagnosis:   ", None),
    ],
)
def test_parse_final_diagnosis(text, diagnosis):
    assert parse_final_diagnosis(text) == diagnosis


@pytest.mark.parametrize(
    ("diagnosis", "count"),
    [
        ("influenza", 1),
        ("influenza or pneumonia", 2),
        ("GERD vs. myocardial infarction", 2),
        ("migraine/tension headache", 2),
        ("asthma; COPD; bronchitis", 3),
        ("gastroesophageal reflux disease", 1),
    ],
)
def test_diagnosis_alternatives_counts_hedges(diagnosis, count):
    assert len(diagnosis_alternatives(diagnosis)) == count


@pytest.mark.parametrize(
    ("raw", "visible", "malformed"),
    [
        ("<reason >think MI</reason > Do you sweat?", "Do you sweat?", False),
        ("< reason >think MI</ reason > Do you sweat?", "Do you sweat?", False),
        ("<Reason\n>think MI< / REASON> Do you sweat?", "Do you sweat?", False),
        # The balance rules apply to them as to the plain tags.
        ("Do you sweat? < reason >think MI", "Do you sweat?", True),
        ("think MI</ reason > Do you sweat?", "Do you sweat?", True),
    ],
)
def test_strip_reasoning_hides_tags_with_whitespace_inside(raw, visible, malformed):
    stripped = strip_reasoning(raw)
    assert stripped.visible == visible
    assert stripped.malformed is malformed


@pytest.mark.parametrize(
    ("text", "diagnosis"),
    [
        ("Final diagnosis: Influenza.\nFinal diagnosis: Pneumonia.", "Influenza or Pneumonia"),
        (
            "Final diagnosis: Influenza. Next steps: rest. Final diagnosis: Pneumonia",
            "Influenza or Pneumonia",
        ),
        ("Final diagnosis:\nFinal diagnosis: Asthma", "Asthma"),
    ],
)
def test_several_different_final_diagnoses_are_a_hedge(text, diagnosis):
    assert parse_final_diagnosis(text) == diagnosis
    assert is_hedged(parse_final_diagnosis(text)) is (" or " in diagnosis)


def test_the_same_final_diagnosis_twice_is_not_a_hedge():
    diagnosis = parse_final_diagnosis("Final diagnosis: Influenza.\nTo repeat, final diagnosis: influenza")
    assert diagnosis == "Influenza" and not is_hedged(diagnosis)


def test_render_message_uses_phi4_format():
    assert render_message("user", "hi") == "<|im_start|>user<|im_sep|>hi<|im_end|>"
