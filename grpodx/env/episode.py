"""One episode: the doctor talks with the patient of one case card, then the judge scores it.

Token-in/token-out: the episode is a single growing token sequence in Phi-4's chat format. The doctor's
sampled tokens (its closing ``<|im_end|>`` included) carry ``loss_mask = 1`` and the logprobs they were
sampled with; system, patient and role-header tokens carry ``loss_mask = 0``. Nothing is re-tokenised:
the learner trains on exactly the ids the engine produced.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from grpodx.config import EpisodeConfig, RewardConfig
from grpodx.dialogue import ChatCodec, parse_final_diagnosis, strip_reasoning
from grpodx.engines.base import GenerationEngine, SamplingParams
from grpodx.env.judge import Judge, Verdict
from grpodx.env.patient import Message, Patient
from grpodx.env.reward import RewardParts, compute_reward
from grpodx.medical.bayes import InterviewAssessment, assess_interview
from grpodx.medical.cases import CaseCard
from grpodx.medical.knowledge import KnowledgeBase


@dataclass
class EpisodeResult:
    case: CaseCard
    adapter_version: int  # the version the episode started on
    turn_versions: list[int] = field(default_factory=list)  # the version each doctor turn sampled from
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    doctor_turns_raw: list[str] = field(default_factory=list)
    history: list[Message] = field(default_factory=list)
    diagnosis: str | None = None
    final_text: str | None = None
    malformed_turns: int = 0
    truncated: bool = False
    verdict: Verdict | None = None
    reward: RewardParts | None = None
    assessment: InterviewAssessment | None = None
    error: str | None = None
    generation_s: float = 0.0
    patient_s: float = 0.0
    judge_s: float = 0.0

    @property
    def valid(self) -> bool:
        """False when the patient or judge failed: such an episode is reported, never trained on."""
        return self.error is None and self.reward is not None

    @property
    def turns(self) -> int:
        return len(self.doctor_turns_raw)

    @property
    def num_doctor_tokens(self) -> int:
        return sum(self.loss_mask)

    def questions_asked(self) -> list[str]:
        """The visible doctor turns before the diagnosis."""
        turns = [m.text for m in self.history if m.role == "doctor"]
        return turns[:-1] if self.diagnosis is not None else turns

    def transcript(self, with_reasoning: bool) -> str:
        """The conversation as text; without reasoning it is exactly what the patient and judge saw."""
        lines = []
        raw_turns = iter(self.doctor_turns_raw)
        for message in self.history:
            if message.role == "doctor":
                text = next(raw_turns) if with_reasoning else message.text
                lines.append(f"Doctor: {text}")
            else:
                lines.append(f"Patient: {message.text}")
        return "\n".join(lines)

    def _extend(self, ids: list[int], mask: int, logprobs: list[float] | None = None) -> None:
        self.token_ids.extend(ids)
        self.loss_mask.extend([mask] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))


@dataclass
class EpisodeRunner:
    """Everything an episode needs besides the case; one per rollout worker."""

    engine: GenerationEngine
    chat: ChatCodec
    patient: Patient
    judge: Judge
    kb: KnowledgeBase
    episode_config: EpisodeConfig
    reward_config: RewardConfig
    # Called with each message as it joins the conversation: (role, visible text, the doctor's raw
    # turn with its reasoning, or None for the patient). `grpodx chat` prints turns as they come.
    on_message: Callable[[str, str, str | None], None] | None = None

    def sampling(self, seed: int | None = None, temperature: float | None = None) -> SamplingParams:
        settings = self.episode_config.sampling
        return SamplingParams(
            temperature=settings.temperature if temperature is None else temperature,
            top_p=settings.top_p,
            max_new_tokens=settings.max_new_tokens,
            stop_token_ids=(self.chat.im_end_id,),
            seed=seed,
        )

    async def run(
        self,
        case: CaseCard,
        adapter_version: int,
        sampling: SamplingParams,
        newest_version: Callable[[], int] | None = None,
    ) -> EpisodeResult:
        """One episode from ``adapter_version``; with ``newest_version``, each later turn samples from
        the newest adapter the engine serves by then (behaviour logprobs are recorded per token, so the
        learner's importance ratio stays exact across the switch)."""
        result = EpisodeResult(case=case, adapter_version=adapter_version)
        # A failed patient, engine or judge call is recorded with its stage and excluded from the
        # gradient; it is never given a default score.
        try:
            await self.converse(result, sampling, newest_version)
        except Exception as exc:  # noqa: BLE001
            result.error = f"conversation: {type(exc).__name__}: {exc}"
            return result
        started = time.perf_counter()
        try:
            result.verdict = await self.judge.score(case, result.diagnosis, result.history)
        except Exception as exc:  # noqa: BLE001
            result.error = f"judge: {type(exc).__name__}: {exc}"
            return result
        result.judge_s = time.perf_counter() - started
        result.reward = compute_reward(
            self.reward_config,
            self.kb,
            case,
            judge_score=result.verdict.score,
            diagnosis=result.diagnosis,
            final_text=result.final_text,
            malformed_turns=result.malformed_turns,
        )
        if case.vignette is None:  # the exact posterior exists only for cards of the knowledge base
            result.assessment = assess_interview(self.kb, case, result.questions_asked(), result.diagnosis)
        return result

    async def converse(
        self,
        result: EpisodeResult,
        sampling: SamplingParams,
        newest_version: Callable[[], int] | None = None,
    ) -> None:
        """The conversation alone, into ``result``: until a final diagnosis, the last turn, or the token
        budget. :meth:`run` adds the judge and the reward."""
        config, chat, case = self.episode_config, self.chat, result.case
        result._extend(chat.message("system", config.system_prompt), 0)
        started = time.perf_counter()
        opening = await self.patient.opening(case)
        result.patient_s += time.perf_counter() - started
        self._add(result, Message("patient", opening))
        result._extend(chat.message("user", opening) + chat.generation_prompt(), 0)

        for turn in range(config.max_turns):
            if len(result.token_ids) + sampling.max_new_tokens > config.max_total_tokens:
                result.truncated = True
                return
            started = time.perf_counter()
            version = result.adapter_version
            if turn > 0 and newest_version is not None:
                version = max(version, newest_version())
            result.turn_versions.append(version)
            generation = await self.engine.generate(result.token_ids, sampling, version)
            result.generation_s += time.perf_counter() - started
            result._extend(generation.token_ids, 1, generation.logprobs)
            if generation.finish_reason != "stop":
                # The doctor ran out of tokens mid-turn; close the message so the format stays valid,
                # but the closing token was not sampled, so it carries no loss.
                result.truncated = True
                result._extend([chat.im_end_id], 0)
            raw = chat.decode(generation.token_ids)
            stripped = strip_reasoning(raw)
            result.malformed_turns += int(stripped.malformed)
            result.doctor_turns_raw.append(raw)
            self._add(result, Message("doctor", stripped.visible), raw)
            diagnosis = parse_final_diagnosis(stripped.visible)
            if diagnosis is not None:
                result.diagnosis, result.final_text = diagnosis, stripped.visible
                return
            if turn == config.max_turns - 1:
                return
            started = time.perf_counter()
            reply = await self.patient.reply(case, result.history)
            result.patient_s += time.perf_counter() - started
            self._add(result, Message("patient", reply))
            result._extend(chat.message("user", reply), 0)
            if turn == config.max_turns - 2 and config.last_turn_notice:
                result._extend(chat.message("system", config.last_turn_notice), 0)
            result._extend(chat.generation_prompt(), 0)

    def _add(self, result: EpisodeResult, message: Message, raw: str | None = None) -> None:
        result.history.append(message)
        if self.on_message is not None:
            self.on_message(message.role, message.text, raw)
