"""`grpodx chat`: talk with the doctor as its patient, or watch it interview a simulated patient.

Both go through the training code: the same engine (transformers on CPU, vLLM on GPU), the same
episode runner in Phi-4's chat format, the same turn limit and last-turn notice. The human patient
is a :class:`~grpodx.env.patient.Patient` whose answers are typed; the doctor's ``<reason>`` blocks
are hidden unless asked for, exactly as the simulated patient never sees them. Every conversation is
appended to ``conversations.jsonl``, with and without the reasoning.
"""

from __future__ import annotations

import difflib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from grpodx.config import Config, ConfigError
from grpodx.dialogue import next_steps
from grpodx.env.episode import EpisodeResult
from grpodx.env.patient import Message, Patient
from grpodx.medical.cases import CaseCard, eval_cases
from grpodx.medical.knowledge import KnowledgeBase
from grpodx.rollout import RolloutWorker

COMMANDS = {
    "/reasoning": "show or hide the doctor's hidden reasoning",
    "/restart": "start a new conversation",
    "/quit": "leave (Ctrl-D and Ctrl-C too)",
}
_REASON_BLOCK = re.compile(r"(<\s*reason\s*>.*?(?:<\s*/\s*reason\s*>|$))", re.IGNORECASE | re.DOTALL)
# The human patient has no case card: the runner needs one only to pass it to the patient.
HUMAN_CASE = CaseCard(
    case_id="chat",
    split="eval",
    seed=0,
    condition="",
    icd10="",
    age=0,
    sex="female",
    chief_complaint="",
    present=(),
    absent=(),
)


class ConversationEnded(Exception):
    """The person typed a command that ends the conversation (or closed the input)."""

    def __init__(self, command: str):
        super().__init__(command)
        self.command = command


@dataclass
class Console:
    """Where a conversation is shown and typed: ``read`` returns None at the end of the input."""

    read: Callable[[str], str | None]
    write: Callable[[str], None]
    dim: Callable[[str], str] = lambda text: text
    show_reasoning: bool = False

    def doctor_turn(self, visible: str, raw: str) -> None:
        if not self.show_reasoning:
            self.write(f"Doctor: {visible}")
            return
        self.write("Doctor: " + _REASON_BLOCK.sub(lambda m: self.dim(m.group(1)), raw.strip()))


@dataclass
class HumanPatient(Patient):
    """The person at the console plays the patient; lines starting with "/" are commands."""

    console: Console
    commands_seen: list[str] = field(default_factory=list)

    async def opening(self, case: CaseCard) -> str:
        return self._answer("You (why you came in): ")

    async def reply(self, case: CaseCard, history: Sequence[Message]) -> str:
        return self._answer("You: ")

    def _answer(self, prompt: str) -> str:
        while True:
            line = self.console.read(prompt)
            if line is None:
                raise ConversationEnded("/quit")
            line = line.strip()
            if line == "/reasoning":
                self.console.show_reasoning = not self.console.show_reasoning
                shown = "shown" if self.console.show_reasoning else "hidden"
                self.console.write(f"(the doctor's reasoning is now {shown}, from its next turn)")
            elif line in ("/restart", "/quit"):
                raise ConversationEnded(line)
            elif line.startswith("/"):
                self.console.write("commands: " + "; ".join(f"{c}: {h}" for c, h in COMMANDS.items()))
            elif line:
                return line


def conversation_record(result: EpisodeResult, doctor: str, extra: dict | None = None) -> dict:
    """One saved conversation: every message, the doctor's with and without its reasoning."""
    raw_turns = iter(result.doctor_turns_raw)
    messages = []
    for message in result.history:
        entry = {"role": message.role, "text": message.text}
        if message.role == "doctor":
            entry["with_reasoning"] = next(raw_turns)
        messages.append(entry)
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "doctor": doctor,
        "messages": messages,
        "diagnosis": result.diagnosis,
        "next_steps": next_steps(result.final_text) if result.final_text else None,
        "turns": result.turns,
        **(extra or {}),
    }


