"""The scripted resident whose dialogues warm-start the tiny doctor.

It reasons with the exact Bayes posterior of the case generator (``cases.symptom_probability``):
uniform prior over conditions, demographics, the chief complaint, then one likelihood per answer. Its
conclusions are sound; its *habits* are a resident's, and they are what reinforcement learning is
there to change:

- **Which question.** Most of the time it asks for the commonest symptom of its leading candidate
  ("Confirm X"), which often fits the runner-up just as well; only ``separate_share`` of its
  questions ask what tells its two leading candidates apart ("Separate them"). With four questions
  of the second kind the exact posterior names the right condition in about 81% of held-out cases,
  with the first kind about 74%.
- **When to conclude.** After its first question it concludes with probability equal to its
  confidence in the leading candidate, so it often stops at 60-70% certainty; each further question
  would still have paid (about 0.66 mean reward for its habits against 0.82 for always separating
  and asking four questions, with exact inference; ``/docs/results.md``).

Each habit is one word of its reasoning, written right after the two leading candidates:
``<reason>Asked rash: no. So far: 1 cough yes, 2 rash no. Consider X or Y. Separate them.</reason> Do you
have …?``, ``… Confirm X.</reason> Do you have …?`` or ``… Conclude X.</reason> Final diagnosis: X.``. The
tiny doctor learns the whole dialogue by imitation, so its plan word carries the resident's mix, and
GRPO can move that one decision with a clear credit signal: the plan is the lever, the question that
follows it was learned by imitation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from grpodx.dialogue import REASON_CLOSE, REASON_OPEN
from grpodx.env.patient import ScriptedPatient
from grpodx.medical.bayes import bayes_model
from grpodx.medical.cases import CaseCard
from grpodx.medical.knowledge import KnowledgeBase

PLAN_CONFIRM = "Confirm"
PLAN_SEPARATE = "Separate"
PLAN_CONCLUDE = "Conclude"
# Share of a coverage interview's questions asked about any symptom at all (see ScriptedDoctor.dialogue).
COVERAGE_OFF_TARGET_SHARE = 1 / 3


@dataclass(frozen=True)
class ScriptedDialogue:
    case: CaseCard
    messages: list[tuple[str, str]]  # (role, content) in chat-template roles: user / assistant / system
    diagnosis: str
    plans: tuple[str, ...] = ()  # the plan word of each doctor turn
    # Message index -> (start, end): characters of that message's content the warm start does not
    # learn from (in a coverage interview, the plan words and questions; see ScriptedDoctor.dialogue).
    unlearned: dict[int, tuple[int, int]] = field(default_factory=dict)


class ScriptedDoctor:
    """The resident: sound inference, a confirmation habit and a hasty stop (module docstring)."""

    def __init__(self, kb: KnowledgeBase, separate_share: float = 0.35, last_turn_notice: str | None = None):
        if not 0.0 <= separate_share <= 1.0:
            raise ValueError(f"separate_share must be in [0, 1], got {separate_share}")
        self.kb = kb
        self.last_turn_notice = last_turn_notice
        self.model = bayes_model(kb)
        self.patient = ScriptedPatient(kb)
        self.separate_share = separate_share

    def top_conditions(self, log_post: np.ndarray, k: int) -> list[str]:
        order = np.argsort(-log_post, kind="stable")[:k]
        return [self.kb.conditions[i].name for i in order if np.isfinite(log_post[i])]

    def confirming_question(self, leading: str, asked: set[str]) -> str | None:
        """The commonest symptom of the leading candidate not asked yet."""
        options = [sid for sid in self.model.askable if sid not in asked]
        if not options:
            return None
        return max(options, key=lambda sid: self.model.probability(leading, sid))  # first of ties

    def separating_question(self, first: str, second: str, asked: set[str]) -> str | None:
        """The symptom whose frequency differs most between the two leading candidates."""
        options = [sid for sid in self.model.askable if sid not in asked]
        if not options:
            return None
        probability = self.model.probability
        return max(options, key=lambda sid: abs(probability(first, sid) - probability(second, sid)))

    def plan(self, log_post: np.ndarray, questions_asked: int, last_turn: bool, rng: random.Random) -> str:
        if last_turn:
            return PLAN_CONCLUDE
        # Concludes with probability equal to its confidence, but never before one question.
        if questions_asked > 0 and rng.random() < float(self.model.normalise(log_post).max()):
            return PLAN_CONCLUDE
        return self.question_plan(rng)

    def question_plan(self, rng: random.Random, separate_share: float | None = None) -> str:
        share = self.separate_share if separate_share is None else separate_share
        return PLAN_SEPARATE if rng.random() < share else PLAN_CONFIRM

    def dialogue(
        self, case: CaseCard, rng: random.Random, max_turns: int = 5, questions: int | None = None
    ) -> ScriptedDialogue:
        """One interview of ``case`` with the resident's habits.

        With ``questions`` it is a *coverage* interview of exactly that many questions, for the warm
        start to learn concluding from long dialogues without learning to ask more: the plan words and
        questions, which are not the resident's choices there, are marked unlearned (only its
        restatement and candidates are learned), and a third of the questions are any symptom at all,
        so that the doctor also learns to reason after the off-target questions it will ask itself.
        """
        if questions is not None and not 0 < questions < max_turns:
            raise ValueError(f"questions must be in [1, {max_turns - 1}], got {questions}")
        log_post = self.model.log_prior(case)
        messages = [("user", self.patient.opening_text(case))]
        evidence = Evidence(self.kb, present=[case.chief_complaint])
        plans: list[str] = []
        unlearned: dict[int, tuple[int, int]] = {}
        for turn in range(max_turns):
            candidates = self.top_conditions(log_post, 2)
            last_turn = turn == max_turns - 1
            coverage = questions is not None and not last_turn
            if not coverage:
                plan = self.plan(log_post, turn, last_turn, rng)
            else:
                plan = PLAN_CONCLUDE if turn == questions else self.question_plan(rng, 0.5)
            symptom_id = None
            if plan == PLAN_SEPARATE and len(candidates) == 2:
                symptom_id = self.separating_question(candidates[0], candidates[1], evidence.asked())
            elif plan != PLAN_CONCLUDE:
                plan = PLAN_CONFIRM
                symptom_id = self.confirming_question(candidates[0], evidence.asked())
            if coverage and symptom_id is not None and rng.random() < COVERAGE_OFF_TARGET_SHARE:
                symptom_id = rng.choice([s for s in self.model.askable if s not in evidence.asked()])
            if symptom_id is None:
                plan = PLAN_CONCLUDE
            plans.append(plan)
            thought, (start, end) = reasoning(evidence.summary(), candidates, plan)
            if plan == PLAN_CONCLUDE:
                if coverage:
                    unlearned[len(messages)] = (start, end)  # only the word: what follows is sound
                messages.append(("assistant", thought + " " + final_answer(self.kb, candidates[0])))
                break
            question = f"Do you have {self.kb.symptom(symptom_id).phrase}?"
            if coverage:
                unlearned[len(messages)] = (start, len(thought) + 1 + len(question))
            messages.append(("assistant", f"{thought} {question}"))
            messages.append(("user", self.patient.reply_text(case, question)))
            present = symptom_id in case.present
            log_post = self.model.update(log_post, symptom_id, present)
            evidence.add(symptom_id, present)
            if self.last_turn_notice and turn == max_turns - 2:
                messages.append(("system", self.last_turn_notice))
        return ScriptedDialogue(case, messages, candidates[0], tuple(plans), unlearned)


def reasoning(evidence: str, candidates: list[str], plan: str) -> tuple[str, tuple[int, int]]:
    """The hidden reasoning of one turn: the evidence, the two leading candidates, the plan word; and
    where the plan word is, with the space before it (where a token starts)."""
    head = f"{REASON_OPEN}{evidence} Consider {' or '.join(candidates)}."
    step = {PLAN_CONFIRM: f" {candidates[0]}.", PLAN_SEPARATE: " them."}.get(plan, f" {candidates[0]}.")
    return f"{head} {plan}{step}{REASON_CLOSE}", (len(head), len(head) + 1 + len(plan))


class Evidence:
    """What the patient has said so far, restated in every reasoning block.

    A tiny doctor cannot gather answers scattered over the whole dialogue reliably; with the evidence
    rewritten next to each conclusion, each answer is one copy away from where the conclusion is
    drawn, so the warm-started doctor's diagnosis actually depends on its questions (which is what
    gives reinforcement learning something to improve: which questions, how many).

    The form is chosen for copying: the block opens with the answer just heard ("Asked fever: no."),
    then every answer so far in the order heard, numbered ("So far: 1 cough yes, 2 rash no, 3 fever
    no."), which is the previous block's list with the new answer appended. Two lists split by yes and
    no (the first form) made a 1.4 M-parameter doctor lose its place: after four answers it restated
    them correctly in under 5% of its own dialogues. One list without numbers (the second) did not fix
    it: teacher-forced on the resident's four-question interviews, the doctor of that recipe restated
    the list right in 34% of 200 held-out cases after three questions and in 1 of 200 after four,
    repeating or skipping items ("flank no, flank no, flank no"): it loses its place in the list.
    The number of the next item says which item comes next.
    """

    def __init__(self, kb: KnowledgeBase, present: list[str]):
        self.kb = kb
        self.answers: list[tuple[str, bool]] = [(symptom_id, True) for symptom_id in present]
        self.heard_any = False

    def add(self, symptom_id: str, present: bool) -> None:
        self.answers.append((symptom_id, present))
        self.heard_any = True

    def asked(self) -> set[str]:
        return {symptom_id for symptom_id, _ in self.answers}

    def item(self, symptom_id: str, present: bool) -> str:
        return f"{self.kb.symptom(symptom_id).keywords[0]} {'yes' if present else 'no'}"

    def summary(self) -> str:
        items = (f"{number} {self.item(*answer)}" for number, answer in enumerate(self.answers, start=1))
        so_far = "So far: " + ", ".join(items) + "."
        if not self.heard_any:
            return so_far
        symptom_id, present = self.answers[-1]
        return f"Asked {self.kb.symptom(symptom_id).keywords[0]}: {'yes' if present else 'no'}. {so_far}"


def final_answer(kb: KnowledgeBase, diagnosis: str) -> str:
    """The visible final turn: the diagnosis and the next steps it calls for."""
    steps = [step.name for step in kb.condition(diagnosis).next_steps]
    text = f"Final diagnosis: {diagnosis}."
    if steps:
        text += " Next steps: " + ", ".join(steps) + "."
    return text
