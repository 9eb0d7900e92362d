"""One episode, token-in/token-out: masks, logprobs, hidden reasoning, diagnosis and reward."""

from __future__ import annotations

import asyncio

import pytest

from grpodx.config import EpisodeConfig, RewardConfig
from grpodx.dialogue import ChatCodec
from grpodx.engines.base import AdapterWeights, Generation, GenerationEngine, SamplingParams
from grpodx.env.episode import EpisodeRunner
from grpodx.env.judge import IcdJudge
from grpodx.env.patient import Patient, ScriptedPatient
from grpodx.medical.cases import CaseSampler
from grpodx.medical.knowledge import load_knowledge_base

KB = load_knowledge_base()


class ReplayEngine(GenerationEngine):
    """Plays fixed doctor turns, as tokens, with made-up logprobs; records the prompts it saw."""

    def __init__(self, tokenizer, turns: list[str], finish_last: bool = True):
        self.chat = ChatCodec(tokenizer)
        self.turns = list(turns)
        self.prompts: list[list[int]] = []
        self.finish_last = finish_last

    async def generate(self, prompt_token_ids, sampling: SamplingParams, adapter_version=None) -> Generation:
        self.prompts.append(list(prompt_token_ids))
        text = self.turns.pop(0)
        ids = self.chat.encode(text)
        stop = self.finish_last or self.turns
        if stop:
            ids = ids + [self.chat.im_end_id]
        logprobs = [-0.1 * (i + 1) for i in range(len(ids))]
        return Generation(ids, logprobs, "stop" if stop else "length", adapter_version or 0)

    def load_adapter(self, adapter: AdapterWeights) -> None: ...
    def unload_adapter(self, version: int) -> None: ...
    @property
    def latest_version(self) -> int:
        return 0

    def loaded_versions(self) -> list[int]:
        return [0]


class RecordingPatient(Patient):
    def __init__(self):
        self.inner = ScriptedPatient(KB)
        self.seen: list[str] = []

    async def opening(self, case):
        return await self.inner.opening(case)

    async def reply(self, case, history):
        self.seen.extend(m.text for m in history if m.role == "doctor")
        return await self.inner.reply(case, history)


def _case():
    return CaseSampler(KB, "train", 0).case_at(0)


def _run(tokenizer, turns, finish_last=True, max_turns=5):
    engine = ReplayEngine(tokenizer, turns, finish_last)
    patient = RecordingPatient()
    runner = EpisodeRunner(
        engine=engine,
        chat=ChatCodec(tokenizer),
        patient=patient,
        judge=IcdJudge(KB),
        kb=KB,
        episode_config=EpisodeConfig(max_turns=max_turns),
        reward_config=RewardConfig(),
    )
    result = asyncio.run(runner.run(_case(), 0, runner.sampling(seed=1)))
    return result, engine, patient


def test_loss_mask_covers_exactly_the_doctor_tokens(small_tokenizer):
    case = _case()
    symptom = KB.symptom(next(s for s in case.absent if KB.symptom(s).kind == "symptom"))
    turns = [
        f"<reason>secret thought about {case.condition}</reason> Do you have {symptom.phrase}?",
        f"<reason>settled</reason> Final diagnosis: {case.condition}.",
    ]
    result, engine, patient = _run(small_tokenizer, turns)
    chat = ChatCodec(small_tokenizer)
    assert len(result.token_ids) == len(result.loss_mask) == len(result.logprobs)
    # Rebuild the doctor tokens from the mask: exactly the generated ids, in order.
    doctor_ids = [t for t, m in zip(result.token_ids, result.loss_mask, strict=True) if m]
    expected = [t for text in turns for t in chat.encode(text) + [chat.im_end_id]]
    assert doctor_ids == expected
    # Patient text never sits under the mask.
    patient_ids = chat.encode(result.history[2].text)
    for start in range(len(result.token_ids) - len(patient_ids) + 1):
        if result.token_ids[start : start + len(patient_ids)] == patient_ids:
            assert not any(result.loss_mask[start : start + len(patient_ids)])
            break
    else:
        pytest.fail("patient reply not found in the token sequence")
    # Logprobs are the engine's, at the doctor's positions, and zero elsewhere.
    assert [lp for lp, m in zip(result.logprobs, result.loss_mask, strict=True) if not m] == [0.0] * (
        len(result.loss_mask) - sum(result.loss_mask)
    )
    # Each generate call saw the whole sequence so far (token-in/token-out, no re-tokenising).
    assert result.token_ids[: len(engine.prompts[1])] == engine.prompts[1]
    assert result.diagnosis == case.condition and result.reward.judge == 1.0 and result.turns == 2


