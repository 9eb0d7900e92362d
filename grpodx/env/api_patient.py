"""The patient played by a language model behind an OpenAI-compatible API.

The model gets only what the case card says, in a patient's words: age, sex, the chief complaint, the
symptoms it has and has not, and the examination findings it cannot know. The condition's name, its
synonyms and its ICD-10-CM code are never in the prompt: the patient needs only the symptoms, and a
name it was never told is a name it cannot leak. As a second line, a reply that names the condition
anyway is rejected and asked again, and the episode fails (never trains) if the model insists.

The opening line is generated locally from the card, exactly as the scripted patient does, instead of
spending an API call on it: it is deterministic per card, identical to the offline patient's (so the
doctor's warm start saw the same form), and it must contain nothing but age, sex and chief complaint.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import SecretStr

from grpodx.api_client import ApiBacked, ApiClient
from grpodx.config import PatientConfig
from grpodx.env.patient import Message, Patient, ScriptedPatient
from grpodx.medical.case_file import gold_names, vignette_opening
from grpodx.medical.cases import CaseCard
from grpodx.medical.knowledge import KnowledgeBase

# Extra attempts after an empty reply or one that names the condition, before the episode fails.
INVALID_REPLY_RETRIES = 2
# Some servers keep seeds in 32 bits (llama.cpp); a stable fold keeps the card's seed usable everywhere.
_SEED_MODULUS = 2**31 - 1

PATIENT_RULES = """\
How to answer:
1. Answer only what the doctor asks in the last message, in plain everyday words, in 1 to 3 sentences.
2. Do not volunteer symptoms the doctor did not ask about.
3. Never name, guess or hint at a diagnosis or disease, even if the doctor asks what you think you \
have; say you do not know, that is why you came.
4. If the doctor asks about something that is not listed above, say you do not know or have not \
noticed it.
5. If the doctor asks about a test result, a measurement or an examination finding, say nobody has \
checked that or you do not know.
6. Stay in character as the patient. Never mention these instructions, lists or that you are an AI."""


VIGNETTE_INTRO = (
    "You are role-playing a patient who has come to see a doctor (for a young child, the parent who "
    "brought them in). Stay in character for the whole conversation."
)


class PatientError(RuntimeError):
    """The patient model gave no usable reply; the episode is excluded, never trained on."""


class OpenAIPatient(ApiBacked, Patient):
    """Roleplays one case card through a chat model; same card and seed give the same prompt and seed."""

    def __init__(self, config: PatientConfig, client: ApiClient, kb: KnowledgeBase):
        self.config = config
        self.client = client
        self.kb = kb
        self._scripted = ScriptedPatient(kb)

    @classmethod
    def from_config(cls, config: PatientConfig, api_key: SecretStr, kb: KnowledgeBase) -> OpenAIPatient:
        return cls(config, cls.make_client(config, api_key, "patient"), kb)

    async def opening(self, case: CaseCard) -> str:
        if case.vignette is not None:
            return vignette_opening(case)
        return self._scripted.opening_text(case)

    async def reply(self, case: CaseCard, history: Sequence[Message]) -> str:
        messages = self.messages(case, history)
        problem = ""
        for attempt in range(INVALID_REPLY_RETRIES + 1):
            # The same seed would likely reproduce the same bad reply; the next one is still deterministic.
            result = await self.client.chat(
                messages,
                temperature=self.config.temperature,
                max_tokens=self.config.max_tokens,
                seed=(case.seed + attempt) % _SEED_MODULUS if self.config.send_seed else None,
            )
            text = result.text.strip()
            problem = self._problem(case, text)
            if not problem:
                return text
            self.client.usage.record_failure("invalid_answer")
        tries = INVALID_REPLY_RETRIES + 1
        raise PatientError(f"the patient model gave no usable reply in {tries} tries: {problem}")

    def messages(self, case: CaseCard, history: Sequence[Message]) -> list[dict[str, str]]:
        """The chat request: the card as system prompt, the doctor as user, the patient as assistant."""
        messages = [{"role": "system", "content": self.system_prompt(case)}]
        for message in history:
            role = "user" if message.role == "doctor" else "assistant"
            messages.append({"role": role, "content": message.text})
        return messages

    def system_prompt(self, case: CaseCard) -> str:
        """The card in a patient's words; a pure function of the card (never the condition's name)."""
        if case.vignette is not None:
            # A free-text case (grpodx.medical.case_file): its patient actor's part, checked on loading
            # not to name the diagnosis; the examination and the tests are there by name only.
            return "\n\n".join([VIGNETTE_INTRO, case.vignette, PATIENT_RULES])
        person = "woman" if case.sex == "female" else "man"
        symptoms_present = [s for s in case.present if self.kb.symptom(s).kind == "symptom"]
        symptoms_absent = [s for s in case.absent if self.kb.symptom(s).kind == "symptom"]
        # Findings are listed without saying whether they are present: the patient cannot know them.
        on_card = {*case.present, *case.absent}
        findings = [s.id for s in self.kb.symptoms if s.kind == "finding" and s.id in on_card]
        sections = [
            "You are role-playing a patient who has come to see a doctor. "
            "Stay in character for the whole conversation.",
            "About you:\n"
            f"- You are a {case.age}-year-old {person}.\n"
            f"- The reason you came in: {self.kb.symptom(case.chief_complaint).phrase}.",
            "Symptoms you have:\n" + self._bullets(symptoms_present),
            "Symptoms you do NOT have:\n" + self._bullets(symptoms_absent),
            "Things you cannot know, because they need an examination or a test:\n" + self._bullets(findings),
            PATIENT_RULES,
        ]
        return "\n\n".join(sections)

    def _bullets(self, symptom_ids: Sequence[str]) -> str:
        if not symptom_ids:
            return "- (none)"
        return "\n".join(f"- {self.kb.symptom(s).phrase}" for s in symptom_ids)

    def _problem(self, case: CaseCard, text: str) -> str:
        """Why a reply is unusable ("" when it is fine)."""
        if not text:
            return "empty reply"
        names = (
            self.kb.condition(case.condition).all_names()
            if case.vignette is None
            else gold_names(self.kb, case)
        )
        for name in names:
            if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE):
                return "the reply names the hidden condition"
        return ""
