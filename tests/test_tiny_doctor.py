"""The tiny doctor: Phi-4's format, a deterministic build, and a warm start that beats guessing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from grpodx.config import load_config
from grpodx.dialogue import (
    IM_END,
    IM_SEP,
    IM_START,
    PAD,
    PHI4_CHAT_TEMPLATE,
    REASON_CLOSE,
    REASON_OPEN,
    ChatCodec,
    parse_final_diagnosis,
    strip_reasoning,
)
from grpodx.evaluation import episode_rows, paired_difference, summarize
from grpodx.local import evaluate_doctors
from grpodx.medical.bayes import bayes_model
from grpodx.medical.cases import CaseSampler
from grpodx.medical.knowledge import load_knowledge_base
from grpodx.models import doctor_source, load_doctor
from grpodx.tiny import build, scripted
from grpodx.tiny.build import (
    SHIPPED_DIR,
    compare,
    encode_dialogue,
    rebuild,
    recipe_hash,
    scripted_dialogues,
    shipped_recipe,
    snapshot,
    tiny_doctor_path,
)
from grpodx.tiny.scripted import PLAN_CONCLUDE, PLAN_CONFIRM, PLAN_SEPARATE, ScriptedDoctor
from tests.conftest import save_perturbed_adapter

KB = load_knowledge_base()


def test_tokenizer_carries_phi4_tokens_and_template(small_tokenizer):
    for token in (IM_START, IM_SEP, IM_END, PAD):
        ids = small_tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1, token
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text = small_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = "<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|>U<|im_end|>"
    assert text == expected + "<|im_start|>assistant<|im_sep|>"
    assert small_tokenizer.eos_token == IM_END and small_tokenizer.pad_token == PAD
    chat = ChatCodec(small_tokenizer)
    assert chat.decode(chat.encode("Do you have a fever?") + [chat.im_end_id]) == "Do you have a fever?"


def _thought(turn: str) -> str:
    return turn[len(REASON_OPEN) : turn.index(REASON_CLOSE)]


def test_scripted_dialogues_follow_the_rules():
    episode = load_config(None).episode
    dialogues = scripted_dialogues(60, seed=5, episode=episode)
    assert [d.messages for d in dialogues] == [d.messages for d in scripted_dialogues(60, 5, episode)]
    for dialogue in dialogues:
        doctor_turns = [c for role, c in dialogue.messages if role == "assistant"]
        assert 2 <= len(doctor_turns) <= episode.max_turns
        assert len(dialogue.plans) == len(doctor_turns)
        for turn, plan in zip(doctor_turns, dialogue.plans, strict=True):
            assert turn.startswith(REASON_OPEN) and REASON_CLOSE in turn
            assert _thought(turn).split(". ")[-1].split()[0] == plan
            assert dialogue.case.condition not in strip_reasoning(turn).visible or turn is doctor_turns[-1]
        assert dialogue.plans[-1] == PLAN_CONCLUDE and PLAN_CONCLUDE not in dialogue.plans[:-1]
        assert _thought(doctor_turns[-1]).endswith(f"Conclude {dialogue.diagnosis}.")
        assert parse_final_diagnosis(strip_reasoning(doctor_turns[-1]).visible) == dialogue.diagnosis
        notices = [c for role, c in dialogue.messages if role == "system"]
        assert len(notices) == (1 if len(doctor_turns) == episode.max_turns else 0)


def test_scripted_reasoning_restates_every_answer_so_far():
    """Each reasoning block opens with the answer just heard, then lists the chief complaint and every
    answer so far in the order heard, numbered."""
    episode = load_config(None).episode
    for dialogue in scripted_dialogues(40, seed=9, episode=episode):
        case = dialogue.case
        heard, latest = [f"{KB.symptom(case.chief_complaint).keywords[0]} yes"], ""
        turns = [(role, content) for role, content in dialogue.messages if role != "system"]
        for (role, content), following in zip(turns, turns[1:] + [("end", "")], strict=True):
            if role != "assistant":
                continue
            numbered = ", ".join(f"{number} {item}" for number, item in enumerate(heard, start=1))
            expected = f"{latest}So far: {numbered}."
            assert _thought(content).startswith(expected), (_thought(content), expected)
            if following[0] == "user":
                (asked,) = KB.symptoms_mentioned(strip_reasoning(content).visible)
                answer = "yes" if asked in case.present else "no"
                keyword = KB.symptom(asked).keywords[0]
                heard.append(f"{keyword} {answer}")
                latest = f"Asked {keyword}: {answer}. "
                assert following[1].lower().startswith(answer)


def _replay(dialogue):
    """The resident's posterior before each of its turns, rebuilt from the dialogue's own answers."""
    model = bayes_model(KB)
    log_post = model.log_prior(dialogue.case)
    for role, content in dialogue.messages:
        if role != "assistant":
            continue
        yield content, log_post
        for symptom_id in KB.symptoms_mentioned(strip_reasoning(content).visible):
            log_post = model.update(log_post, symptom_id, symptom_id in dialogue.case.present)


def test_resident_asks_what_its_plan_says():
    """Confirm: the leading candidate's commonest unasked symptom; Separate: the symptom whose frequency
    differs most between the two leading candidates. Candidates are the posterior's top two."""
    model = bayes_model(KB)
    config = load_config(None, ["model.tiny.coverage_share=0"])  # the resident's own interviews only
    seen = set()
    for dialogue in scripted_dialogues(150, seed=3, episode=config.episode, model_config=config.model):
        asked = {dialogue.case.chief_complaint}
        for (content, log_post), plan in zip(_replay(dialogue), dialogue.plans, strict=True):
            order = [i for i in np.argsort(-log_post, kind="stable")[:2] if np.isfinite(log_post[i])]
            candidates = [KB.conditions[i].name for i in order]
            assert f"Consider {' or '.join(candidates)}." in _thought(content)
            first, second = (candidates * 2)[:2]  # one candidate: it can only be confirmed
            seen.add(plan)
            if plan == PLAN_CONCLUDE:
                continue
            (symptom_id,) = KB.symptoms_mentioned(strip_reasoning(content).visible)
            options = [s for s in model.askable if s not in asked]
            if plan == PLAN_CONFIRM:
                best = max(model.probability(first, s) for s in options)
                assert model.probability(first, symptom_id) == best
            else:
                gap = [abs(model.probability(first, s) - model.probability(second, s)) for s in options]
                assert abs(
                    model.probability(first, symptom_id) - model.probability(second, symptom_id)
                ) == max(gap)
            asked.add(symptom_id)
    assert seen == {PLAN_CONFIRM, PLAN_SEPARATE, PLAN_CONCLUDE}


