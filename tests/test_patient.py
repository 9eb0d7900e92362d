"""The scripted patient: answers from the card, volunteers the complaint, never names its condition."""

import asyncio
import re

from grpodx.env.patient import Message, ScriptedPatient
from grpodx.medical.cases import CaseSampler, eval_cases
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


HELD_OUT = eval_cases(KB, 60)
# Pains as a person counts them: every symptom whose phrase says pain or ache.
PAIN_SYMPTOMS = {s.id for s in KB.symptoms if re.search(r"pain|ache|\bsore\b", s.phrase)}
PLAIN_PAIN_QUESTIONS = ["Any pain? Where exactly?", "Do you have any pain?", "Where does it hurt?"]


def test_a_plain_pain_question_gets_every_pain_on_the_card():
    with_pain = [case for case in HELD_OUT if PAIN_SYMPTOMS & set(case.present)]
    assert len(with_pain) > 20
    for case in with_pain:
        for question in PLAIN_PAIN_QUESTIONS:
            reply = PATIENT.reply_text(case, question)
            assert reply.startswith("Yes"), (question, case.present, reply)
            for symptom_id in PAIN_SYMPTOMS & set(case.present):
                assert KB.symptom(symptom_id).phrase in reply, (question, symptom_id, reply)


def test_a_plain_pain_question_gets_no_when_the_card_has_no_pain():
    painless = [case for case in _cases(200) if not PAIN_SYMPTOMS & set(case.present)]
    assert painless
    for case in painless[:10]:
        for question in PLAIN_PAIN_QUESTIONS:
            assert PATIENT.reply_text(case, question) == "No, I don't have any pain.", question


def test_a_pain_question_naming_a_place_is_answered_for_that_place_only():
    case = next(c for c in HELD_OUT if "chest_pain" in c.present and "leg_radiating_pain" not in c.present)
    assert PATIENT.reply_text(case, "Any pain in your leg?") == "No, I don't have any pain like that."
    assert PATIENT.reply_text(case, "Where does it hurt? Your chest?").startswith("Yes, I have")
    # No symptom of the knowledge base is a pain in the foot: the card cannot say.
    assert not PATIENT.reply_text(case, "Any pain in your foot?").startswith(("Yes", "No"))


def test_a_plain_swelling_question_is_answered_from_the_card():
    case = next(c for c in _cases(400) if "leg_swelling" in c.present)
    assert KB.symptom("leg_swelling").phrase in PATIENT.reply_text(case, "Any swelling?")


def test_a_word_inside_a_named_symptom_does_not_ask_about_its_family():
    case = next(c for c in HELD_OUT if PAIN_SYMPTOMS & set(c.present))
    reply = PATIENT.reply_text(case, "Have you thought about hurting yourself?")
    assert reply.count(".") == 1 and "self-harm" in reply, reply


def test_an_off_card_question_gets_i_dont_know_not_a_symptoms_answer():
    cases = [c for c in _cases(300) if "seasonal_trigger" in c.present][:5] + HELD_OUT[:10]
    for question in [
        "Do you have any pets at home?",
        "Do you have a cat or a dog?",
        "Do you exercise regularly?",
    ]:
        for case in cases:
            reply = PATIENT.reply_text(case, question)
            assert not reply.startswith(("Yes", "No")), (question, reply)


def test_a_trigger_asked_about_as_a_trigger_is_heard():
    case = next(c for c in _cases(300) if "seasonal_trigger" in c.present)
    reply = PATIENT.reply_text(case, "Do your symptoms get worse around pets or dust?")
    assert reply.startswith("Yes") and KB.symptom("seasonal_trigger").phrase in reply
