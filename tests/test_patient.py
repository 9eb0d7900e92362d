"""The scripted patient: answers from the card, volunteers the complaint, never names its condition."""

import asyncio
import re

from grpodx.env.patient import Message, ScriptedPatient
from grpodx.medical.cases import CaseSampler
from grpodx.medical.knowledge import load_knowledge_base

KB = load_knowledge_base()
PATIENT = ScriptedPatient(KB)
ALL_NAMES = [name for condition in KB.conditions for name in condition.all_names()]
_NAME_PATTERN = re.compile(
    r"\b(" + "|".join(re.escape(n) for n in sorted(ALL_NAMES, key=len, reverse=True)) + r")\b", re.I
)


def _cases(count=120, seed=0):
    sampler = CaseSampler(KB, "train", seed)
    return [sampler.case_at(i) for i in range(count)]


def _interview(case):
    """Every question a doctor could ask: each symptom, free questions, and naming the diagnosis."""
    questions = [f"Do you have {s.phrase}?" for s in KB.symptoms]
    questions += ["What do you think you have?", "Tell me your diagnosis.", f"Is it {case.condition}?"]
    questions += [f"Could this be {name}?" for name in KB.condition(case.condition).all_names()]
    replies = [PATIENT.opening_text(case)]
    replies += [asyncio.run(PATIENT.reply(case, [Message("doctor", q)])) for q in questions]
    return replies


def test_patient_never_names_any_condition():
    for case in _cases():
        for reply in _interview(case):
            found = _NAME_PATTERN.search(reply)
            assert found is None, f"{case.condition}: patient said {found.group(0)!r} in {reply!r}"


def test_answers_follow_the_card():
    for case in _cases(40):
        for symptom in KB.symptoms:
            reply = PATIENT.reply_text(case, f"Do you have {symptom.phrase}?")
            if symptom.kind == "finding":
                assert reply.startswith("I'm not sure"), reply
            elif symptom.id in case.present:
                assert reply.startswith("Yes"), (symptom.id, reply)
            else:
                assert reply.startswith("No"), (symptom.id, reply)


def test_every_symptom_is_recognised_by_its_own_question():
    for symptom in KB.symptoms:
        assert symptom.id in KB.symptoms_mentioned(f"Do you have {symptom.phrase}?"), symptom.id


def test_two_symptoms_in_one_question_get_two_answers():
    case = _cases(1)[0]
    first, second = KB.symptoms[0], KB.symptoms[1]
    reply = PATIENT.reply_text(case, f"Do you have {first.phrase} or {second.phrase}?")
    assert first.phrase in reply and second.phrase in reply


def test_opening_volunteers_the_chief_complaint_and_demographics():
    for case in _cases(30):
        opening = PATIENT.opening_text(case)
        assert KB.symptom(case.chief_complaint).phrase in opening
        assert str(case.age) in opening


def test_unrecognised_question_gets_no_symptom_answer():
    case = _cases(1)[0]
    reply = PATIENT.reply_text(case, "How is the weather today?")
    assert not reply.startswith(("Yes", "No"))


def test_patient_is_deterministic_for_a_seed():
    for case in _cases(20):
        assert _interview(case) == _interview(case)
    again = _cases(20)
    assert [_interview(c) for c in again[:5]] == [_interview(c) for c in _cases(20)[:5]]