def test_resident_habits_are_the_configured_ones():
    """Separate in separate_share of its questions; after the first question it concludes as often as
    it is confident (the posterior of its leading candidate), which is what GRPO can improve on."""
    model = bayes_model(KB)
    config = load_config(None, ["model.tiny.separate_share=0.25"])
    dialogues = scripted_dialogues(2500, seed=1, episode=config.episode, model_config=config.model)
    dialogues = [d for d in dialogues if not d.unlearned]  # the resident's own (no fixed length)
    questions = [p for d in dialogues for p in d.plans if p != PLAN_CONCLUDE]
    assert abs(questions.count(PLAN_SEPARATE) / len(questions) - 0.25) < 0.03
    confidence, concluded = [], []
    for dialogue in dialogues:
        replay = list(_replay(dialogue))
        for turn, ((_, log_post), plan) in enumerate(zip(replay, dialogue.plans, strict=True)):
            if 0 < turn < config.episode.max_turns - 1:  # free choices: not the first nor the forced last
                confidence.append(float(model.normalise(log_post).max()))
                concluded.append(plan == PLAN_CONCLUDE)
    assert abs(sum(concluded) / len(concluded) - sum(confidence) / len(confidence)) < 0.03
    confident = [c for p, c in zip(concluded, confidence, strict=True) if p]
    hesitant = [c for p, c in zip(concluded, confidence, strict=True) if not p]
    assert sum(confident) / len(confident) > sum(hesitant) / len(hesitant) + 0.1