def save_conversation(directory: Path, record: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "conversations.jsonl"
    with path.open("a") as file:
        file.write(json.dumps(record) + "\n")
    return path


def describe_ending(result: EpisodeResult, max_turns: int) -> list[str]:
    """What the person is told when the conversation ends."""
    if result.diagnosis is not None:
        lines = [f"The doctor's final diagnosis: {result.diagnosis}"]
        steps = next_steps(result.final_text or "")
        if steps:
            lines.append(f"Next steps: {steps}")
        return lines
    if result.truncated:
        return ["The conversation reached the doctor's token budget without a diagnosis."]
    return [f"The doctor gave no final diagnosis within {max_turns} turns."]


# ---- sessions -----------------------------------------------------------------------------------
def conversation_dir(config: Config, checkpoint: str | None, out: Path | None) -> Path:
    """``out``, else ``chats/`` in the checkpoint's run (``<run>/checkpoints/step-N``), else under
    ``train.run_dir``."""
    if out is not None:
        return out
    if checkpoint and "://" not in checkpoint:
        path = Path(checkpoint).resolve()
        if path.parent.name == "checkpoints":
            return path.parents[1] / "chats"
    return Path(config.train.run_dir) / "chats"


def _doctor(config: Config, checkpoint: str | None, patient: Patient, judge) -> tuple[RolloutWorker, int]:
    """A rollout worker serving the base doctor or ``checkpoint``'s adapter, and that version."""
    from grpodx.local import read_adapter
    from grpodx.models import best_device, doctor_source

    worker = RolloutWorker(
        "chat", config, doctor_source(config), patient, judge, device=best_device(config.ray.rollout_num_gpus)
    )
    if checkpoint is None:
        return worker, 0
    return worker, worker.load_adapter(read_adapter(checkpoint, 1))


async def chat_with_doctor(
    config: Config, checkpoint: str | None, console: Console, out_dir: Path, temperature: float
) -> Path | None:
    """Conversations between the person at ``console`` (the patient) and the doctor, until /quit, the
    end of the input or Ctrl-C; returns the file they were saved to (None when nothing was said)."""
    from grpodx.env import make_judge

    patient = HumanPatient(console)
    worker, version = _doctor(config, checkpoint, patient, make_judge(config))

    def show(role: str, text: str, raw: str | None) -> None:
        if role == "doctor":
            console.doctor_turn(text, raw or text)

    worker.runner.on_message = show
    saved: Path | None = None
    doctor = checkpoint or "base"
    console.write(f"You are the patient; the doctor ({doctor}) has {config.episode.max_turns} turns.")
    console.write("commands: " + "; ".join(f"{c}: {h}" for c, h in COMMANDS.items()))
    try:
        for conversation in range(1_000_000):
            result = EpisodeResult(case=HUMAN_CASE, adapter_version=version)
            ended: str | None = None
            try:
                await worker.runner.converse(result, worker.runner.sampling(conversation, temperature))
            except ConversationEnded as end:
                ended = end.command
            finally:
                if result.history:
                    saved = save_conversation(out_dir, conversation_record(result, doctor))
            if ended == "/quit":
                break
            if ended is None:
                for line in describe_ending(result, config.episode.max_turns):
                    console.write(line)
                if not _wants_another(console):
                    break
            console.write("(a new conversation)")
    except KeyboardInterrupt:
        console.write("")
    finally:
        await worker.engine.close()
    return saved


def _wants_another(console: Console) -> bool:
    """After a diagnosis: Enter starts a new conversation, /quit or the end of the input leaves."""
    while True:
        answer = console.read("[Enter] for a new conversation, /quit to leave: ")
        if answer is None or answer.strip() == "/quit":
            return False
        if not answer.strip():
            return True


async def simulate_interview(
    config: Config,
    checkpoint: str | None,
    case: CaseCard,
    console: Console,
    out_dir: Path,
    temperature: float,
    api_key=None,
) -> EpisodeResult:
    """The doctor interviews the simulated patient of ``case``; turns are shown as they come, then
    the hidden condition, the verdict and the reward."""
    from grpodx.env import make_judge, make_patient
    from grpodx.preflight import check_api_backends

    await check_api_backends(config, api_key)
    patient, judge = make_patient(config, api_key), make_judge(config, api_key)
    worker, version = _doctor(config, checkpoint, patient, judge)

    def show(role: str, text: str, raw: str | None) -> None:
        if role == "doctor":
            console.doctor_turn(text, raw or text)
        else:
            console.write(f"Patient: {text}")

    worker.runner.on_message = show
    try:
        result = await worker.runner.run(case, version, worker.runner.sampling(case.seed, temperature))
    finally:
        await worker.engine.close()
        for part in (patient, judge):
            close = getattr(part, "aclose", None)
            if close is not None:
                await close()
    for line in describe_outcome(result, config.episode.max_turns):
        console.write(line)
    extra = {"case": case.to_dict(), "verdict": result.verdict.category if result.verdict else None}
    extra["reward"] = result.reward.total if result.reward else None
    path = save_conversation(out_dir, conversation_record(result, checkpoint or "base", extra))
    console.write(f"saved to {path}")
    return result


def describe_outcome(result: EpisodeResult, max_turns: int) -> list[str]:
    """The end of a simulated interview: what the doctor said, what was hidden, how it was scored."""
    lines = describe_ending(result, max_turns)
    case = result.case
    lines.append(f"Hidden condition: {case.condition} ({case.icd10}); patient {case.age}, {case.sex}")
    if result.error:
        return [*lines, f"The episode failed and is not scored: {result.error}"]
    verdict, reward = result.verdict, result.reward
    lines.append(f"Verdict: {verdict.category} (score {verdict.score:.2f}): {verdict.rationale}")
    lines.append(
        f"Reward {reward.total:.3f} = judge {reward.judge:.2f}, guideline {reward.guideline:.2f}, "
        f"hedged {reward.hedged}, format errors {reward.format_errors}"
    )
    return lines


def find_case(kb: KnowledgeBase, index: int | None, condition: str | None, search: int = 5000) -> CaseCard:
    """Held-out case ``index``, or the first held-out case of ``condition`` (a name or synonym)."""
    if condition is None:
        return eval_cases(kb, (index or 0) + 1)[index or 0]
    wanted = condition.strip().lower()
    matching = [c.name for c in kb.conditions if wanted in (n.lower() for n in c.all_names())]
    if not matching:
        close = difflib.get_close_matches(condition, [c.name for c in kb.conditions], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"--condition {condition}: not a condition of the knowledge base{hint}")
    for case in eval_cases(kb, search):
        if case.condition == matching[0]:
            return case
    raise ConfigError(f"--condition {condition}: no held-out case of it among the first {search}")
