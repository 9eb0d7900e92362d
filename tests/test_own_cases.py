"""Bring your own cases: `grpodx eval --cases-file` and `train.cases_file`, with case cards of the
knowledge base (scripted patient) and AgentClinic's OSCE vignettes (API patient and judge)."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from grpodx.cli import app
from grpodx.config import ApiClientConfig, ConfigError, JudgeConfig, PatientConfig, load_config
from grpodx.env.api_judge import OpenAIJudge
from grpodx.env.api_patient import OpenAIPatient, PatientError
from grpodx.env.judge import IcdJudge, JudgeError
from grpodx.env.patient import Message
from grpodx.medical.case_file import load_case_file, load_cases_for, vignette_opening
from grpodx.medical.cases import CaseSampler, _fingerprint, eval_cases
from grpodx.medical.knowledge import load_knowledge_base
from grpodx.testing.loopback import Fault

RUNNER = CliRunner()
KB = load_knowledge_base()
MEDQA = Path(__file__).resolve().parents[2] / "shared" / "cases" / "agentclinic_medqa.jsonl"
needs_medqa = pytest.mark.skipif(not MEDQA.is_file(), reason=f"AgentClinic's MedQA file is not at {MEDQA}")
SECRET = "sk-own-cases-0123456789abcdef"
FAST = ApiClientConfig(timeout_s=5.0, max_retries=2, backoff_base_s=0.01, backoff_max_s=0.05)

CARDS = [
    # by name, symptom ids; absent given
    {"id": "flu-1", "condition": "Influenza", "age": 34, "sex": "female", "chief_complaint": "fever",
     "present": ["cough", "myalgia"], "absent": ["rash"]},
    # by ICD-10-CM code (without the dot), symptoms by phrase; absent left to its default
    {"condition": "I219", "age": 61, "sex": "male", "chief_complaint": "chest pain",
     "present": ["heavy sweating", "Shortness of Breath"]},
    # by synonym
    {"condition": "flu", "age": 20, "sex": "male", "chief_complaint": "a fever", "present": []},
]  # fmt: skip


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def one_red_line(result, *phrases: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


# ---- case cards in the project's own schema ---------------------------------------------------
def test_own_cards_resolve_names_codes_synonyms_and_phrases(tmp_path):
    cases = load_case_file(write_jsonl(tmp_path / "mine.jsonl", CARDS), KB)
    assert cases.format == "cards" and cases.lines == (1, 2, 3)
    flu, mi, flu2 = cases.cards
    assert [c.case_id for c in cases.cards] == ["flu-1", "mine-0002", "mine-0003"]
    assert (flu.condition, flu.icd10, flu.age, flu.sex) == (
        "Influenza",
        KB.condition("Influenza").icd10,
        34,
        "female",
    )
    assert mi.condition == next(c.name for c in KB.conditions if c.icd10 == "I21.9")
    assert flu2.condition == "Influenza" and flu2.present == ("fever",)  # the chief complaint is present
    assert set(flu.present) == {"fever", "cough", "myalgia"} and flu.absent == ("rash",)
    assert {"diaphoresis", "shortness_of_breath", "chest_pain"} <= set(mi.present)
    assert set(mi.present) | set(mi.absent) == {s.id for s in KB.symptoms}  # absent: every other symptom
    for card in cases.cards:  # identity and split as for a generated card of the same content
        assert card.vignette is None and card.split in ("train", "eval")
        key = _fingerprint(card.condition, card.sex, card.age, card.chief_complaint, card.present)
        assert card.fingerprint() == key


def test_generated_cards_read_as_before():
    card = CaseSampler(KB).case_at(0)
    keys = [
        "case_id",
        "split",
        "seed",
        "condition",
        "icd10",
        "age",
        "sex",
        "chief_complaint",
        "present",
        "absent",
    ]
    assert list(card.to_dict()) == keys  # no `vignette` key in the Parquet `case` column
    assert card.fingerprint() == _fingerprint(
        card.condition, card.sex, card.age, card.chief_complaint, card.present
    )


def test_own_cards_evaluate_with_the_scripted_patient(small_model_dir, tmp_path):
    cases_file = write_jsonl(tmp_path / "mine.jsonl", CARDS)
    args = ["eval", "--cases-file", str(cases_file), f"model.name={small_model_dir}", "episode.max_turns=1"]
    result = RUNNER.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "3 held-out cases (0 failed)" in result.output
    episodes = pq.read_table(tmp_path / "out" / "base.parquet").to_pylist()
    assert [e["case_id"] for e in episodes] == ["flu-1", "mine-0002", "mine-0003"]
    assert [e["condition"] for e in episodes] == [c.condition for c in load_case_file(cases_file, KB).cards]
    assert all(e["valid"] for e in episodes)
    assert set(json.loads(episodes[0]["case"])["present"]) == {"fever", "cough", "myalgia"}
    # --cases N takes the file's first N
    result = RUNNER.invoke(app, [*args, "--cases", "1", "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "one" / "base.parquet").column("case_id").to_pylist() == ["flu-1"]


GOOD = {"condition": "Influenza", "age": 30, "sex": "female", "chief_complaint": "fever", "present": []}


@pytest.mark.parametrize(
    "line, phrases",
    [
        ({**GOOD, "condition": "Influenzza"}, ["line 2, field 'condition'", "did you mean 'Influenza'"]),
        ({**GOOD, "condition": "Z99.9"}, ["line 2, field 'condition'", "Z99.9"]),
        (
            {**GOOD, "present": ["cough", "purple toes"]},
            ["line 2, field 'present'", "'purple toes' is not a symptom"],
        ),
        ({**GOOD, "chief_complaint": "wheezes"}, ["line 2, field 'chief_complaint'"]),
        ({**GOOD, "sex": "f"}, ["line 2, field 'sex'", "'f'"]),
        ({**GOOD, "age": "thirty"}, ["line 2, field 'age'"]),
        (
            {k: v for k, v in GOOD.items() if k != "chief_complaint"},
            ["line 2, field 'chief_complaint': missing"],
        ),
        ({**GOOD, "presnt": []}, ["line 2, field 'presnt'", "did you mean 'present'"]),
        ({**GOOD, "absent": ["fever"]}, ["line 2, field 'absent'", "'fever' is also present"]),
        ({**GOOD, "id": "flu-1"}, ["line 2, field 'id'", "line 1"]),
        ('{"condition": "Influenza", "age": 30,', ["line 2: not valid JSON"]),
        ("[1, 2]", ["line 2: expected a JSON object"]),
        (
            {"OSCE_Examination": {}},
            ["line 2: an AgentClinic OSCE case in a file whose line 1 is a case card"],
        ),
    ],
)
def test_a_bad_line_is_named_by_line_and_field(tmp_path, line, phrases):
    cases_file = write_jsonl(tmp_path / "bad.jsonl", [{**GOOD, "id": "flu-1"}, line])
    result = RUNNER.invoke(app, ["eval", "--cases-file", str(cases_file)])
    one_red_line(result, f"--cases-file {cases_file} line 2", *phrases)


def test_an_empty_or_missing_file_is_named(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    one_red_line(RUNNER.invoke(app, ["eval", "--cases-file", str(empty)]), "holds no cases")
    missing = tmp_path / "nope.jsonl"
    one_red_line(RUNNER.invoke(app, ["eval", "--cases-file", str(missing)]), f"{missing}: cannot read")


# ---- training draws from train.cases_file ---------------------------------------------------
def many_cards(count: int) -> list[dict]:
    return [
        {**GOOD, "age": 18 + i % 60, "sex": ("female", "male")[i % 2], "id": f"c{i}"} for i in range(count)
    ]


def test_the_training_sampler_draws_the_files_train_share(tmp_path):
    cases_file = write_jsonl(tmp_path / "train.jsonl", many_cards(60))
    config = load_config(None, [f"train.cases_file={cases_file}", "train.seed=3"])
    sampler = CaseSampler.for_config(KB, config)
    cases = sampler.cases
    train, held_out = cases.split("train"), cases.split("eval")
    assert train and held_out and len(train) + len(held_out) == 60
    drawn = [sampler.sample() for _ in range(2 * len(train))]
    # each pass draws every training card once, in a shuffled order; no held-out card is trained on
    assert sorted(c.case_id for c in drawn[: len(train)]) == sorted(c.case_id for c in train)
    assert [c.case_id for c in drawn[: len(train)]] != [c.case_id for c in train]
    assert not {c.case_id for c in drawn} & {c.case_id for c in held_out}
    again = CaseSampler.for_config(KB, config)
    assert [again.case_at(i) for i in range(len(drawn))] == drawn  # deterministic (and resumable)
    assert sampler.held_out(5) == held_out[:5] == eval_cases(KB, 5, cases=cases)
    # a checkpoint's sampler state names its cases file; another file (or none) is refused on resume
    state = sampler.state_dict()
    assert state["cases_sha256"] == cases.sha256 and "cases_sha256" not in CaseSampler(KB).state_dict()
    with pytest.raises(ValueError, match="another train.cases_file"):
        CaseSampler.for_config(KB, config).load_state_dict({**state, "cases_sha256": "0" * 64})
    with pytest.raises(ValueError, match="generated cases"):
        CaseSampler(KB, "train", 3).load_state_dict(state)


def test_a_training_file_without_held_out_cases_is_refused(tmp_path):
    cases_file = write_jsonl(tmp_path / "tiny.jsonl", many_cards(60))
    train_only = [card for card, c in zip(many_cards(60), load_case_file(cases_file, KB).cards, strict=True)
                  if c.split == "train"]  # fmt: skip
    write_jsonl(cases_file, train_only)
    with pytest.raises(
        ConfigError, match=r"train.cases_file=.*none of its \d+ cases falls in the held-out share"
    ):
        load_cases_for(load_config(None, [f"train.cases_file={cases_file}"]), KB)
    config = load_config(None, [f"train.cases_file={cases_file}", "train.eval_cases=0"])
    assert CaseSampler.for_config(KB, config).cases is not None


def test_eval_without_cases_file_uses_the_held_out_share_of_train_cases_file(small_model_dir, tmp_path):
    cases_file = write_jsonl(tmp_path / "train.jsonl", many_cards(60))
    held_out = [c.case_id for c in load_case_file(cases_file, KB).split("eval")]
    args = ["eval", f"train.cases_file={cases_file}", f"model.name={small_model_dir}", "episode.max_turns=1"]
    result = RUNNER.invoke(app, [*args, "--cases", "2", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "out" / "base.parquet").column("case_id").to_pylist() == held_out[:2]


# ---- AgentClinic OSCE vignettes -------------------------------------------------------------
@needs_medqa
def test_every_medqa_case_loads_as_a_vignette_without_its_diagnosis():
    cases = load_case_file(MEDQA, KB)
    records = [
        json.loads(line)["OSCE_Examination"] for line in MEDQA.read_text().splitlines() if line.strip()
    ]
    assert cases.format == "osce" and len(cases.cards) == len(records) > 100
    assert len({c.fingerprint() for c in cases.cards}) == len(records)
    assert cases.split("train") and cases.split("eval")
    for card, record in zip(cases.cards, records, strict=True):
        diagnosis = " ".join(record["Correct_Diagnosis"].split())
        known = KB.find_condition(diagnosis) or KB.find_condition(re.sub(r"\s*\([^()]*\)", "", diagnosis))
        assert card.condition == (known.name if known else diagnosis)
        assert card.present == card.absent == () and card.sex in ("female", "male", "unknown")
        actor = record["Patient_Actor"]
        told = " ".join(_leaves(actor))
        assert " ".join(actor["History"].split())[:60] in card.vignette
        assert actor["Symptoms"]["Primary_Symptom"].strip().rstrip(".") in card.vignette
        for secret in ("Physical_Examination_Findings", "Test_Results"):
            for finding in _leaves(record.get(secret, {})):  # results never reach the patient
                if len(finding) > 25 and finding not in told:
                    assert finding not in card.vignette, (card.case_id, finding)
        for text in (card.vignette, vignette_opening(card)):
            assert not re.search(rf"\b{re.escape(diagnosis)}\b", text, re.IGNORECASE), card.case_id
    first = cases.cards[0]
    assert (first.condition, first.icd10, first.age, first.sex) == (
        "Myasthenia gravis",
        "G70.0",
        35,
        "female",
    )
    assert vignette_opening(first) == "I am a 35-year-old woman. I came in because of double vision."


def _leaves(value) -> list[str]:
    if isinstance(value, dict):
        return [text for item in value.values() for text in _leaves(item)]
    if isinstance(value, list):
        return [text for item in value for text in _leaves(item)]
    return [str(value)]


@needs_medqa
def test_osce_cases_are_refused_with_the_scripted_patient_or_an_offline_judge(monkeypatch):
    result = RUNNER.invoke(app, ["eval", "--cases-file", str(MEDQA)])
    one_red_line(
        result, "AgentClinic OSCE vignettes", "only a language-model patient can play", "patient.kind=openai"
    )
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    result = RUNNER.invoke(app, ["eval", "--cases-file", str(MEDQA), "patient.kind=openai"])
    one_red_line(result, "judge.kind=icd", "maps to no ICD-10-CM code", "line 2", "set judge.kind=openai")
    config = load_config(None, [f"train.cases_file={MEDQA}"])
    with pytest.raises(ConfigError, match=f"train.cases_file={re.escape(str(MEDQA))} holds AgentClinic OSCE"):
        CaseSampler.for_config(KB, config)


def test_a_vignette_that_names_its_diagnosis_is_refused(tmp_path):
    osce = {
        "OSCE_Examination": {
            "Patient_Actor": {
                "Demographics": "40-year-old man",
                "History": "He was told he has gout in his toe.",
                "Symptoms": {"Primary_Symptom": "Toe pain", "Secondary_Symptoms": []},
            },
            "Physical_Examination_Findings": {},
            "Test_Results": {},
            "Correct_Diagnosis": "Gout",
        }
    }
    with pytest.raises(
        ConfigError, match=r"line 1, field 'OSCE_Examination.Patient_Actor': names the Correct_Diag"
    ):
        load_case_file(write_jsonl(tmp_path / "leak.jsonl", [osce]), KB)
    del osce["OSCE_Examination"]["Correct_Diagnosis"]
    with pytest.raises(ConfigError, match=r"line 1, field 'OSCE_Examination.Correct_Diagnosis': missing"):
        load_case_file(write_jsonl(tmp_path / "nodx.jsonl", [osce]), KB)


@needs_medqa
def test_the_offline_scale_scores_a_vignette_against_its_code():
    cases = load_case_file(MEDQA, KB)
    judge = IcdJudge(KB)
    mg = cases.cards[0]  # Myasthenia gravis, G70.0 by the ICD-10-CM descriptions
    assert judge.verdict(mg, "Myasthenia gravis").category == "exact"
    assert judge.verdict(mg, "Myasthenia gravis without (acute) exacerbation").category == "exact"  # G70.00
    assert judge.verdict(mg, "Toxic myoneural disorders").category == "category"  # G70.1
    assert judge.verdict(mg, "Lambert-Eaton syndrome in neoplastic disease").category == "block"  # G73.1
    assert judge.verdict(mg, "Influenza").score == 0.0
    unmapped = next(c for c in cases.cards if not c.icd10)
    with pytest.raises(JudgeError, match="only the API judge"):
        judge.verdict(unmapped, "Influenza")


# ---- the whole OSCE path with the API patient and judge on the loopback server ---------------
@needs_medqa
def test_medqa_end_to_end_with_the_api_patient_and_judge(server, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    count = 6
    args = ["eval", "--cases-file", str(MEDQA), "--cases", str(count), "--out", str(tmp_path)]
    args += ["patient.kind=openai", f"patient.base_url={server.base_url}"]
    args += ["judge.kind=openai", f"judge.base_url={server.base_url}"]
    result = RUNNER.invoke(app, args)  # the tiny doctor of configs/tiny-cpu.yaml: it asks, then diagnoses
    assert result.exit_code == 0, result.output
    assert f"{count} held-out cases (0 failed)" in result.output
    cards = {c.case_id: c for c in load_case_file(MEDQA, KB).cards[:count]}
    episodes = pq.read_table(tmp_path / "base.parquet").to_pylist()
    assert [e["case_id"] for e in episodes] == list(cards)
    assert all(e["valid"] and e["condition"] == cards[e["case_id"]].condition for e in episodes)
    by_opening = {vignette_opening(c): c for c in cards.values()}
    patient_calls = judge_calls = 0
    for request in server.requests:
        messages = request.body["messages"]
        if request.body.get("response_format"):  # the judge
            user = messages[1]["content"]
            card = next(c for opening, c in by_opening.items() if f"Patient: {opening}" in user)
            assert card.icd10 == ""  # only diagnoses without a code go to the model
            assert f"Hidden condition: {card.condition}\n" in user
            judge_calls += 1
        elif messages[0]["content"] != "Reply with OK.":  # the patient (not the preflight probe)
            prompt = messages[0]["content"]
            card = by_opening[messages[1]["content"]]  # the doctor's first turn follows the opening
            assert card.vignette in prompt
            assert card.condition.lower() not in prompt.lower()
            patient_calls += 1
    assert patient_calls >= 1 and judge_calls >= 1
    # the cases with a code were scored offline, by the ICD-10-CM scale
    for episode in episodes:
        if cards[episode["case_id"]].icd10 and episode["diagnosis"]:
            assert re.search(r"\(\w\d\d[.\w]*\) vs ", episode["judge_rationale"]), episode["judge_rationale"]


@needs_medqa
def test_the_judge_gets_each_gold_diagnosis_and_the_patient_never_says_it(server):
    cases = load_case_file(MEDQA, KB).cards
    judge_config = JudgeConfig(kind="openai", model="judge-sim", base_url=server.base_url, client=FAST)
    patient_config = PatientConfig(kind="openai", model="patient-sim", base_url=server.base_url, client=FAST)

    async def run():
        judge = OpenAIJudge.from_config(judge_config, SecretStr(SECRET), KB)
        patient = OpenAIPatient.from_config(patient_config, SecretStr(SECRET), KB)
        try:
            transcript = [
                Message("patient", "I feel unwell."),
                Message("doctor", "Final diagnosis: Influenza."),
            ]
            unmapped = [c for c in cases if not c.icd10]
            verdicts = [await judge.score(c, "Influenza", transcript) for c in unmapped]
            named = await judge.score(unmapped[0], unmapped[0].condition, transcript)
            # the patient plays the vignette: the loopback model answers from its symptom list
            first = cases[0]
            reply = await patient.reply(
                first, [Message("patient", "hi"), Message("doctor", "Any double vision?")]
            )
            server.inject(Fault("content", content="I think it is myasthenia gravis."), times=3)
            with pytest.raises(PatientError, match="names the hidden condition"):
                await patient.reply(first, [Message("doctor", "What do you think you have?")])
            return unmapped, verdicts, named, reply
        finally:
            await judge.aclose()
            await patient.aclose()

    unmapped, verdicts, named, reply = asyncio.run(run())
    judged = [r.body["messages"][1]["content"] for r in server.requests if r.body.get("response_format")]
    assert len(judged) == len(unmapped) + 1 and len(unmapped) > 50
    for card, user in zip(unmapped, judged, strict=False):
        assert re.search(r"^Hidden condition: (.*)$", user, re.MULTILINE).group(1) == card.condition
    assert all(v.category == "wrong" for v in verdicts) and named.category == "exact"
    assert reply == "Yes, I have Double vision."
    prompts = [r.body["messages"][0]["content"] for r in server.requests if not r.body.get("response_format")]
    assert all(cases[0].vignette in p and "myasthenia" not in p.lower() for p in prompts)


def test_a_vignette_card_keeps_its_identity_apart_from_its_seed():
    card = replace(CaseSampler(KB).case_at(0), vignette="About you:\n- History: none")
    assert "vignette" in card.to_dict()
    assert card.fingerprint() != replace(card, vignette="About you:\n- History: other").fingerprint()
    assert card.fingerprint() == replace(card, seed=card.seed + 1).fingerprint()