def test_coverage_interviews_teach_concluding_but_not_asking(small_tokenizer):
    """coverage_share of the dialogues ask a fixed 1-4 questions, a third of them off target; the warm
    start learns their restatements and conclusions, not their plan words and questions, which are
    not the resident's choices there."""
    config = load_config(None, ["model.tiny.coverage_share=0.4"])
    dialogues = scripted_dialogues(600, seed=2, episode=config.episode, model_config=config.model)
    fixed = [d for d in dialogues if d.unlearned]
    assert abs(len(fixed) / len(dialogues) - 0.4) < 0.06
    assert {len(d.plans) - 1 for d in fixed} == {1, 2, 3, 4}
    chat = ChatCodec(small_tokenizer)
    model, off_target, questions = bayes_model(KB), 0, 0
    for dialogue in fixed:
        doctor_messages = [i for i, (role, _) in enumerate(dialogue.messages) if role == "assistant"]
        # Every turn is hidden from its plan word on, but a conclusion forced by the turn limit.
        free_turns = len(dialogue.plans) - (len(dialogue.plans) == config.episode.max_turns)
        assert sorted(dialogue.unlearned) == doctor_messages[:free_turns]
        expected_hidden = []
        for (index, (start, end)), plan in zip(
            sorted(dialogue.unlearned.items()), dialogue.plans, strict=False
        ):
            content = dialogue.messages[index][1]
            assert content[start:].split()[0] == plan
            if plan == PLAN_CONCLUDE:
                assert content[start:end] == f" {PLAN_CONCLUDE}"
            else:
                assert end == len(content) and content.endswith("?")
            expected_hidden.append(content[start:end])
        for (content, log_post), plan in zip(_replay(dialogue), dialogue.plans, strict=False):
            if plan == PLAN_CONCLUDE:
                break
            (symptom_id,) = KB.symptoms_mentioned(strip_reasoning(content).visible)
            leading = KB.conditions[int(np.argmax(log_post))].name
            questions += 1
            off_target += model.probability(leading, symptom_id) < 0.05
        ids, mask = encode_dialogue(chat, config.episode.system_prompt, dialogue)
        doctor = _doctor_mask(chat, config, dialogue)
        assert all(d or not m for d, m in zip(doctor, mask, strict=True))  # learns only doctor tokens
        hidden = chat.decode([t for t, m, d in zip(ids, mask, doctor, strict=True) if d and not m])
        assert hidden == "".join(expected_hidden)
    assert 0.15 < off_target / questions < 0.5  # about a third of them ask something rare for the leader


def _doctor_mask(chat, config, dialogue):
    """1 on every doctor token (content and <|im_end|>), as an episode's loss mask has it."""
    mask = [0] * len(chat.message("system", config.episode.system_prompt))
    for role, content in dialogue.messages:
        if role == "assistant":
            mask += [0] * len(chat.generation_prompt()) + [1] * (len(chat.encode(content)) + 1)
        else:
            mask += [0] * len(chat.message(role, content))
    return mask


def test_scripted_doctor_is_far_better_than_guessing():
    doctor = ScriptedDoctor(KB)
    sampler = CaseSampler(KB, "train", 11)
    rng = random.Random(0)
    right = sum(
        doctor.dialogue(case, rng).diagnosis == case.condition
        for case in (sampler.sample() for _ in range(200))
    )
    assert right / 200 > 20 / len(KB.conditions)


_SMALL_RECIPE = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "model.tiny.intermediate_size=64",
    "model.tiny.vocab_size=600",
    "model.tiny.warmstart_dialogues=48",
    "model.tiny.warmstart_epochs=1",
    "model.tiny.warmstart_batch_size=16",
]


def test_build_is_deterministic_and_cached(tmp_path):
    config = load_config(None, [f"model.cache_dir={tmp_path}", *_SMALL_RECIPE])
    first = tiny_doctor_path(config.model, config.episode, progress=False)
    assert first.parent == tmp_path
    weights = load_file(first / "model.safetensors")
    recipe = json.loads((first / "recipe.json").read_text())
    assert recipe["recipe_hash"] == recipe_hash(config.model, config.episode)
    assert recipe["recipe"]["tiny"]["warmstart_dialogues"] == 48
    # Stored in half precision, loaded in single precision: the model that trains is what was saved.
    assert {tensor.dtype for tensor in weights.values()} == {torch.float16}
    model, _ = load_doctor(str(first))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"].float())
    # Cached: the same recipe returns the same directory without rebuilding.
    mtime = (first / "model.safetensors").stat().st_mtime
    assert tiny_doctor_path(config.model, config.episode, progress=False) == first
    assert (first / "model.safetensors").stat().st_mtime == mtime
    # Rebuilt from scratch elsewhere: identical files.
    second = rebuild(config.model, config.episode, tmp_path / "again", progress=False)
    assert "identical to the shipped doctor" in compare(snapshot(first), snapshot(second))
    for name, tensor in load_file(second / "model.safetensors").items():
        assert torch.equal(tensor, weights[name]), name
    # A different recipe is a different model.
    changed = load_config(None, [*_SMALL_RECIPE, "model.tiny.seed=99"])
    assert recipe_hash(changed.model, changed.episode) != recipe_hash(config.model, config.episode)


def test_compare_names_what_differs(tmp_path):
    from safetensors.torch import save

    one = {"a": torch.zeros(3, dtype=torch.float16), "b": torch.ones(2, dtype=torch.float16)}
    two = {"a": torch.zeros(3, dtype=torch.float16), "b": torch.full((2,), 1.5, dtype=torch.float16)}
    first = {"model.safetensors": save(one), "tokenizer.json": b"{}", "recipe.json": b"1"}
    second = {"model.safetensors": save(two), "tokenizer.json": b"{}", "recipe.json": b"2"}
    text = compare(first, second)
    assert "differs from the shipped doctor" in text
    assert "1 of 2 tensors, largest difference 0.5" in text and "tokenizer.json: identical" in text