def test_token_sequence_equals_the_chat_template(small_tokenizer):
    case = _case()
    turns = ["Do you have a question?", f"Final diagnosis: {case.condition}."]
    result, _, _ = _run(small_tokenizer, turns)
    messages = [{"role": "system", "content": EpisodeConfig().system_prompt}]
    for message, raw in zip(result.history, [None, turns[0], None, turns[1]], strict=True):
        role = "user" if message.role == "patient" else "assistant"
        messages.append({"role": role, "content": raw if raw is not None else message.text})
    templated = small_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert result.token_ids == list(templated)


def test_reasoning_never_reaches_the_patient_even_when_unclosed(small_tokenizer):
    case = _case()
    turns = [
        f"Do you have pain? <reason>I bet it is {case.condition}",
        f"{case.condition} is likely</reason> Any fever?",
        f"Final diagnosis: {case.condition}.",
    ]
    result, _, patient = _run(small_tokenizer, turns)
    assert patient.seen and all(case.condition not in text for text in patient.seen)
    assert all("reason" not in text for text in patient.seen)
    assert result.malformed_turns == 2
    assert case.condition in result.transcript(with_reasoning=True)
    assert "<reason>" not in result.transcript(with_reasoning=False)
    assert result.reward.format_errors == 2


def test_reasoning_tags_with_whitespace_never_reach_the_patient(small_tokenizer):
    case = _case()
    turns = [
        f"<reason >I bet it is {case.condition}</reason > Any fever?",
        f"< reason >{case.condition} again</ reason > Any cough?",
        f"Final diagnosis: {case.condition}.",
    ]
    result, _, patient = _run(small_tokenizer, turns)
    assert set(patient.seen) == {"Any fever?", "Any cough?"}
    assert result.malformed_turns == 0 and result.reward.format_errors == 0


def test_two_different_final_diagnoses_are_penalised_as_a_hedge(small_tokenizer):
    case = _case()
    other = next(c.name for c in KB.conditions if c.name != case.condition)
    hedged, _, _ = _run(small_tokenizer, [f"Final diagnosis: {case.condition}.\nFinal diagnosis: {other}."])
    assert hedged.diagnosis == f"{case.condition} or {other}"
    assert hedged.reward.hedged and hedged.reward.judge == 1.0  # judged on the first, like any hedge
    repeated, _, _ = _run(
        small_tokenizer, [f"Final diagnosis: {case.condition}.\nFinal diagnosis: {case.condition}"]
    )
    assert repeated.diagnosis == case.condition and not repeated.reward.hedged
    assert hedged.reward.total == pytest.approx(repeated.reward.total - RewardConfig().hedge_penalty)


def test_no_final_diagnosis_within_max_turns(small_tokenizer):
    result, engine, _ = _run(small_tokenizer, ["Do you have a cough?"] * 3, max_turns=3)
    assert result.turns == 3 and result.diagnosis is None
    assert result.reward.total == 0.0 and result.verdict.category == "none"
    assert len(engine.prompts) == 3


def test_truncated_turn_is_closed_without_loss(small_tokenizer):
    result, _, _ = _run(small_tokenizer, ["Do you have a"], finish_last=False, max_turns=1)
    chat = ChatCodec(small_tokenizer)
    assert result.truncated
    assert result.token_ids[-1] == chat.im_end_id and result.loss_mask[-1] == 0


def test_failing_judge_marks_the_episode_invalid(small_tokenizer):
    class BrokenJudge(IcdJudge):
        async def score(self, case, diagnosis, transcript):
            raise RuntimeError("judge API returned garbage")

    engine = ReplayEngine(small_tokenizer, ["Final diagnosis: flu."])
    runner = EpisodeRunner(
        engine,
        ChatCodec(small_tokenizer),
        ScriptedPatient(KB),
        BrokenJudge(KB),
        KB,
        EpisodeConfig(),
        RewardConfig(),
    )
    result = asyncio.run(runner.run(_case(), 0, runner.sampling()))
    assert not result.valid and "garbage" in result.error and result.reward is None
