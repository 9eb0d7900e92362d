"""Dialogue rules: Phi-4's chat format, hidden ``<reason>`` blocks, and the final diagnosis line.

The doctor thinks inside ``<reason>…</reason>``. Those blocks stay in the doctor's own token context;
whatever leaves the doctor (to the patient, to the judge, to a transcript a person reads) goes through
:func:`strip_reasoning` first. Stripping errs towards hiding: an unclosed ``<reason>`` hides the rest
of the turn, and a ``</reason>`` with no opening hides everything before it. A tag is recognised in
any case and with whitespace inside (``< /Reason >``): a model that misspells a tag that way still
means it, and whatever it meant to hide must not reach the patient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IM_START = "<|im_start|>"
IM_SEP = "<|im_sep|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
PAD = "<|dummy_85|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_SEP, IM_END, PAD]

# Phi-4's own chat template (microsoft/phi-4 tokenizer_config.json), so that the tiny doctor's
# tokenizer formats conversations exactly as the production model's does.
PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

DOCTOR_SYSTEM_PROMPT = (
    "You are a doctor. Ask one question per turn. Think inside <reason></reason>, which the patient "
    "never sees. Within 5 turns, write 'Final diagnosis: <condition>' and the next steps."
)

# Said by the system before the doctor's last turn: a small model cannot count turns, and a real one
# should not have to guess where the limit is.
LAST_TURN_NOTICE = "This is your last turn: give your final diagnosis now."

REASON_OPEN = "<reason>"
REASON_CLOSE = "</reason>"
_TAG = re.compile(r"<\s*(?P<close>/)?\s*reason\s*>", re.IGNORECASE)
# A tag cut short at the end of a turn ("...<reas") must not reach the patient either.
_PARTIAL_TAG_AT_END = re.compile(r"<\s*/?\s*r(e(a(s(o(n)?)?)?)?)?\s*$", re.IGNORECASE)
# The diagnosis runs to the end of its line (or of the next, after a bare "Final diagnosis:") but
# never into another "Final diagnosis", which is matched on its own.
_FINAL = re.compile(
    r"final\s+diagnosis\s*[:\-–]\s*(?P<diagnosis>(?:(?!final\s+diagnosis)[^\n])*)", re.IGNORECASE
)
_NEXT_STEPS = re.compile(r"\bnext\s+steps?\b\s*[:\-–]?\s*", re.IGNORECASE)
_HEDGE_SPLIT = re.compile(r"\s*(?:\bor\b|\bversus\b|\bvs\.?|/|;|\band/or\b)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class StrippedTurn:
    """A doctor turn as others see it, plus what the stripping had to repair."""

    visible: str
    malformed: bool
    """The reasoning markup was unbalanced; a naive pair-matching strip would have leaked it."""


def strip_reasoning(text: str) -> StrippedTurn:
    """Remove every ``<reason>`` block, hiding rather than leaking when the markup is unbalanced."""
    pieces: list[str] = []
    depth = 0
    malformed = False
    position = 0
    for match in _TAG.finditer(text):
        closing = match.group("close") is not None
        if depth == 0:
            segment = text[position : match.start()]
            if closing:
                # An orphan closing tag: what came before it was reasoning the doctor forgot to open.
                malformed = True
                pieces.clear()
            else:
                pieces.append(segment)
        if not closing:
            if depth > 0:
                malformed = True
            depth += 1
        elif depth > 0:
            depth -= 1
        position = match.end()
    if depth > 0:
        malformed = True  # unclosed: the rest of the turn is reasoning
    else:
        pieces.append(text[position:])
    visible = "".join(pieces)
    partial = _PARTIAL_TAG_AT_END.search(visible)
    if partial:
        malformed = True
        visible = visible[: partial.start()]
    return StrippedTurn(visible=_tidy(visible), malformed=malformed)


def _tidy(text: str) -> str:
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line)


def parse_final_diagnosis(visible_text: str) -> str | None:
    """The diagnosis named on a ``Final diagnosis: …`` line, up to a "next steps" clause, or None.

    Several different final diagnoses in one message are a hedge, and are returned as one
    (``"flu or pneumonia"``) so that the judge and the reward treat them as any other hedge; the same
    diagnosis written twice is still one.
    """
    diagnoses: dict[str, str] = {}
    for match in _FINAL.finditer(visible_text):
        diagnosis = _diagnosis_on_line(match.group("diagnosis"))
        if diagnosis:
            diagnoses.setdefault(" ".join(diagnosis.lower().split()), diagnosis)
    return " or ".join(diagnoses.values()) or None


def _diagnosis_on_line(text: str) -> str:
    steps = _NEXT_STEPS.search(text)
    if steps:
        text = text[: steps.start()]
    return text.strip().rstrip(".,;:").strip()


def next_steps(final_text: str) -> str | None:
    """What a final answer says to do next ("Next steps: …"), if it says."""
    match = _NEXT_STEPS.search(final_text)
    return final_text[match.end() :].strip() or None if match else None


def diagnosis_alternatives(diagnosis: str) -> list[str]:
    """The conditions a final answer names: ``"flu or pneumonia"`` gives two, a hedge."""
    parts = [part.strip(" .,") for part in _HEDGE_SPLIT.split(diagnosis)]
    return [part for part in parts if part]


def render_message(role: str, content: str) -> str:
    """One message in Phi-4's format; the unit the episode appends token by token."""
    return f"{IM_START}{role}{IM_SEP}{content}{IM_END}"


def generation_prompt(role: str = "assistant") -> str:
    return f"{IM_START}{role}{IM_SEP}"


class ChatCodec:
    """Token ids of chat messages for one tokenizer: the unit the episode appends, turn by turn.

    Special tokens split the text before BPE runs, so encoding message by message gives the same ids
    as encoding the whole conversation with the chat template; ``tests/test_dialogue.py`` checks it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
        self.pad_id = tokenizer.convert_tokens_to_ids(PAD)
        self._prompt_ids = {role: self.encode(generation_prompt(role)) for role in ("assistant", "user")}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def message(self, role: str, content: str) -> list[int]:
        return self.encode(render_message(role, content))

    def generation_prompt(self, role: str = "assistant") -> list[int]:
        return list(self._prompt_ids[role])

    def decode(self, token_ids: list[int]) -> str:
        """Text of generated ids, special tokens dropped (the closing ``<|im_end|>`` among them)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