def test_recipe_covers_the_resident_the_prompt_and_the_training_code(monkeypatch):
    """What changes the doctor changes its hash: a test of the shipped doctor below relies on it."""
    config = load_config("configs/tiny-cpu.yaml")
    base = recipe_hash(config.model, config.episode)
    for override in ("model.tiny.separate_share=0.5", "episode.max_turns=4", "episode.system_prompt=Hi"):
        changed = load_config("configs/tiny-cpu.yaml", [override])
        assert recipe_hash(changed.model, changed.episode) != base, override
    # A change in the resident's behaviour, with no config change, shows in its dialogues.
    monkeypatch.setattr(
        scripted.ScriptedDoctor,
        "separating_question",
        lambda self, first, second, asked: self.confirming_question(first, asked),
    )
    assert recipe_hash(config.model, config.episode) != base
    monkeypatch.undo()
    assert recipe_hash(config.model, config.episode) == base
    # The tokenizer, model and training code are hashed by source (an edit of any of them is new source).
    assert build.supervised_warm_start in build._RECIPE_CODE and build.build_tiny_doctor in build._RECIPE_CODE

    def edited_warm_start(*args, **kwargs):
        return None

    monkeypatch.setattr(build, "_RECIPE_CODE", (*build._RECIPE_CODE[:-1], edited_warm_start))
    assert recipe_hash(config.model, config.episode) != base


def test_shipped_doctor_is_the_one_its_recipe_builds():
    """Fails when the recipe changed and the shipped files were not rebuilt (see grpodx/tiny/build.py)."""
    config = load_config("configs/tiny-cpu.yaml")
    shipped = shipped_recipe()
    assert shipped is not None, "grpodx/tiny/doctor/ is missing; run grpodx build-tiny --rebuild --ship"
    wanted = recipe_hash(config.model, config.episode)
    assert shipped["recipe_hash"] == wanted, (
        f"the tiny doctor's recipe changed (shipped {shipped['recipe_hash']}, now {wanted}): rebuild and "
        "ship it with `grpodx build-tiny --rebuild --ship`"
    )
    weights = (SHIPPED_DIR / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == shipped["weights_sha256"], "shipped weights were edited"
    assert len(weights) < 12 * 2**20  # a few MB in git


def test_shipped_doctor_loads_without_building(monkeypatch, tmp_path):
    def no_build(*args, **kwargs):
        raise AssertionError("the shipped doctor must not be built")

    monkeypatch.setattr(build, "build_tiny_doctor", no_build)
    monkeypatch.setenv("GRPODX_CACHE", str(tmp_path))
    config = load_config("configs/tiny-cpu.yaml")
    source = doctor_source(config, progress=False)
    assert source == str(SHIPPED_DIR) and not any(tmp_path.iterdir())
    model, tokenizer = load_doctor(source)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.model_type == "phi3" and tokenizer.chat_template == PHI4_CHAT_TEMPLATE


@pytest.mark.slow
def test_warm_started_doctor_beats_random_guessing():
    """Builds the real embedded doctor (a few minutes, once per recipe) and evaluates it."""
    config = load_config("configs/tiny-cpu.yaml", ["train.eval_cases=80"])
    (episodes,) = asyncio.run(evaluate_doctors(config, [None]))
    summary = summarize(episodes)
    random_guess = 1 / len(KB.conditions)
    assert summary["accuracy"] > 4 * random_guess, summary
    assert summary["finished"] > 0.8, summary
    assert summary["leaked"] < 0.2, summary


@pytest.mark.slow
def test_paired_evaluation_repeats_every_episode_of_the_same_weights(tmp_path):
    """`grpodx eval --compare` pairs cases; that is only sound if the same weights replay each case."""
    import shutil

    config = load_config("configs/tiny-cpu.yaml", ["train.eval_cases=24"])  # sampled at the config's T
    save_perturbed_adapter(tmp_path / "first", doctor_source(config), seed=0, scale=0.05)
    second = shutil.copytree(tmp_path / "first", tmp_path / "second")
    base, first, again = asyncio.run(evaluate_doctors(config, [None, str(tmp_path / "first"), str(second)]))

    def replay(episodes):
        return [(e["case_id"], e["diagnosis"], e["turns"], e["reward"]) for e in episode_rows(episodes)]

    assert replay(first) == replay(again)
    paired = paired_difference(first, again)
    assert paired["cases"] == 24 and paired["reward_diff"] == 0 and paired["better"] == paired["worse"] == 0
    # The adapter is really applied: the base doctor plays some of the cases differently.
    assert replay(first) != replay(base)
