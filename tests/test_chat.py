"""`grpodx chat` with the shipped tiny doctor: typed conversations (piped stdin) and simulated ones."""

from __future__ import annotations

import asyncio
import json

from typer.testing import CliRunner

from grpodx.chat import Console, chat_with_doctor
from grpodx.cli import app
from grpodx.config import load_config

RUNNER = CliRunner()
OPENING = "I am a 40-year-old woman. I came in because of chest pain."


def _chat(tmp_path, typed: list[str], *args: str):
    result = RUNNER.invoke(
        app, ["chat", "--out", str(tmp_path), *args], input="".join(f"{line}\n" for line in typed)
    )
    assert result.exit_code == 0, result.output
    return result.output


def _saved(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "conversations.jsonl").read_text().splitlines()]


def test_a_typed_conversation_reaches_a_diagnosis_with_the_reasoning_hidden(tmp_path):
    output = _chat(tmp_path, [OPENING, "No.", "No.", "No.", "No.", "/quit"])
    assert "The doctor's final diagnosis: " in output
    assert "reason>" not in output  # hidden unless asked for
    (conversation,) = _saved(tmp_path)
    doctor = [m for m in conversation["messages"] if m["role"] == "doctor"]
    assert conversation["messages"][0] == {"role": "patient", "text": OPENING}
    assert conversation["diagnosis"] and f"Final diagnosis: {conversation['diagnosis']}" in doctor[-1]["text"]
    assert all("<reason>" in m["with_reasoning"] and "reason>" not in m["text"] for m in doctor)
    assert f"conversations saved to {tmp_path / 'conversations.jsonl'}" in output


def test_the_reasoning_shows_when_asked_and_a_conversation_can_start_over(tmp_path):
    # Answers left over after the diagnosis are not taken for a new conversation; Enter starts one.
    typed = [OPENING, "/reasoning", "No.", "No.", "No.", "No.", "", OPENING, "/restart", "/quit"]
    output = _chat(tmp_path, typed)
    shown = output.split("(the doctor's reasoning is now shown")[1]
    assert "<reason>" in shown and "</reason>" in shown
    assert "(a new conversation)" in output
    assert len(_saved(tmp_path)) == 2  # the finished one and the one left at its first turn


def test_the_end_of_the_input_ends_the_chat_cleanly(tmp_path):
    output = _chat(tmp_path, [OPENING])
    assert "Traceback" not in output
    (conversation,) = _saved(tmp_path)
    assert [m["role"] for m in conversation["messages"]][:2] == ["patient", "doctor"]


def test_ctrl_c_ends_the_chat_and_keeps_the_conversation(tmp_path):
    typed = iter([OPENING])

    def read(prompt: str) -> str:
        try:
            return next(typed)
        except StopIteration:
            raise KeyboardInterrupt from None

    shown: list[str] = []
    config = load_config("configs/tiny-cpu.yaml")
    saved = asyncio.run(chat_with_doctor(config, None, Console(read=read, write=shown.append), tmp_path, 0.5))
    assert saved == tmp_path / "conversations.jsonl"
    (conversation,) = _saved(tmp_path)
    assert conversation["messages"][0]["text"] == OPENING and any(
        line.startswith("Doctor: ") for line in shown
    )


def test_the_doctor_interviews_a_simulated_patient(tmp_path):
    output = _chat(tmp_path, [], "--simulate", "--condition", "acute cystitis")
    assert output.startswith("Patient: I am a ")
    assert "Doctor: " in output and "<reason>" in output  # shown, dimmed, when watching
    assert "Hidden condition: Acute cystitis (N30.00)" in output
    assert "Verdict: " in output and "Reward " in output
    (conversation,) = _saved(tmp_path)
    assert conversation["case"]["condition"] == "Acute cystitis" and conversation["reward"] is not None


def test_bad_choices_are_one_sentence(tmp_path):
    unknown = RUNNER.invoke(
        app, ["chat", "--simulate", "--condition", "acute cystits", "--out", str(tmp_path)]
    )
    assert unknown.exit_code == 2 and "did you mean Acute cystitis" in unknown.output
    without_simulate = RUNNER.invoke(app, ["chat", "--case", "3"])
    assert without_simulate.exit_code == 2 and "add --simulate" in without_simulate.output
